"""Apply :mod:`asyncnet.firewall.ruleset` plans: one read, one atomic nftables transaction per call.

netavark spawns ``nft`` twice per driver call and re-reads the table every time, and relies on podman's
global lock (8 netavark processes at once produce "Chain already exists" errors and leftover rules).
Here one :meth:`NftablesFirewall.commit` covers a whole engine call: under a cross-process lock file
(``<config>/firewall/nftables.lock``) it reads the table once, plans every change in memory and applies
them as ONE transaction — all or nothing.

* **Reading** is netavark's ``list table inet netavark``, reduced to what the plan looks into: the
  chain names/handles plus the rules of the chains :func:`~.ruleset.chains_to_read` names (``list
  chain`` is filtered in the kernel). A setup on a table of 8000 rules reads a dozen rules, not 8000.
* **Writing**: the plan encoded as nf_tables netlink messages by :mod:`.wire` — byte for byte what
  ``nft -f`` sends for the same commands (a test compares them with nft's own batch) — and sent as ONE
  batch on a netfilter netlink socket from a worker thread inside the host netns. libnftables would
  spend as long parsing 8000 rules as the kernel spends committing them. Anything the encoder does
  not know goes through libnftables instead (text syntax, or netavark's JSON), as does every write
  with ``syntax="text"|"json"``; without the library, ``nft -f -`` (also one atomic transaction).
  pyroute2.nftables is deliberately not used (see DESIGN.md).
* **Handles**: a container torn down alone must lose exactly its port rules, which netavark finds by
  comparing every rule of the DNAT and ``_dnat`` chains (O(containers on the network)). We record the
  handles of each container's rules (``<config>/firewall/handles/<network id>``: counted from the
  kernel's echo of the batch's first and last new rule, or located by the first teardown that had to
  read the chains) and delete by handle. Records are only trusted for the same table and chain
  objects (handles are never reused within a table's life); a stale one makes the kernel refuse the
  batch and the commit is re-planned from the chains' contents.

netavark's state files (``<config>/firewall/{firewall-driver,networks/,ports/}``) are written exactly as
netavark writes them so that ``firewall-reload`` can replay them; a failed transaction restores them,
so "nothing applied" holds for the files too.
"""

from __future__ import annotations

import fcntl
import functools
import gc
import hashlib
import ipaddress
import logging
import os
import pathlib
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

import anyio.to_thread
import orjson

from ..errors import AsyncnetError, ConfigError, FirewallError, io_error_text
from ..netns import Netns, run_in_netns_sync
from ..types import IPAddress, Isolation, parse_port_mapping
from . import wire
from .ruleset import (
    FAMILY,
    TABLE,
    NetworkFw,
    Plan,
    PortFw,
    PortKey,
    RuleRef,
    Table,
    Unrenderable,
    build_plan,
    chains_to_read,
    locate_port_rules,
    parse_host_ip,
    render_text,
)

log = logging.getLogger("asyncnet.firewall")

FIREWALL_DIR = "firewall"
DRIVER_FILE = "firewall-driver"
NETWORKS_DIR = "networks"
PORTS_DIR = "ports"
HANDLES_DIR = "handles"  # asyncnet's own cache (netavark reads only networks/ and ports/)
LOCK_FILE = "nftables.lock"
HASH_NAME_LEN = 13  # netavark's network_hash_name: sha512(name) in upper-case hex, 13 chars

LOG_USING_NFTABLES = "Using nftables firewall driver"
LOG_NO_FIREWALL = "Not using firewall"


@functools.lru_cache(maxsize=1024)
def network_hash_name(network_name: str) -> str:
    """netavark's ``network_hash_name`` (kept in the state files; iptables uses it for chain names)."""
    return hashlib.sha512(network_name.encode()).hexdigest().upper()[:HASH_NAME_LEN]


# --------------------------------------------------------------------------------------------------
# small helpers


_gc_guard = threading.Lock()
_gc_state = {"depth": 0, "was_enabled": True}


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Parsing/planning thousands of small dicts triggers the cyclic GC over and over (~4x slower).

    Reference-counted: nested or concurrent users (several firewall objects) re-enable only once.
    """
    with _gc_guard:
        if _gc_state["depth"] == 0:
            _gc_state["was_enabled"] = gc.isenabled()
            gc.disable()
        _gc_state["depth"] += 1
    try:
        yield
    finally:
        with _gc_guard:
            _gc_state["depth"] -= 1
            if _gc_state["depth"] == 0 and _gc_state["was_enabled"]:
                gc.enable()


def _nft_error(text: str | bytes) -> FirewallError:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    text = " ".join(line.strip() for line in text.strip().splitlines() if line.strip())
    return FirewallError(f"nftables error: {text or 'nft failed without a message'}")


def _is_missing_table(err: str) -> bool:
    return "No such file or directory" in err


# --------------------------------------------------------------------------------------------------
# backends: libnftables in-process, or the nft binary


class _Backend(Protocol):
    name: str
    needs_setns: bool
    #: cheap calls: read only the chains the plan needs (``list chain`` is filtered in the kernel dump)
    selective: bool

    def list(self, what: str) -> bytes | str | None: ...

    def table_handle(self) -> int | None: ...

    def apply(self, plan: Plan, *, syntax: str, existing_chains: set[str],
              record: bool = False, prepared: wire.PreparedPorts | None = None) -> wire.Handles | None: ...


def _render(cmds: list[dict[str, Any]], syntax: str) -> tuple[bytes, bool]:
    """nft input for ``cmds``: (payload, is_json). Text unless asked for JSON or unrenderable."""
    if syntax != "json":
        try:
            return render_text(cmds).encode(), False
        except Unrenderable as exc:
            log.debug("sending JSON: %s", exc)
    return orjson.dumps({"nftables": cmds}), True


class _LibBackend:
    """libnftables through the ``nftables`` module for reads (and writes in the text/JSON syntaxes),
    plus a netfilter netlink socket for the netlink syntax; call only from a thread in the host netns."""

    name = "libnftables"
    needs_setns = True
    selective = True

    def __init__(self) -> None:
        import nftables  # noqa: F401 - fail here (ImportError) when the module is missing

        self._module = nftables
        self._reader: Any = None
        self._writer: Any = None
        self._socket: _NfSocket | None = None
        self._lock = threading.Lock()

    def _context(self, *, writer: bool = False) -> Any:
        """Two contexts, created on first use, i.e. inside the host netns (their netlink sockets
        belong there). Reads and writes use different ones: after a ``list chain`` the context's
        cache makes the next transaction 3-4x slower (measured with libnftables 1.0.6)."""
        ctx = self._writer if writer else self._reader
        if ctx is None:
            ctx = self._module.Nftables()
            ctx.set_json_output(True)  # on 1.0.6, JSON *input* is only recognised with this set
            if writer:
                self._writer = ctx
            else:
                self._reader = ctx
        return ctx

    def probe(self) -> None:
        """Load libnftables.so now (OSError when the library is not installed)."""
        with self._lock:
            self._context()
            self._context(writer=True)

    def _netlink(self) -> _NfSocket | None:
        if self._socket is None:
            self._socket = _NfSocket.open()
        return self._socket

    def table_handle(self) -> int | None:
        with self._lock:
            nl = self._netlink()
            return nl.table_handle() if nl is not None else None

    def list(self, what: str) -> str | None:
        """``list …`` as JSON; None when the object does not exist."""
        with self._lock:
            rc, out, err = self._context().cmd(f"list {what}")
        if rc != 0:
            if _is_missing_table(err):
                return None
            raise _nft_error(err)
        return out

    def apply(self, plan: Plan, *, syntax: str, existing_chains: set[str],
              record: bool = False, prepared: wire.PreparedPorts | None = None) -> wire.Handles | None:
        """One transaction. Returns the handles of the rules and chains it added when ``record`` and
        they could be established (netlink syntax only), else None."""
        with self._lock:
            if syntax == "netlink":
                nl = self._netlink()
                try:
                    batch = wire.encode(plan.items, existing_chains=existing_chains, prepared=prepared)
                except wire.Unencodable as exc:
                    log.debug("not encodable as netlink, using libnftables: %s", exc)
                else:
                    if nl is not None:
                        return nl.transact(batch, plan, record=record)
            payload, _json = _render(plan.commands, syntax)
            rc, _out, err = self._context(writer=True).cmd(payload)
            if rc != 0:
                raise _nft_error(err)
            return None


NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWTABLE = 0
NFPROTO_INET = 1
SO_SNDBUFFORCE = 32
NFT_MSG_GETTABLE = 1
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
NFTA_TABLE_NAME = 1
NFTA_TABLE_HANDLE = 4
NFTA_RULE_HANDLE = 3


def _table_handle_request(seq: int) -> bytes:
    name = TABLE.encode() + b"\0"
    attr = struct.pack("=HH", 4 + len(name), NFTA_TABLE_NAME) + name + b"\0" * (-len(name) % 4)
    body = struct.pack("=BBH", NFPROTO_INET, 0, 0) + attr
    return struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE,
                       NLM_F_REQUEST, seq, 0) + body


def _attr_u64(data: bytes, off: int, length: int, wanted: int) -> int | None:
    """The big-endian u64 attribute ``wanted`` of the nfnetlink message at ``off``, if present."""
    a = off + 20
    end = min(off + length, len(data))
    while a + 4 <= end:
        alen, atype = struct.unpack_from("=HH", data, a)
        if alen < 4:
            break
        if atype & 0x3FFF == wanted and alen == 12:
            return int.from_bytes(data[a + 4:a + 12], "big")
        a += (alen + 3) & ~3
    return None


def _parse_table_handle(data: bytes) -> int | None:
    if len(data) < 20:
        return None
    length, mtype = struct.unpack_from("=IH", data)
    if mtype == NLMSG_ERROR or mtype & 0xFF != NFT_MSG_NEWTABLE:
        return None  # ENOENT: no table
    return _attr_u64(data, 0, length, NFTA_TABLE_HANDLE)


class _NfSocket:
    """A NETLINK_NETFILTER socket kept for the backend's lifetime (in the host netns).

    It sends :mod:`.wire` batches — the bytes nft would send for the same commands, minus nft's
    parser (about half of a big commit) — and asks for the table's handle, which tells a table from
    a re-created one (``nft flush ruleset`` + reload: chain and rule handles restart with a new
    table, the table handle does not; libnftables has no cheap way to ask).

    New rules' handles: the kernel allocates one handle per new rule, chain and set of a table, in
    the order of the batch's messages, under the commit mutex. So only the first and the last new
    rule are echoed (NLM_F_ECHO) and the others are counted from the first; the last one checks
    the count (a chain the planner thought missing, a foreign writer in between) — on a mismatch
    nothing is recorded. Echoing every rule would make the kernel build 8000 notifications.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._seq = 0
        self._sndbuf = 0

    @classmethod
    def open(cls) -> _NfSocket | None:
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
        except OSError:
            return None
        try:
            sock.bind((0, 0))
            sock.setblocking(False)
        except OSError:
            sock.close()
            return None
        return cls(sock)

    def _drain(self) -> None:
        while True:
            try:
                if not self.sock.recv(1 << 20):
                    return
            except BlockingIOError:
                return
            except OSError:
                continue  # ENOBUFS is reported once; keep draining

    def table_handle(self) -> int | None:
        """``inet netavark``'s handle, or None when there is no such table."""
        self._drain()
        self._seq += 1
        try:
            self.sock.send(_table_handle_request(self._seq))
            self.sock.settimeout(5)
            try:
                while True:
                    data = self.sock.recv(65536)
                    if len(data) >= 16 and struct.unpack_from("=I", data, 8)[0] == self._seq:
                        return _parse_table_handle(data)
            finally:
                self.sock.setblocking(False)
        except OSError:
            return None

    def transact(self, batch: wire.Batch, plan: Plan, *, record: bool) -> wire.Handles | None:
        """Send one batch; raise ``nftables error: …`` when the kernel rejects it (then nothing of it
        was applied). The kernel handles the whole batch inside ``sendmsg``, so its answers (errors,
        echoes) are queued when the call returns, as nft itself relies on."""
        echo = (batch.first_and_last_rule() or ()) if record else ()
        data = batch.framed(echo)
        self._drain()
        if len(data) + 4096 > self._sndbuf:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, len(data) + 4096)
            except OSError:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, len(data) + 4096)
            self._sndbuf = len(data) + 4096
        try:
            self.sock.send(data)
        except OSError as exc:
            raise FirewallError(f"nftables error: netlink: {io_error_text(exc)}") from None
        errors: list[str] = []
        echoed: dict[int, int] = {}
        while True:
            try:
                msg = self.sock.recv(1 << 20)
            except BlockingIOError:
                break
            except OSError as exc:
                errors.append(io_error_text(exc))
                continue
            off = 0
            while off + 16 <= len(msg):
                length, mtype, _flags, seq = struct.unpack_from("=IHHI", msg, off)
                if length < 16:
                    break
                if mtype == NLMSG_ERROR and off + 20 <= len(msg):
                    code = -struct.unpack_from("=i", msg, off + 16)[0]
                    if code:
                        errors.append(self._describe(code, batch, plan, seq))
                elif mtype == (NFNL_SUBSYS_NFTABLES << 8) | wire.NFT_MSG_NEWRULE:
                    handle = _attr_u64(msg, off, length, NFTA_RULE_HANDLE)
                    if handle is not None:
                        echoed[seq] = handle
                off += (length + 3) & ~3
        if errors:
            raise FirewallError("nftables error: " + " ".join(dict.fromkeys(errors)))
        if not echo or echo[0] not in echoed or echo[1] not in echoed:
            return None
        handles = batch.handles(echoed[echo[0]])
        if handles.rules[batch.command_at(echo[1])][1] != echoed[echo[1]]:  # type: ignore[index]
            log.debug("rule handles did not line up with the batch; not recording them")
            return None
        return handles

    @staticmethod
    def _describe(code: int, batch: wire.Batch, plan: Plan, seq: int) -> str:
        """nft's wording: the error, then the command it belongs to."""
        text = f"Error: Could not process rule: {os.strerror(code)}"
        idx = batch.command_at(seq)
        if idx is not None:
            try:
                text += " " + render_text([plan.commands[idx]]).strip()
            except Unrenderable:
                pass
        return text


class _CliBackend:
    """``nft -j`` subprocesses, entered into the host netns with nsenter when it has a path."""

    name = "nft"
    needs_setns = False
    selective = False  # a process per call: one whole-table read is cheaper than ten chain reads

    def __init__(self, host_netns: Netns) -> None:
        self._nft = shutil.which("nft") or "/usr/sbin/nft"
        self._prefix = ["nsenter", f"--net={host_netns.path}"] if host_netns.path else []

    def _run(self, args: Sequence[str], data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        try:
            return subprocess.run([*self._prefix, self._nft, *args], input=data, capture_output=True,
                                  check=False, timeout=120)
        except OSError as exc:
            raise FirewallError(f"nftables error: {io_error_text(exc)}") from None

    def table_handle(self) -> int | None:
        return None  # handle hints are only used with libnftables

    def list(self, what: str) -> bytes | None:
        proc = self._run(["-j", "list", *what.split()])
        if proc.returncode != 0:
            err = proc.stderr.decode(errors="replace")
            if _is_missing_table(err):
                return None
            raise _nft_error(err)
        return proc.stdout

    def apply(self, plan: Plan, *, syntax: str, existing_chains: set[str],
              record: bool = False, prepared: wire.PreparedPorts | None = None) -> wire.Handles | None:
        payload, json_input = _render(plan.commands, syntax)
        proc = self._run(["-j", "-f", "-"] if json_input else ["-f", "-"], payload)
        if proc.returncode != 0:
            raise _nft_error(proc.stderr.decode(errors="replace"))
        return None  # no handle records through the binary: it reads the whole table anyway


# --------------------------------------------------------------------------------------------------
# state files (§9)


def network_state(net: NetworkFw, dns_port: int) -> dict[str, Any]:
    """``$config/firewall/networks/<id>``, key order as netavark 1.14 writes it."""
    return {
        "subnets": [str(s) for s in net.subnets],
        "bridge_name": net.bridge,
        "network_id": net.network_id,
        "network_hash_name": network_hash_name(net.network_name),
        "isolation": net.isolation.value,
        "dns_port": dns_port,
    }


@functools.lru_cache(maxsize=256)
def _gateway_texts(gateways: tuple[IPAddress, ...]) -> list[str]:
    return [str(g) for g in gateways]  # shared by every port file of the network: never mutated


def port_state(pf: PortFw) -> dict[str, Any]:
    """``$config/firewall/ports/<net id>_<ctr id>``."""
    v4, v6 = pf.ipv4, pf.ipv6
    return {
        "container_id": pf.container_id,
        "network_id": pf.network.network_id,
        "port_mappings": None if pf.port_mappings is None else [m.to_json() for m in pf.port_mappings],
        "network_name": pf.network.network_name,
        "network_hash_name": network_hash_name(pf.network.network_name),
        "container_ip_v4": None if v4 is None else str(v4.ip),
        "subnet_v4": None if v4 is None else str(v4.network),
        "container_ip_v6": None if v6 is None else str(v6.ip),
        "subnet_v6": None if v6 is None else str(v6.network),
        "dns_port": pf.dns_port,
        "dns_server_ips": _gateway_texts(pf.network.gateways),
    }


def _port_file(pf: PortFw) -> bytes:
    return orjson.dumps(port_state(pf))


class Prepared:
    """A batch's port work done before its commit, container by container as each one's kernel work
    is done: the rules' netlink bytes (:class:`.wire.PreparedPorts`) and the ``ports/`` files'
    contents. Why: the commit is the batch's serial tail and holds the cross-process lock; for 1000
    containers these were ~20 ms of its ~150. Entries serve only the :class:`PortFw` object they were
    made from."""

    def __init__(self, *, rules: bool = True, files: bool = True) -> None:
        self.rules = wire.PreparedPorts() if rules else None
        self._files: dict[PortKey, tuple[PortFw, bytes]] | None = {} if files else None

    def add(self, pf: PortFw) -> None:
        if self.rules is not None:
            self.rules.add(pf)
        if self._files is not None:
            self._files[pf.key] = (pf, _port_file(pf))

    def file(self, pf: PortFw) -> bytes:
        entry = self._files.get(pf.key) if self._files is not None else None
        return entry[1] if entry is not None and entry[0] is pf else _port_file(pf)


_stamp_lock = threading.Lock()
_last_stamp = 0


def _next_stamp() -> int:
    """Strictly increasing ns mtimes: reload replays files in write order, and file timestamps
    taken by the kernel are coarse (a whole batch of files would share one tick)."""
    global _last_stamp
    with _stamp_lock:
        _last_stamp = max(time.time_ns(), _last_stamp + 1)
        return _last_stamp


@dataclass
class _StateJournal:
    """Files changed before the transaction, with what they held, so a failure can put them back."""

    before: list[tuple[str, bytes | None]] = field(default_factory=list)

    def write(self, directory: str, name: str, data: bytes, *, only_if_missing: bool = False,
              dir_fd: int | None = None) -> None:
        """Create or replace ``directory/name`` (os-level calls relative to an open directory: 1000
        port files must cost milliseconds, not the half second pathlib/io take here). New files are
        created with O_EXCL, so only a file that existed before is read for the rollback."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
        where = name if dir_fd is not None else f"{directory}/{name}"
        try:
            fd = os.open(where, flags | os.O_EXCL, 0o644, dir_fd=dir_fd)
            self.before.append((f"{directory}/{name}", None))
        except FileExistsError:
            if only_if_missing:
                return  # netavark: "net config file already exists no need to write the same stuff again"
            with open(f"{directory}/{name}", "rb") as fh:
                self.before.append((f"{directory}/{name}", fh.read()))
            fd = os.open(where, flags | os.O_TRUNC, 0o644, dir_fd=dir_fd)
        try:
            os.write(fd, data)
            stamp = _next_stamp()
            os.utime(fd, ns=(stamp, stamp))
        finally:
            os.close(fd)

    def remove(self, path: pathlib.Path) -> None:
        try:
            with open(path, "rb") as fh:
                old = fh.read()
        except FileNotFoundError:
            return
        self.before.append((str(path), old))
        path.unlink(missing_ok=True)

    def rollback(self) -> None:
        for path, data in reversed(self.before):
            try:
                if data is None:
                    os.unlink(path)
                else:
                    pathlib.Path(path).write_bytes(data)
            except FileNotFoundError:
                pass
            except OSError as exc:  # best effort: the nft error is what the caller must see
                log.warning("could not restore firewall state file %s: %s", path, exc)


def _read_json_files(directory: pathlib.Path, keep: Callable[[str], bool] | None = None
                     ) -> list[tuple[str, dict[str, Any]]]:
    """(file name, content) in creation order (mtime, then name): replays follow setup order."""
    try:
        entries = [e for e in os.scandir(directory) if e.is_file() and not e.name.startswith(".")
                   and (keep is None or keep(e.name))]
    except FileNotFoundError:
        return []
    entries.sort(key=lambda e: (e.stat().st_mtime_ns, e.name))
    out = []
    for e in entries:
        try:
            with open(e.path, "rb") as fh:
                out.append((e.name, orjson.loads(fh.read())))
        except (OSError, orjson.JSONDecodeError) as exc:
            raise FirewallError(f"read firewall config {e.path}: {exc}") from None
    return out


def read_state(config_dir: pathlib.Path, *, network_ids: set[str] | None = None
               ) -> tuple[list[NetworkFw], list[PortFw]]:
    """The networks and container port forwards recorded by setups (netavark's ``read_fw_config``),
    optionally only those of some networks (files are named after the network id)."""
    fw = config_dir / FIREWALL_DIR
    keep = None if network_ids is None else (lambda name: name.split("_", 1)[0] in network_ids)
    raw_nets = _read_json_files(fw / NETWORKS_DIR, keep)
    raw_ports = _read_json_files(fw / PORTS_DIR, keep)

    # the network file has no name and no gateways; netavark keeps those in the port files
    port_info: dict[str, dict[str, Any]] = {}
    for fname, p in raw_ports:
        nid = p.get("network_id") or fname.split("_", 1)[0]
        port_info.setdefault(nid, p)

    networks: dict[str, NetworkFw] = {}
    for fname, n in raw_nets:
        nid = n.get("network_id") or fname
        info = port_info.get(nid, {})
        networks[nid] = NetworkFw(
            network_id=nid,
            network_name=info.get("network_name") or "",
            bridge=n.get("bridge_name") or "",
            subnets=tuple(ipaddress.ip_network(s) for s in n.get("subnets") or ()),
            gateways=tuple(ipaddress.ip_address(g) for g in info.get("dns_server_ips") or ()),
            isolation=Isolation(n.get("isolation") or "Never"),
        )

    ports: list[PortFw] = []
    for fname, p in raw_ports:
        nid = p.get("network_id") or fname.split("_", 1)[0]
        ipv4 = _interface(p.get("container_ip_v4"), p.get("subnet_v4"))
        ipv6 = _interface(p.get("container_ip_v6"), p.get("subnet_v6"))
        net = networks.get(nid) or NetworkFw(
            network_id=nid, network_name=p.get("network_name") or "", bridge="",
            subnets=tuple(i.network for i in (ipv4, ipv6) if i is not None),
            gateways=tuple(ipaddress.ip_address(g) for g in p.get("dns_server_ips") or ()))
        mappings = p.get("port_mappings")
        ports.append(PortFw(
            network=net,
            container_id=p.get("container_id") or fname.split("_", 1)[-1],
            container_name="",
            ipv4=ipv4,  # type: ignore[arg-type]
            ipv6=ipv6,  # type: ignore[arg-type]
            port_mappings=None if mappings is None else tuple(
                parse_port_mapping(m, f"{PORTS_DIR}/{fname}.port_mappings[{i}]")
                for i, m in enumerate(mappings)),
            dns_port=int(p.get("dns_port") or 53),
        ))
    return list(networks.values()), ports


def _interface(ip: str | None, subnet: str | None) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface | None:
    if not ip:
        return None
    if subnet:
        return ipaddress.ip_interface(f"{ip}/{ipaddress.ip_network(subnet).prefixlen}")
    return ipaddress.ip_interface(ip)


# --------------------------------------------------------------------------------------------------
# the drivers


@dataclass
class CommitStats:
    """What the last transaction cost (the benchmark reports these)."""

    read_s: float = 0.0
    plan_s: float = 0.0
    apply_s: float = 0.0
    total_s: float = 0.0
    rules_before: int = 0
    commands: int = 0
    prepared_blocks: int = 0  # containers' port rules (per family) encoded before the commit


class NftablesFirewall:
    """netavark's nftables driver, one transaction per :meth:`commit`."""

    driver_name = "nftables"
    log_message = LOG_USING_NFTABLES

    def __init__(self, host_netns: Netns, config_dir: pathlib.Path, *, rootless: bool = False,
                 backend: str | None = None, syntax: str = "netlink", record_handles: bool = True) -> None:
        """``backend``: None = libnftables if it loads, else the ``nft`` binary; or "library"/"cli".

        ``syntax``: how the planned commands reach the kernel — "netlink" (the library backend sends
        the bytes nft would send, encoded by :mod:`.wire`, skipping nft's parser: about half of a big
        commit; text through libnftables for anything it does not encode, and with the binary), "text"
        (rendered to nft syntax, parsed ~30% faster than JSON by libnftables 1.0.6; JSON whenever a
        command cannot be rendered) or "json" (netavark's exact wire format).

        ``record_handles`` (netlink syntax, not rootless): keep the handles of each container's port
        rules in ``<config>/firewall/handles/<network id>`` so that tearing one container down later
        deletes by handle instead of reading its network's chains (O(1) instead of O(containers)).
        """
        self.record_handles = record_handles
        if syntax not in ("netlink", "text", "json"):
            raise ValueError(f"syntax must be 'netlink', 'text' or 'json', not {syntax!r}")
        self.syntax = syntax
        self.host_netns = host_netns
        self.config_dir = pathlib.Path(config_dir)
        self.rootless = rootless
        self.transactions = 0
        self.last_stats = CommitStats()
        self._backend_choice = backend
        self._backend: _Backend | None = None
        self._backend_lock = threading.Lock()
        self._count_lock = threading.Lock()

    # -- public API ---------------------------------------------------------------------------------

    def preparer(self) -> Prepared | None:
        """Somewhere to put a batch's containers as they become ready (see :class:`Prepared`); None
        when nothing of it would be used (text/JSON syntax through libnftables, and rootless)."""
        if self.syntax != "netlink" and self.rootless:
            return None
        return Prepared(rules=self.syntax == "netlink", files=not self.rootless)

    async def commit(self, *, setup_networks: Sequence[NetworkFw] = (), setup_ports: Sequence[PortFw] = (),
                     teardown_ports: Sequence[PortFw] = (), teardown_networks: Sequence[NetworkFw] = (),
                     prepared: Prepared | None = None) -> None:
        """Apply everything one engine call needs as ONE transaction (or raise and apply nothing).

        State files are written (setup) / removed (teardown) first, unless rootless, and restored if
        the transaction fails. Raises ``ConfigError`` for invalid input and
        ``FirewallError("nftables error: …")`` when nftables rejects the batch. ``prepared``: work on
        ``setup_ports`` done ahead (:meth:`preparer`).
        """
        if not (setup_networks or setup_ports or teardown_ports or teardown_networks):
            return
        for pf in (*setup_ports, *teardown_ports):  # invalid host_ip: fail before any file or lock
            for m in pf.port_mappings or ():
                parse_host_ip(m)
        await anyio.to_thread.run_sync(partial(
            self._transaction, setup_networks=tuple(setup_networks), setup_ports=tuple(setup_ports),
            teardown_ports=tuple(teardown_ports), teardown_networks=tuple(teardown_networks),
            prepared=prepared))

    async def reload(self) -> None:
        """``firewall-reload``: re-apply everything in the state files, in one transaction.

        Idempotent (port rules that exist are not added again, unlike netavark's replay), so running
        it twice, or on an intact ruleset, changes nothing; after ``nft flush ruleset`` it restores.
        """
        await anyio.to_thread.run_sync(partial(self._transaction, reload=True))

    async def read_table(self) -> Table:
        """The current table (for diagnostics and tests)."""
        def body() -> Table:
            backend = self._get_backend()
            return Table.from_json(self._in_host(backend, partial(backend.list, f"table {FAMILY} {TABLE}")))
        return await anyio.to_thread.run_sync(body)

    @property
    def backend_name(self) -> str:
        return self._get_backend().name

    # -- internals (worker thread) -------------------------------------------------------------------

    def _get_backend(self) -> _Backend:
        with self._backend_lock:
            if self._backend is None:
                self._backend = self._make_backend()
            return self._backend

    def _make_backend(self) -> _Backend:
        choice = self._backend_choice
        if choice == "cli":
            return _CliBackend(self.host_netns)
        try:
            lib = _LibBackend()
            self._in_host(lib, lib.probe)
            return lib
        except (ImportError, OSError) as exc:
            if choice == "library":
                raise FirewallError(f"nftables error: libnftables unavailable: {exc}") from None
            log.info("libnftables unavailable (%s), using the nft binary", exc)
            return _CliBackend(self.host_netns)

    def _in_host(self, backend: _Backend, fn: Callable[[], Any]) -> Any:
        if not backend.needs_setns or self.host_netns.path is None:
            return fn()
        fd = self.host_netns.open()
        try:
            return run_in_netns_sync(fd, fn)
        finally:
            os.close(fd)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Cross-process (and cross-thread: one open file description each) exclusive lock."""
        fw = self.config_dir / FIREWALL_DIR
        try:
            fw.mkdir(parents=True, exist_ok=True)
            fd = os.open(fw / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise FirewallError(f"nftables error: lock {fw / LOCK_FILE}: {io_error_text(exc)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def _transaction(self, *, setup_networks: tuple[NetworkFw, ...] = (),
                     setup_ports: tuple[PortFw, ...] = (), teardown_ports: tuple[PortFw, ...] = (),
                     teardown_networks: tuple[NetworkFw, ...] = (), reload: bool = False,
                     prepared: Prepared | None = None) -> None:
        backend = self._get_backend()
        with self._locked():
            journal = _StateJournal()
            try:
                if reload:
                    networks, ports = read_state(self.config_dir)
                    setup_networks, setup_ports = tuple(networks), tuple(ports)
                    if not (setup_networks or setup_ports):
                        return
                elif not self.rootless:
                    self._update_state(journal, setup_networks, setup_ports, teardown_ports,
                                       teardown_networks, prepared)
                self._in_host(backend, partial(
                    self._read_plan_apply, backend, prepared.rules if prepared else None,
                    setup_networks=setup_networks, setup_ports=setup_ports, teardown_ports=teardown_ports,
                    teardown_networks=teardown_networks, skip_existing_port_rules=reload))
            except BaseException:
                journal.rollback()
                raise

    def _read_plan_apply(self, backend: _Backend, prepared: wire.PreparedPorts | None = None, *,
                         use_hints: bool = True, **plan_args: Any) -> None:
        stats = CommitStats()
        record = backend.selective and not self.rootless and self.record_handles
        t0 = time.perf_counter()
        with _gc_paused():
            if backend.selective:
                table = _read_index(backend, with_handle=record)
                hints = self._load_hints(table, plan_args) if record and use_hints else {}
                _read_chains(backend, table, chains_to_read(**plan_args, handle_hints=hints))
            else:
                table, hints = Table.from_json(backend.list(f"table {FAMILY} {TABLE}")), {}
            t1 = time.perf_counter()
            plan = build_plan(table, **plan_args, handle_hints=hints)
            n_cmds = len(plan)
            t2 = time.perf_counter()
            handles: wire.Handles | None = None
            if n_cmds:
                try:
                    handles = backend.apply(plan, syntax=self.syntax, existing_chains=set(table.chains),
                                            record=record and plan.has_owners, prepared=prepared)
                except FirewallError:
                    if not hints:
                        raise
                    # a recorded handle may have been deleted behind our back (ENOENT fails the batch):
                    # nothing was applied, so plan again from the chains' contents
                    log.info("retrying the firewall transaction without recorded rule handles")
                    self._read_plan_apply(backend, prepared, use_hints=False, **plan_args)
                    return
                with self._count_lock:
                    self.transactions += 1
        if n_cmds and record:
            located = self._locate_others(table, plan_args, hints)
            self._update_handle_files(backend, plan, handles, plan_args, table, located)
        t3 = time.perf_counter()
        stats.read_s, stats.plan_s, stats.apply_s, stats.total_s = t1 - t0, t2 - t1, t3 - t2, t3 - t0
        stats.rules_before, stats.commands = len(table), n_cmds
        stats.prepared_blocks = prepared.used if prepared is not None else 0
        self.last_stats = stats

    # -- recorded rule handles ----------------------------------------------------------------------

    def _handles_path(self, network_id: str) -> pathlib.Path:
        return self.config_dir / FIREWALL_DIR / HANDLES_DIR / network_id

    def _read_handle_file(self, network_id: str, table_handle: int | None) -> dict[str, Any]:
        """``{container id: {"chains": {name: handle}, "rules": [[chain, handle], …]}}`` recorded for
        this table; empty when missing, unreadable or written for another (older) table."""
        try:
            data = orjson.loads(self._handles_path(network_id).read_bytes())
            if table_handle is not None and data.get("table") == table_handle:
                return dict(data["containers"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return {}

    def _load_hints(self, table: Table, plan_args: dict[str, Any]) -> dict[PortKey, list[RuleRef]]:
        """Recorded handles of containers torn down one by one, if the table and their chains are the
        same objects as when they were recorded (handles are never reused within a table's life)."""
        torn = {n.network_id for n in plan_args.get("teardown_networks", ())}
        files: dict[str, dict[str, Any]] = {}
        hints: dict[PortKey, list[RuleRef]] = {}
        for pf in plan_args.get("teardown_ports", ()):
            nid = pf.network.network_id
            if not pf.port_mappings or nid in torn:
                continue
            if nid not in files:
                files[nid] = self._read_handle_file(nid, table.handle)
            entry = files[nid].get(pf.container_id)
            try:
                if entry and all(table.chains.get(c) == h for c, h in entry["chains"].items()):
                    hints[pf.key] = [(str(c), int(h)) for c, h in entry["rules"]]
            except (KeyError, TypeError, ValueError, AttributeError):
                continue
        return hints

    def _locate_others(self, table: Table, plan_args: dict[str, Any],
                       hints: dict[PortKey, list[RuleRef]]) -> dict[PortKey, list[RuleRef]]:
        """After a per-container teardown that read its network's chains by structure (no record):
        locate every other container of that network in what was read, from their state files."""
        torn = {n.network_id for n in plan_args.get("teardown_networks", ())}
        nets = {pf.network.network_id for pf in plan_args.get("teardown_ports", ())
                if pf.port_mappings and pf.network.network_id not in torn and pf.key not in hints}
        if not nets:
            return {}
        gone = {pf.key for pf in plan_args.get("teardown_ports", ())}
        try:
            _networks, ports = read_state(self.config_dir, network_ids=nets)
        except (AsyncnetError, ValueError) as exc:
            log.debug("cannot locate other containers' rules: %s", exc)
            return {}
        return locate_port_rules(table, [pf for pf in ports if pf.key not in gone and pf.port_mappings])

    def _update_handle_files(self, backend: _Backend, plan: Plan, handles: wire.Handles | None,
                             plan_args: dict[str, Any], table: Table,
                             located: dict[PortKey, list[RuleRef]]) -> None:
        """After a successful transaction: forget the torn-down containers, record the new ones.

        One file per network (a batch of 1000 containers writes one file, not 1000). Best effort: a
        missing record only means a later teardown searches the chains by structure.
        """
        refs: dict[PortKey, list[RuleRef]] = {k: list(v) for k, v in (*located.items(), *plan.kept.items())}
        if handles is not None:
            added = handles.rules
            for start, count, key in plan.owner_ranges():
                refs.setdefault(key, []).extend([added[i] for i in range(start, start + count)])
        drop: dict[str, set[str]] = {}
        for pf in plan_args.get("teardown_ports", ()):
            drop.setdefault(pf.network.network_id, set()).add(pf.container_id)
        gone = {n.network_id for n in plan_args.get("teardown_networks", ())}
        touched = set(drop) | {k[0] for k in refs} | gone
        if not touched:
            return
        after: Table | None = None
        if handles is not None and table.handle is not None:
            # the batch's new chains were numbered with its rules: no need to read them back
            after = Table(exists=True, chains={**table.chains, **handles.chains}, handle=table.handle)
        elif handles is not None:  # a new table: only its handle is unknown
            after = Table(exists=True, chains={**table.chains, **handles.chains}, handle=backend.table_handle())
        elif plan.has_owners or plan.kept:
            after = _read_index(backend, with_handle=True)
        chains_now = (after if after is not None else table).chains  # a teardown keeps the chains
        directory = self.config_dir / FIREWALL_DIR / HANDLES_DIR
        by_network: dict[str, list[tuple[str, list[RuleRef]]]] = {}
        for (nid, cid), rules in refs.items():
            by_network.setdefault(nid, []).append((cid, rules))
        th = after.handle if after is not None else table.handle
        try:
            directory.mkdir(parents=True, exist_ok=True)
            for nid in touched:
                path = self._handles_path(nid)
                current = {} if nid in gone else self._read_handle_file(nid, th)
                for cid in drop.get(nid, ()):
                    current.pop(cid, None)
                for cid, rules in by_network.get(nid, ()) if th is not None else ():
                    old = current.get(cid)
                    merged = list(dict.fromkeys([*map(tuple, old.get("rules", ())), *rules])) if old else rules
                    # (a repeated setup duplicates rules, netavark's too: remember them all)
                    current[cid] = {"chains": {c: chains_now.get(c) for c in dict.fromkeys(c for c, _h in merged)},
                                    "rules": merged}
                if not current:
                    path.unlink(missing_ok=True)
                    continue
                tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
                tmp.write_bytes(orjson.dumps({"table": th, "containers": current}))
                os.replace(tmp, path)
        except OSError as exc:
            log.warning("could not record firewall rule handles: %s", exc)

    def _update_state(self, journal: _StateJournal, setup_networks: Sequence[NetworkFw],
                      setup_ports: Sequence[PortFw], teardown_ports: Sequence[PortFw],
                      teardown_networks: Sequence[NetworkFw], prepared: Prepared | None = None) -> None:
        fw = self.config_dir / FIREWALL_DIR
        try:
            for pf in teardown_ports:
                journal.remove(fw / PORTS_DIR / f"{pf.network.network_id}_{pf.container_id}")
            for net in teardown_networks:
                journal.remove(fw / NETWORKS_DIR / net.network_id)
            if setup_networks or setup_ports:
                (fw / NETWORKS_DIR).mkdir(parents=True, exist_ok=True)
                (fw / PORTS_DIR).mkdir(parents=True, exist_ok=True)
                journal.write(str(fw), DRIVER_FILE, self.driver_name.encode())
                dns_ports: dict[str, int] = {}
                for pf in setup_ports:
                    dns_ports.setdefault(pf.network.network_id, pf.dns_port)
                nets = {n.network_id: n for n in setup_networks}
                for pf in setup_ports:
                    nets.setdefault(pf.network.network_id, pf.network)
                for nid, net in nets.items():
                    journal.write(str(fw / NETWORKS_DIR), nid,
                                  orjson.dumps(network_state(net, dns_ports.get(nid, 53))), only_if_missing=True)
                ports_dir = str(fw / PORTS_DIR)
                dir_fd = os.open(ports_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    write = journal.write
                    contents = prepared.file if prepared is not None else _port_file
                    for pf in setup_ports:
                        write(ports_dir, f"{pf.network.network_id}_{pf.container_id}", contents(pf),
                              dir_fd=dir_fd)
                finally:
                    os.close(dir_fd)
        except OSError as exc:
            raise FirewallError(f"write firewall config: {io_error_text(exc)}") from None


def _read_index(backend: _Backend, *, with_handle: bool = False) -> Table:
    """The chains' names and handles (no rules), and the table's handle when asked: tiny reads.

    Runs in the host netns thread (the GETTABLE socket is opened there)."""
    table = Table(loaded=set())
    raw = backend.list(f"chains {FAMILY}")
    if raw is not None:
        table.merge_json(raw)
    if with_handle:
        table.handle = backend.table_handle()
        table.exists = table.exists or table.handle is not None
    return table


def _read_chains(backend: _Backend, table: Table, needed: set[str]) -> None:
    """netavark's "one read of the table", reduced to the chains the plan looks into."""
    for name in sorted(needed):
        if name not in table.chains:
            continue  # does not exist (yet): the planner creates it
        raw = backend.list(f"chain {FAMILY} {TABLE} {name}")
        if raw is None:  # deleted behind our back between the two reads
            del table.chains[name]
            continue
        table.merge_json(raw)
        table.loaded.add(name)  # type: ignore[union-attr]


class NoFirewall:
    """Driver ``none``: no rules, no state files (netavark's ``fwnone``)."""

    driver_name = "none"
    log_message = LOG_NO_FIREWALL

    def __init__(self, host_netns: Netns | None = None, config_dir: pathlib.Path | None = None, *,
                 rootless: bool = False) -> None:
        self.host_netns = host_netns
        self.config_dir = config_dir
        self.rootless = rootless
        self.transactions = 0
        self.last_stats = CommitStats()

    def preparer(self) -> Prepared | None:
        return None

    async def commit(self, *, setup_networks: Sequence[NetworkFw] = (), setup_ports: Sequence[PortFw] = (),
                     teardown_ports: Sequence[PortFw] = (), teardown_networks: Sequence[NetworkFw] = (),
                     prepared: Prepared | None = None) -> None:
        return None

    async def reload(self) -> None:
        return None


Firewall = NftablesFirewall | NoFirewall

FIREWALL_DRIVERS = ("nftables", "iptables", "firewalld", "none")


def firewall_driver(name: str | None, host_netns: Netns | None = None,
                    config_dir: pathlib.Path | None = None, *, rootless: bool = False) -> Firewall:
    """``--firewall-driver`` / ``NETAVARK_FW``: nftables (default) or none, case-insensitive.

    ``iptables`` and ``firewalld`` are valid netavark names that asyncnet does not implement.
    """
    key = "nftables" if name is None or name == "" else name.lower()
    if key not in FIREWALL_DRIVERS:
        raise ConfigError(f"Must provide a valid firewall backend, got {name}")
    if key == "none":
        return NoFirewall(host_netns, config_dir, rootless=rootless)
    if key != "nftables":
        raise FirewallError(f"firewall driver {key} is not supported by asyncnet (use nftables or none)")
    if config_dir is None:
        raise ConfigError("the nftables firewall driver needs a config directory")
    return NftablesFirewall(host_netns or Netns(None), config_dir, rootless=rootless)
