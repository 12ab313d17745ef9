"""Container DNS through aardvark-dns: netavark's config files, and one daemon updated once per batch.

netavark appends one line per container to ``<config>/aardvark-dns/<network>`` and sends aardvark-dns a
SIGHUP per container. aardvark-dns 1.4.0 (Debian 12) answers every SIGHUP by closing *all* its listeners,
re-reading *every* file in that directory and binding again, so a reload per container is a storm of
listener teardowns, each of which drops the queries in flight. Here a whole batch is one ``commit()``:
every changed file is rewritten once, then the daemon is started, signalled or stopped once.

What was measured on 1.4.0 (inside private namespaces; ``bench/aardvark_reload.py`` reproduces it) and
what the code does about it:

* The starter process returns before the daemon has bound anything (~3 ms, nothing listening yet), and a
  SIGHUP returns at once, so "commit returned" would not mean "names resolve". ``commit()`` therefore
  waits until the daemon owns a *new* UDP socket on every gateway (seen in ``/proc/<pid>/net/udp*``):
  the config is parsed before the listeners are bound, so new sockets prove the new config is loaded.
  That takes ~4 ms for 3 dual-stack networks, ~9-12 ms with 1000 entries per network; a whole
  ``commit()`` of 100 new entries to a running daemon ~5 ms, of 1000 ~16 ms.
* aardvark-dns reads every file in its directory, and a file that vanishes between its directory scan
  and its open (the usual temp-file-then-rename dance done *inside* that directory) makes it exit with
  status 1: DNS is then gone for good (6 of 8 runs of 20 back-to-back reloads). That is the way we
  found for reloads to "stop answering for good"; a file read while half written (netavark rewrites in
  place) plausibly fails the same way. Temp files therefore live in ``<config>`` and are renamed into
  the directory; with that, 50 back-to-back SIGHUPs with changing files and 100 reloads under 20
  concurrent query loops never killed or wedged it (~1% of queries *during* reloads are lost, a
  timeout each for the client).
* A restart (SIGTERM, wait, start) loses as many in-flight queries per event (1-1.6 for a client
  querying flat out, either way) and takes longer until all listeners are bound (7.5 vs 4.3 ms; 19-28
  vs 9-12 ms with 1000 entries per network), so a batch signals once; only if a reload does not show
  up within ``ready_timeout`` (or the daemon died) is it restarted instead.
* A listener that cannot bind (port taken, gateway address missing) is skipped silently and the daemon
  keeps running; the wait above turns that into netavark's newer ``failed to bind udp listener`` error.
* SIGTERM ends it at once but leaves ``aardvark.pid`` behind (we remove it); with no config left a SIGHUP
  makes it exit by itself, but only after ~1.9 s, so the last teardown stops it with SIGTERM.
* It binds UDP only. Names are scoped by listener: a query to a network's gateway is answered from that
  network's entries, also when it comes from the host or from a container that can route to another
  network's gateway (keeping containers apart is the firewall's isolation, not DNS).

The daemon runs in the engine's host namespace: it is spawned from a worker thread that has entered that
namespace (a child inherits the namespaces of the thread that forks it), so no ``nsenter`` is needed.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import logging
import os
import secrets
import select
import signal
import struct
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import anyio
import anyio.to_thread

from .errors import DnsError, io_error_text
from .netns import Netns, run_in_netns_sync
from .types import IPAddress

log = logging.getLogger(__name__)

DEFAULT_BINARY = "/usr/lib/podman/aardvark-dns"
DNS_DIR = "aardvark-dns"
LOCK_FILE = "aardvark.lock"
PID_FILE = "aardvark.pid"
DEFAULT_PORT_AARDVARK = 5533  # what aardvark-dns binds without -p

ERR_EXITED = "error while applying dns entries: IO error: aardvark-dns exited unexpectedly without error message"
_SYSLOG_NOISE = "failed to connect to syslog"  # 1.4.0 prints this on every start without /dev/log
_CURRENT_NETNS = Netns()


def _not_executable(binary: str) -> DnsError:
    return DnsError(f"aardvark-dns failed to start: Failed to find executable {binary}")


# ---------------------------------------------------------------------------------------------------
# the config file format (pure)


@dataclass(frozen=True)
class DnsNetwork:
    """The network side of an entry: its file name, where aardvark listens, where it forwards."""

    name: str
    gateways: tuple[IPAddress, ...]
    network_dns_servers: tuple[IPAddress, ...] = ()


@dataclass(frozen=True)
class DnsEntry:
    """One container on one network; ``names`` is the container name first, then its aliases."""

    network: DnsNetwork
    container_id: str
    ipv4: tuple[IPv4Address, ...]
    ipv6: tuple[IPv6Address, ...]
    names: tuple[str, ...]
    dns_servers: tuple[IPAddress, ...] = ()


def _join(addrs: Iterable[object]) -> str:
    return ",".join(str(a) for a in addrs)


def network_header(gateways: Sequence[object], dns_servers: Sequence[object] = ()) -> str:
    """First line of a network file: ``<gw,gw>[ <server,server>]`` (netavark's layout)."""
    head = _join(gateways)
    return f"{head} {_join(dns_servers)}" if dns_servers else head


def entry_line(entry: DnsEntry) -> str:
    """``<id> <v4,…> <v6,…> <name,alias,…>[ <dns server,…>]``; empty address fields stay empty."""
    line = f"{entry.container_id} {_join(entry.ipv4)} {_join(entry.ipv6)} {','.join(entry.names)}"
    return f"{line} {_join(entry.dns_servers)}" if entry.dns_servers else line


@dataclass
class NetworkFile:
    """A parsed network file. Entries are keyed by container id, so re-adding a container replaces it
    (netavark appends a duplicate) and removal matches the id exactly (netavark matches a substring)."""

    header: str
    entries: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> NetworkFile:
        lines = [line for line in text.split("\n") if line]
        if not lines:
            return cls("")
        return cls(lines[0], {line.split(" ", 1)[0]: line for line in lines[1:]})

    def render(self) -> str | None:
        """The file's text, or None when no container is left (the file must then go: aardvark-dns
        would keep listening on the gateway of a network without containers)."""
        if not self.entries:
            return None
        return "\n".join([self.header, *self.entries.values()]) + "\n"

    @property
    def gateways(self) -> tuple[IPAddress, ...]:
        field0 = self.header.split(" ", 1)[0]
        out = []
        for text in field0.split(","):
            with contextlib.suppress(ValueError):
                out.append(ipaddress.ip_address(text))
        return tuple(out)


def _check_token(value: str, what: str) -> None:
    """A field of a space-separated, comma-joined line must hold neither separator (nor be empty)."""
    if not value or any(c in value for c in " ,\n\t\r\0"):
        raise DnsError(f"invalid {what} {value!r} for aardvark-dns")


def check_network_name(name: str) -> None:
    """The name becomes a file name in a directory aardvark-dns reads whole; keep it a plain name."""
    if not name or "/" in name or "\0" in name or "\n" in name or name in (".", "..", PID_FILE):
        raise DnsError(f"invalid network name {name!r} for aardvark-dns")


def check_entry(entry: DnsEntry) -> None:
    """Reject what would corrupt the file format *before* any file is touched."""
    check_network_name(entry.network.name)
    if not entry.network.gateways:
        raise DnsError(f"network {entry.network.name} has no gateway address for aardvark-dns to listen on")
    _check_token(entry.container_id, "container id")
    if not entry.names:
        raise DnsError(f"container {entry.container_id} has no name for aardvark-dns")
    for name in entry.names:
        _check_token(name, "container name or alias")


def parse_dns_servers(servers: Sequence[str]) -> tuple[IPAddress, ...]:
    """``netavark update`` input: empty strings are dropped (``""`` alone clears the list)."""
    out = []
    for s in servers:
        if s == "":
            continue
        try:
            out.append(ipaddress.ip_address(s.strip()))
        except ValueError:
            raise DnsError(f"unable to modify network dns servers: invalid IP address {s!r}") from None
    return tuple(out)


# ---------------------------------------------------------------------------------------------------
# the daemon, seen from outside (all of these block: call them from a worker thread)


@dataclass
class _Daemon:
    pid: int
    pidfd: int
    port: int
    netns: tuple[int, int]

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def _cmdline_value(argv: list[bytes], short: bytes, long: bytes) -> bytes | None:
    for i, arg in enumerate(argv):
        if arg in (short, long) and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(long + b"="):
            return arg[len(long) + 1:]
    return None


def _udp_sockets_sync(pid: int) -> dict[tuple[IPAddress, int], set[int]] | None:
    """UDP sockets the process owns, by bound (address, port) → socket inodes; None if it is gone.

    ``/proc/<pid>/net/udp*`` is the view of *that process's* namespace, whichever namespace we are in.
    """
    own: set[int] = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    own.add(int(link[8:-1]))
    except (FileNotFoundError, ProcessLookupError):
        return None
    out: dict[tuple[IPAddress, int], set[int]] = {}
    for table in ("udp", "udp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                lines = f.read().splitlines()[1:]
        except FileNotFoundError:  # no IPv6 in this kernel; or the process is gone (seen next time)
            continue
        except ProcessLookupError:
            return None
        for line in lines:
            cols = line.split()
            inode = int(cols[9])
            if inode not in own:
                continue
            addr_hex, port_hex = cols[1].split(":")
            # the kernel prints each 32-bit word of the address as a host-order integer
            raw = b"".join(struct.pack("=I", int(addr_hex[i:i + 8], 16)) for i in range(0, len(addr_hex), 8))
            out.setdefault((ipaddress.ip_address(raw), int(port_hex, 16)), set()).add(inode)
    return out


def _is_gone(pidfd: int) -> bool:
    """A pidfd polls readable once the process has exited (zombie or reaped)."""
    p = select.poll()
    p.register(pidfd, select.POLLIN)
    return bool(p.poll(0))


def _signal(daemon: _Daemon, sig: int) -> bool:
    """Signal through the pidfd, which cannot hit a recycled pid; False if it is already gone."""
    try:
        signal.pidfd_send_signal(daemon.pidfd, sig)
        return True
    except ProcessLookupError:
        return False


def _reap_sync(pid: int) -> None:
    """Collect the exit status if we happen to be the daemon's (sub)reaper; usually init is."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _fmt_sockaddr(ip: IPAddress, port: int) -> str:
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


# ---------------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    changes: dict[str, str | None]  # network name → new text (None: delete the file)
    old: dict[str, str | None]  # what to restore on failure
    entries_after: bool  # any network file left afterwards
    bind_networks: set[str]  # networks that got entries: their listeners must come up
    atomic: bool  # undo the files if the daemon fails (setup, update); pure removals always stand


class Aardvark:
    """The aardvark-dns config directory and its daemon, for one host namespace.

    Every public method takes the lock file ``<config>/aardvark.lock`` (the one netavark uses) for its
    whole read-modify-write-signal cycle, so concurrent engines and netavark itself serialise.
    """

    def __init__(self, config_dir: str | os.PathLike[str], binary: str = DEFAULT_BINARY, dns_port: int = 53,
                 host_netns: Netns = _CURRENT_NETNS, *, ready_timeout: float = 5.0, stop_timeout: float = 2.0) -> None:
        # absolute: the path is handed to the daemon, which runs with / as its working directory
        self.config_dir = Path(os.path.abspath(config_dir))
        self.dns_dir = self.config_dir / DNS_DIR
        self.lock_path = self.config_dir / LOCK_FILE
        self.binary = binary
        self.dns_port = dns_port
        self.host_netns = host_netns
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout

    # -- public ---------------------------------------------------------------------------------------

    @property
    def installed(self) -> bool:
        """netavark's test for DNS support: the binary path exists (no DNS at all otherwise)."""
        return os.path.exists(self.binary)

    async def commit(self, add: Sequence[DnsEntry] = (), remove: Sequence[tuple[str, str]] = ()) -> None:
        """Apply a whole batch: remove ``(network, container_id)`` pairs, add entries, then update the
        daemon once (start, reload or stop). On failure every file is restored to what it was, so a
        failed commit leaves nothing behind; removing entries that are not there is not an error."""
        add = tuple(add)
        remove = tuple(remove)
        for entry in add:
            check_entry(entry)
        for name, _ in remove:
            check_network_name(name)
        if not add and not remove:
            return
        t0 = time.monotonic()
        async with self._locked():
            plan = await anyio.to_thread.run_sync(self._plan_sync, add, remove)
            await self._apply(plan)
        log.debug("dns commit: +%d -%d entries, %d files in %.1f ms", len(add), len(remove),
                  len(plan.changes), (time.monotonic() - t0) * 1000)

    async def update_network_dns_servers(self, network_name: str, servers: Sequence[str]) -> None:
        """``netavark update``: rewrite the network's first line (``[""]`` or ``[]`` clears the servers)
        and reload. A no-op without the binary (like netavark) or without a file for the network (no
        container there; the next setup writes the servers from the network config)."""
        check_network_name(network_name)
        new_servers = parse_dns_servers(servers)
        if not await anyio.to_thread.run_sync(os.path.exists, self.binary):
            return
        async with self._locked():
            plan = await anyio.to_thread.run_sync(self._plan_update_sync, network_name, new_servers)
            await self._apply(plan)

    async def stop(self) -> None:
        """Stop the daemon without touching the network files (for gc and tests)."""
        async with self._locked():
            daemon = await anyio.to_thread.run_sync(self._find_daemon_sync)
            if daemon is not None:
                try:
                    await self._stop(daemon)
                finally:
                    daemon.close()

    # -- planning (worker thread, lock held) ------------------------------------------------------------

    def _read_sync(self, name: str) -> str | None:
        try:
            return (self.dns_dir / name).read_text()
        except FileNotFoundError:
            return None

    def _network_files_sync(self) -> list[str]:
        try:
            return [n for n in os.listdir(self.dns_dir) if n != PID_FILE]
        except FileNotFoundError:
            return []

    def _plan_sync(self, add: tuple[DnsEntry, ...], remove: tuple[tuple[str, str], ...]) -> _Plan:
        touched = {e.network.name for e in add} | {name for name, _ in remove}
        old = {name: self._read_sync(name) for name in touched}
        files = {name: NetworkFile.parse(text) if text is not None else None for name, text in old.items()}
        for name, cid in remove:
            f = files[name]
            if f is not None:
                f.entries.pop(cid, None)
        for entry in add:
            f = files[entry.network.name]
            if f is None:
                f = files[entry.network.name] = NetworkFile("")
            # the caller's network config is authoritative (and heals a stale header)
            f.header = network_header(entry.network.gateways, entry.network.network_dns_servers)
            f.entries[entry.container_id] = entry_line(entry)
        changes: dict[str, str | None] = {}
        for name, f in files.items():
            new = f.render() if f is not None else None
            if new != old[name]:
                changes[name] = new
        return self._finish_plan(changes, old, {e.network.name for e in add}, atomic=bool(add))

    def _plan_update_sync(self, name: str, servers: tuple[IPAddress, ...]) -> _Plan:
        text = self._read_sync(name)
        if text is None:
            return self._finish_plan({}, {}, set(), atomic=True)
        f = NetworkFile.parse(text)
        f.header = network_header([f.header.split(" ", 1)[0]], servers)
        new = f.render()
        changes = {name: new} if new is not None and new != text else {}
        return self._finish_plan(changes, {name: text}, set(), atomic=True)

    def _finish_plan(self, changes: Mapping[str, str | None], old: Mapping[str, str | None],
                     bind_networks: set[str], *, atomic: bool) -> _Plan:
        after = set(self._network_files_sync())
        for name, text in changes.items():
            if text is None:
                after.discard(name)
            else:
                after.add(name)
        return _Plan(dict(changes), {n: old.get(n) for n in changes}, bool(after), bind_networks, atomic)

    def _write_sync(self, changes: dict[str, str | None]) -> None:
        """Atomic per file: write a temp file *outside* the directory aardvark-dns reads (see the module
        docstring), then rename it in. Deletions are plain unlinks."""
        self.dns_dir.mkdir(parents=True, exist_ok=True)
        for name, text in changes.items():
            target = self.dns_dir / name
            if text is None:
                with contextlib.suppress(FileNotFoundError):
                    target.unlink()
                continue
            tmp = self.config_dir / f".{DNS_DIR}.{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
            try:
                with open(tmp, "x") as f:
                    f.write(text)
                os.rename(tmp, target)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                raise

    def _expected_sync(self) -> dict[str, tuple[IPAddress, ...]]:
        """network → gateways aardvark-dns will listen on, from the first line of every file."""
        out = {}
        for name in self._network_files_sync():
            with contextlib.suppress(OSError), open(self.dns_dir / name) as f:
                out[name] = NetworkFile.parse(f.readline()).gateways
        return out

    # -- the daemon -------------------------------------------------------------------------------------

    def _host_ns_id(self) -> tuple[int, int]:
        st = os.stat(self.host_netns.path or "/proc/self/ns/net")
        return st.st_dev, st.st_ino

    def _find_daemon_sync(self) -> _Daemon | None:
        """The daemon named by ``aardvark.pid``, if it is alive *and* serves this directory: a stale pid
        file can name a recycled pid, and a SIGHUP sent there would kill an innocent process."""
        try:
            pid = int((self.dns_dir / PID_FILE).read_text().strip())
        except (FileNotFoundError, NotADirectoryError, ValueError):
            return None
        if pid <= 0:
            return None
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return None
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            st = os.stat(f"/proc/{pid}/ns/net")
        except OSError:
            os.close(pidfd)
            return None
        config = _cmdline_value(argv, b"-c", b"--config")
        port = _cmdline_value(argv, b"-p", b"--port")
        if config is None or os.path.abspath(config) != os.fsencode(self.dns_dir) or b"run" not in argv \
                or _is_gone(pidfd):
            os.close(pidfd)
            return None
        try:
            port_num = int(port) if port is not None else DEFAULT_PORT_AARDVARK
        except ValueError:
            port_num = -1
        return _Daemon(pid, pidfd, port_num, (st.st_dev, st.st_ino))

    def _executable_sync(self) -> bool:
        return os.path.isfile(self.binary) and os.access(self.binary, os.X_OK)

    def _spawn_sync(self) -> None:
        """Run ``aardvark-dns --config DIR -p PORT run`` in the host namespace; it forks the daemon and
        returns. stderr goes to a file, not a pipe: nothing can then hang on a descendant holding it."""
        argv = [self.binary, "--config", str(self.dns_dir), "-p", str(self.dns_port), "run"]
        ns_fd = self.host_netns.open() if self.host_netns.path else None
        try:
            with tempfile.TemporaryFile() as err:
                try:
                    proc = run_in_netns_sync(ns_fd, lambda: subprocess.run(
                        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, cwd="/",
                        timeout=max(self.ready_timeout, 1.0), check=False))
                except subprocess.TimeoutExpired:
                    raise DnsError("error while applying dns entries: IO error: aardvark-dns failed to start: "
                                   "timed out") from None
                except OSError as exc:
                    raise DnsError(f"error while applying dns entries: {io_error_text(exc)}") from None
                err.seek(0)
                text = err.read().decode(errors="replace")
        finally:
            if ns_fd is not None:
                os.close(ns_fd)
        if proc.returncode != 0:
            msg = "\n".join(line for line in text.strip().splitlines() if _SYSLOG_NOISE not in line).strip()
            if not msg:
                raise DnsError(ERR_EXITED)
            raise DnsError(f"error while applying dns entries: IO error: aardvark-dns failed to start: {msg}")

    def _remove_pid_file_sync(self, pid: int | None = None) -> None:
        path = self.dns_dir / PID_FILE
        with contextlib.suppress(FileNotFoundError, ValueError):
            if pid is None or int(path.read_text().strip()) == pid:
                path.unlink()

    async def _start(self) -> _Daemon:
        if not await anyio.to_thread.run_sync(self._executable_sync):
            raise _not_executable(self.binary)
        await anyio.to_thread.run_sync(self._remove_pid_file_sync)  # stale: its daemon is gone
        t0 = time.monotonic()
        await anyio.to_thread.run_sync(self._spawn_sync)
        # the starter returns right after forking: the pid file appears a moment later
        delay = 0.0005
        while True:
            daemon = await anyio.to_thread.run_sync(self._find_daemon_sync)
            if daemon is not None:
                log.debug("aardvark-dns pid %d started in %.1f ms", daemon.pid, (time.monotonic() - t0) * 1000)
                return daemon
            if time.monotonic() - t0 > self.ready_timeout:
                raise DnsError(ERR_EXITED)
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.02)

    async def _stop(self, daemon: _Daemon) -> None:
        """SIGTERM (immediate on 1.4.0), SIGKILL if it lingers; then its pid file goes too."""
        for sig, timeout in ((signal.SIGTERM, self.stop_timeout), (signal.SIGKILL, 5.0)):
            if not _signal(daemon, sig):
                break
            with anyio.move_on_after(timeout):
                await anyio.wait_readable(daemon.pidfd)
                break
        await anyio.to_thread.run_sync(_reap_sync, daemon.pid)
        await anyio.to_thread.run_sync(self._remove_pid_file_sync, daemon.pid)
        log.debug("aardvark-dns pid %d stopped", daemon.pid)

    async def _wait_ready(self, daemon: _Daemon, expected: set[tuple[IPAddress, int]],
                          old: set[int]) -> tuple[str, set[tuple[IPAddress, int]]]:
        """Poll until the daemon owns a socket not in ``old`` on every expected address.

        Returns ("ready", ∅), ("dead", ∅) or ("timeout", missing); with "timeout", ``missing`` equal to
        ``expected`` means the daemon never reloaded at all.
        """
        t0 = time.monotonic()
        delay = 0.0005
        while True:
            socks = await anyio.to_thread.run_sync(_udp_sockets_sync, daemon.pid)
            if socks is None or _is_gone(daemon.pidfd):
                return "dead", set()
            missing = {a for a in expected if not (socks.get(a, set()) - old)}
            if not missing:
                log.debug("aardvark-dns pid %d ready in %.1f ms", daemon.pid, (time.monotonic() - t0) * 1000)
                return "ready", set()
            if time.monotonic() - t0 > self.ready_timeout:
                return "timeout", missing
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.02)

    async def _apply(self, plan: _Plan) -> None:
        """Write the plan and bring the daemon in line. An atomic plan (setup, update) is undone when
        that fails, so a failed setup leaves nothing behind; a teardown's removals stand even when the
        daemon for the remaining entries cannot be reloaded (the error is still raised)."""
        daemon = await anyio.to_thread.run_sync(self._find_daemon_sync)
        try:
            if plan.atomic and plan.entries_after and daemon is None and not await anyio.to_thread.run_sync(
                    self._executable_sync):
                raise _not_executable(self.binary)  # before any file is written
            if plan.changes:
                await anyio.to_thread.run_sync(self._write_sync, plan.changes)
            try:
                await self._converge(daemon, bool(plan.changes), plan.bind_networks)
            except BaseException:
                if plan.atomic:
                    with anyio.CancelScope(shield=True):
                        await self._rollback(plan)
                raise
        finally:
            if daemon is not None:
                daemon.close()

    async def _rollback(self, plan: _Plan) -> None:
        try:
            await anyio.to_thread.run_sync(self._write_sync, plan.old)
            daemon = await anyio.to_thread.run_sync(self._find_daemon_sync)
            try:
                await self._converge(daemon, True, set())
            finally:
                if daemon is not None:
                    daemon.close()
        except Exception as exc:  # noqa: BLE001 - the original error is the one to report
            log.warning("aardvark-dns rollback incomplete: %s", exc)

    async def _converge(self, daemon: _Daemon | None, changed: bool, bind_networks: set[str]) -> None:
        """One action for the whole batch: stop (no files left), start (none running), reload (files
        changed) — and wait until it took effect."""
        networks = await anyio.to_thread.run_sync(self._expected_sync)
        if not networks:
            if daemon is not None:
                await self._stop(daemon)
            await anyio.to_thread.run_sync(self._remove_pid_file_sync)
            return
        expected = {(gw, self.dns_port) for gws in networks.values() for gw in gws}
        host = await anyio.to_thread.run_sync(self._host_ns_id)
        if daemon is not None and (daemon.port != self.dns_port or daemon.netns != host):
            log.info("aardvark-dns pid %d serves port %d in another namespace or port: restarting",
                     daemon.pid, daemon.port)
            await self._stop(daemon)
            daemon = None
        owned: _Daemon | None = None  # a daemon started here; the caller closes the one it passed in
        try:
            if daemon is None:
                daemon = owned = await self._start()
                status, missing = await self._wait_ready(daemon, expected, set())
            elif changed:
                before = await anyio.to_thread.run_sync(_udp_sockets_sync, daemon.pid) or {}
                old = set().union(*before.values()) if before else set()
                t0 = time.monotonic()
                if not _signal(daemon, signal.SIGHUP):
                    status, missing = "dead", set()
                else:
                    status, missing = await self._wait_ready(daemon, expected, old)
                log.debug("aardvark-dns reload: %s after %.1f ms", status, (time.monotonic() - t0) * 1000)
                if status == "dead" or (status == "timeout" and missing == expected):
                    # it died, or never reloaded: a fresh daemon reads the same files
                    log.warning("aardvark-dns pid %d did not reload (%s): restarting", daemon.pid, status)
                    if status != "dead":
                        await self._stop(daemon)
                    daemon = owned = await self._start()
                    status, missing = await self._wait_ready(daemon, expected, set())
            else:
                return
            if status == "dead":
                raise DnsError(ERR_EXITED)
            if missing:
                required = {(gw, self.dns_port) for n in bind_networks for gw in networks.get(n, ())}
                fatal = sorted(missing & required, key=str)
                if fatal:
                    raise DnsError("error while applying dns entries: IO error: failed to bind udp listener on "
                                   + _fmt_sockaddr(*fatal[0]))
                log.warning("aardvark-dns is not listening on %s",
                            ", ".join(_fmt_sockaddr(*a) for a in sorted(missing, key=str)))
        finally:
            if owned is not None:
                owned.close()

    # -- locking ----------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _locked(self) -> AsyncIterator[None]:
        """flock on ``<config>/aardvark.lock``; the wait (if any) happens in a worker thread. Closing the
        fd releases the lock, also after a cancellation (the thread is always waited for)."""
        await anyio.to_thread.run_sync(lambda: self.config_dir.mkdir(parents=True, exist_ok=True))
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                await anyio.to_thread.run_sync(fcntl.flock, fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
