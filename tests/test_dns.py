"""aardvark-dns driven by asyncnet.dns: real daemon, real queries with dig from container namespaces.

The network side (bridge with the gateway addresses in the sandbox host, veths into container
namespaces) is built here with plain ``ip`` commands, so these tests depend on nothing but dns.py.
Every address lives inside sandbox namespaces; the daemon runs in ``sandbox.host``.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from asyncnet.dns import (
    PID_FILE,
    Aardvark,
    DnsEntry,
    DnsError,
    DnsNetwork,
    NetworkFile,
    entry_line,
    network_header,
)
from asyncnet.netns import Netns
from asyncnet.sandbox import Sandbox

BINARY = "/usr/lib/podman/aardvark-dns"

pytestmark = pytest.mark.anyio

needs_aardvark = pytest.mark.skipif(not os.access(BINARY, os.X_OK), reason=f"{BINARY} not installed")
needs_dig = pytest.mark.skipif(not any(os.access(os.path.join(p, "dig"), os.X_OK)
                                       for p in os.environ.get("PATH", "/usr/bin").split(":")),
                               reason="dig (bind9-dnsutils) not installed")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# ---------------------------------------------------------------------------------------------------
# the network side, by hand


@dataclass
class Ctr:
    ns: str
    cid: str
    v4: ipaddress.IPv4Address
    v6: ipaddress.IPv6Address | None


@dataclass
class Net:
    """A bridge ``dnsbr<idx>`` in the sandbox host: 10.89.<idx>.1/24 (+ fd89:<idx>::1/64)."""

    sb: Sandbox
    idx: int
    dual: bool = True
    up: bool = True

    def __post_init__(self) -> None:
        if not self.up:
            return
        cmds = [f"link add {self.bridge} type bridge",
                f"addr add {self.gw4}/24 dev {self.bridge}",
                f"link set {self.bridge} up"]
        if self.dual:
            # no DAD: a tentative address cannot be bound, and aardvark-dns would skip the listener
            cmds.insert(2, f"addr add {self.gw6}/64 dev {self.bridge} nodad")
        self.sb.run(["ip", "-batch", "-"], input="\n".join(cmds) + "\n")

    @property
    def name(self) -> str:
        return f"dnsnet{self.idx}"

    @property
    def bridge(self) -> str:
        return f"dnsbr{self.idx}"

    @property
    def gw4(self) -> ipaddress.IPv4Address:
        return ipaddress.IPv4Address(f"10.89.{self.idx}.1")

    @property
    def gw6(self) -> ipaddress.IPv6Address:
        return ipaddress.IPv6Address(f"fd89:{self.idx}::1")

    def dns(self, servers: Sequence[str] = ()) -> DnsNetwork:
        gws = (self.gw4, self.gw6) if self.dual else (self.gw4,)
        return DnsNetwork(self.name, gws, tuple(ipaddress.ip_address(s) for s in servers))

    def containers(self, hosts: Sequence[int]) -> list[Ctr]:
        """Container namespaces with eth0 on this bridge; host numbers 2..254 (one veth batch)."""
        ctrs, host_cmds = [], []
        for h in hosts:
            ns = self.sb.netns(f"n{self.idx}c{h}")
            veth = f"vd{self.idx}c{h}"
            host_cmds += [f"link add {veth} type veth peer name eth0 netns {ns}",
                          f"link set {veth} master {self.bridge} up"]
            ctrs.append(Ctr(ns, f"{self.idx:02x}{h:04x}" + "ab" * 29,
                            ipaddress.IPv4Address(f"10.89.{self.idx}.{h}"),
                            ipaddress.IPv6Address(f"fd89:{self.idx}::{h:x}") if self.dual else None))
        self.sb.run(["ip", "-batch", "-"], input="\n".join(host_cmds) + "\n")
        for c in ctrs:
            cmds = [f"addr add {c.v4}/24 dev eth0", "link set eth0 up", "link set lo up",
                    f"route add default via {self.gw4}"]
            if c.v6 is not None:
                cmds.insert(1, f"addr add {c.v6}/64 dev eth0 nodad")
            self.sb.run(["ip", "-batch", "-"], c.ns, input="\n".join(cmds) + "\n")
        return ctrs

    def entry(self, c: Ctr, *names: str, dns_servers: Sequence[str] = (),
              servers: Sequence[str] = ()) -> DnsEntry:
        return DnsEntry(self.dns(servers), c.cid, (c.v4,), (c.v6,) if c.v6 is not None else (), tuple(names),
                        tuple(ipaddress.ip_address(s) for s in dns_servers))


def dig_status(sb: Sandbox, ns: str, server: object, name: str, qtype: str = "A", port: int = 53,
               wait: int = 2) -> tuple[str, list[str]]:
    """(response status, answer data); status "no reply" when no server answered at all."""
    out = sb.run(["dig", "+noall", "+comments", "+answer", f"+time={wait}", "+tries=1", "-p", str(port),
                  f"@{server}", name, qtype], ns, check=False).stdout
    status = "no reply"
    answers = []
    for line in out.splitlines():
        if "->>HEADER<<-" in line:
            status = line.split("status: ", 1)[1].split(",", 1)[0]
        elif line and not line.startswith(";"):
            cols = line.split()
            if len(cols) >= 5 and cols[3] == qtype:
                answers.append(cols[4])
    return status, answers


def dig(sb: Sandbox, ns: str, server: object, name: str, qtype: str = "A", port: int = 53) -> list[str]:
    """The answer data; a reply is required (an empty answer must come from a server that answered)."""
    status, answers = dig_status(sb, ns, server, name, qtype, port)
    assert status != "no reply", f"no DNS reply from {server}:{port} for {name}"
    return answers


def dig_many(sb: Sandbox, ns: str, server: object, names: Sequence[str]) -> dict[str, list[str]]:
    """One dig process, many A queries: name -> addresses."""
    cmd = ["dig", "+noall", "+answer", "+time=2", "+tries=1", f"@{server}"]
    for n in names:
        cmd += [n, "A"]
    out: dict[str, list[str]] = {n: [] for n in names}
    for line in sb.run(cmd, ns, check=False, timeout=120).stdout.splitlines():
        cols = line.split()
        if len(cols) == 5 and cols[3] == "A":
            out.setdefault(cols[0].rstrip("."), []).append(cols[4])
    return out


def daemon_pid(a: Aardvark) -> int | None:
    try:
        return int((a.dns_dir / PID_FILE).read_text())
    except FileNotFoundError:
        return None


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def dir_listing(a: Aardvark) -> list[str]:
    return sorted(os.listdir(a.dns_dir)) if a.dns_dir.exists() else []


@pytest.fixture
async def aardvark(sandbox: Sandbox) -> AsyncIterator[Aardvark]:
    """An Aardvark serving the sandbox host; whatever a test leaves running is stopped afterwards
    (before the sandbox fixture checks that no process is left)."""
    a = Aardvark(sandbox.config_dir, BINARY, 53, Netns(sandbox.host))
    try:
        yield a
    finally:
        await a.stop()


# ---------------------------------------------------------------------------------------------------
# the file format (pure)


def test_file_format() -> None:
    net = DnsNetwork("podman1", (ipaddress.ip_address("10.88.0.1"), ipaddress.ip_address("fd10:88:a::1")),
                     (ipaddress.ip_address("1.1.1.1"), ipaddress.ip_address("8.8.8.8")))
    e = DnsEntry(net, "abc123", (ipaddress.IPv4Address("10.88.0.2"),), (ipaddress.IPv6Address("fd10:88:a::2"),),
                 ("web", "www"), (ipaddress.ip_address("9.9.9.9"),))
    assert network_header(net.gateways, net.network_dns_servers) == "10.88.0.1,fd10:88:a::1 1.1.1.1,8.8.8.8"
    assert network_header(net.gateways[:1]) == "10.88.0.1"
    assert entry_line(e) == "abc123 10.88.0.2 fd10:88:a::2 web,www 9.9.9.9"
    v4only = DnsEntry(net, "x", (ipaddress.IPv4Address("10.88.0.3"),), (), ("db",))
    assert entry_line(v4only) == "x 10.88.0.3  db"  # empty v6 field kept: the parser splits on single spaces

    f = NetworkFile.parse("10.88.0.1 1.1.1.1\nabc 10.88.0.2  a\nabcd 10.88.0.3  b\n")
    assert f.gateways == (ipaddress.ip_address("10.88.0.1"),)
    del f.entries["abc"]  # exact id match: "abcd" stays (netavark's substring match would drop both)
    assert f.render() == "10.88.0.1 1.1.1.1\nabcd 10.88.0.3  b\n"
    del f.entries["abcd"]
    assert f.render() is None


@pytest.mark.parametrize("bad", [
    dict(name="a/b"), dict(name=""), dict(name=PID_FILE), dict(cid="has space"), dict(names=("a,b",)),
    dict(names=()), dict(gateways=()),
])
async def test_invalid_entries_rejected_before_any_io(tmp_path: Path, bad: dict) -> None:
    gw = (ipaddress.ip_address("10.89.0.1"),)
    net = DnsNetwork(bad.get("name", "n"), bad.get("gateways", gw))
    e = DnsEntry(net, bad.get("cid", "c1"), (ipaddress.IPv4Address("10.89.0.2"),), (), bad.get("names", ("a",)))
    a = Aardvark(tmp_path / "cfg", binary="/nonexistent")
    with pytest.raises(DnsError):
        await a.commit(add=[e])
    assert not (tmp_path / "cfg").exists()


# ---------------------------------------------------------------------------------------------------
# resolution


@needs_aardvark
@needs_dig
async def test_resolves_name_and_alias_dual_stack(sandbox: Sandbox, aardvark: Aardvark) -> None:
    net = Net(sandbox, 1)
    web, db = net.containers([2, 3])
    await aardvark.commit(add=[net.entry(web, "web", "www"), net.entry(db, "db")])

    pid = daemon_pid(aardvark)
    assert pid is not None and alive(pid)
    assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(sandbox.host).st_ino, "must run in the host netns"

    assert dig(sandbox, db.ns, net.gw4, "web") == [str(web.v4)]
    assert dig(sandbox, db.ns, net.gw4, "www") == [str(web.v4)]
    assert dig(sandbox, db.ns, net.gw4, "web.dns.podman") == [str(web.v4)]
    assert dig(sandbox, db.ns, net.gw6, "web", "AAAA") == [str(web.v6)]
    assert dig(sandbox, db.ns, net.gw6, "www", "AAAA") == [str(web.v6)]
    assert dig(sandbox, web.ns, net.gw4, "db") == [str(db.v4)]
    assert dig(sandbox, web.ns, net.gw6, "db", "A") == [str(db.v4)]  # v4 record over the v6 listener


@needs_aardvark
@needs_dig
async def test_names_do_not_cross_networks(sandbox: Sandbox, aardvark: Aardvark) -> None:
    n1, n2 = Net(sandbox, 1, dual=False), Net(sandbox, 2, dual=False)
    [a] = n1.containers([2])
    [b] = n2.containers([2])
    await aardvark.commit(add=[n1.entry(a, "alpha"), n2.entry(b, "beta")])

    assert dig(sandbox, a.ns, n1.gw4, "alpha") == [str(a.v4)]
    assert dig(sandbox, b.ns, n2.gw4, "beta") == [str(b.v4)]
    # the other network's name is unknown here: NXDOMAIN (after the upstream forward failed)
    assert dig_status(sandbox, a.ns, n1.gw4, "beta") == ("NXDOMAIN", [])
    assert dig_status(sandbox, b.ns, n2.gw4, "alpha") == ("NXDOMAIN", [])
    # (aardvark-dns 1.4.0 scopes by listener: a container that can *route* to the other network's
    # gateway gets that network's names there; keeping it out is the firewall's isolation, not DNS)


@needs_aardvark
@needs_dig
async def test_batch_of_100_resolves_right_after_commit(sandbox: Sandbox, aardvark: Aardvark) -> None:
    """First batch starts the daemon, the second reloads it after it has answered queries (the case
    the aardvark-dns 1.4.0 SIGHUP bug is about); every name resolves as soon as commit returns."""
    net = Net(sandbox, 1, dual=False)
    ctrs = net.containers(range(2, 102))
    names = [f"ctr{i}" for i in range(len(ctrs))]
    entries = [net.entry(c, n) for c, n in zip(ctrs, names, strict=True)]

    await aardvark.commit(add=entries[:50])
    first = dig_many(sandbox, ctrs[0].ns, net.gw4, names[:50])
    assert first == {n: [str(c.v4)] for n, c in zip(names[:50], ctrs[:50], strict=True)}
    pid = daemon_pid(aardvark)

    t0 = time.monotonic()
    await aardvark.commit(add=entries[50:])
    took = time.monotonic() - t0
    got = dig_many(sandbox, ctrs[-1].ns, net.gw4, names)
    assert got == {n: [str(c.v4)] for n, c in zip(names, ctrs, strict=True)}
    assert daemon_pid(aardvark) == pid, "one reload of the running daemon, not a restart"
    assert took < 2, f"commit of 50 entries took {took:.2f}s"
    assert len(NetworkFile.parse((aardvark.dns_dir / net.name).read_text()).entries) == 100


@needs_aardvark
@needs_dig
async def test_one_container_at_a_time_after_lookups(sandbox: Sandbox, aardvark: Aardvark) -> None:
    """Commit after commit (a reload each), a lookup in between: each new name resolves at once."""
    net = Net(sandbox, 1, dual=False)
    ctrs = net.containers(range(2, 12))
    for i, c in enumerate(ctrs):
        await aardvark.commit(add=[net.entry(c, f"one{i}")])
        assert dig(sandbox, ctrs[0].ns, net.gw4, f"one{i}") == [str(c.v4)]
    assert dig(sandbox, ctrs[-1].ns, net.gw4, "one0") == [str(ctrs[0].v4)]


@needs_aardvark
@needs_dig
async def test_concurrent_commits_serialise_on_the_lock(sandbox: Sandbox) -> None:
    """Two engines on one config directory (as two netavark processes would be): one daemon, both
    networks' entries."""
    n1, n2 = Net(sandbox, 1, dual=False), Net(sandbox, 2, dual=False)
    [a] = n1.containers([2])
    [b] = n2.containers([2])
    e1 = Aardvark(sandbox.config_dir, BINARY, 53, Netns(sandbox.host))
    e2 = Aardvark(sandbox.config_dir, BINARY, 53, Netns(sandbox.host))
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: e1.commit(add=[n1.entry(a, "alpha")]))
            tg.start_soon(lambda: e2.commit(add=[n2.entry(b, "beta")]))
        assert dig(sandbox, a.ns, n1.gw4, "alpha") == [str(a.v4)]
        assert dig(sandbox, b.ns, n2.gw4, "beta") == [str(b.v4)]
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit() and alive(int(p))
                and _cmdline(int(p)).startswith(BINARY)
                and str(e1.dns_dir) in _cmdline(int(p))]
        assert pids == [daemon_pid(e1)]
    finally:
        await e1.stop()


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------------
# DNS servers


@needs_aardvark
async def test_dns_servers_written_where_netavark_writes_them(sandbox: Sandbox, aardvark: Aardvark) -> None:
    net = Net(sandbox, 1)
    web, db = net.containers([2, 3])
    await aardvark.commit(add=[net.entry(web, "web", "www", dns_servers=["9.9.9.9", "2620:fe::fe"],
                                         servers=["1.1.1.1", "2606:4700:4700::1111"]),
                               net.entry(db, "db", servers=["1.1.1.1", "2606:4700:4700::1111"])])
    assert (aardvark.dns_dir / net.name).read_text() == (
        "10.89.1.1,fd89:1::1 1.1.1.1,2606:4700:4700::1111\n"
        f"{web.cid} 10.89.1.2 fd89:1::2 web,www 9.9.9.9,2620:fe::fe\n"
        f"{db.cid} 10.89.1.3 fd89:1::3 db\n")


@needs_aardvark
@needs_dig
async def test_update_network_dns_servers(sandbox: Sandbox, aardvark: Aardvark) -> None:
    net = Net(sandbox, 1)
    [web] = net.containers([2])
    await aardvark.commit(add=[net.entry(web, "web")])
    path = aardvark.dns_dir / net.name
    body = f"{web.cid} 10.89.1.2 fd89:1::2 web\n"
    assert path.read_text() == "10.89.1.1,fd89:1::1\n" + body
    pid = daemon_pid(aardvark)

    await aardvark.update_network_dns_servers(net.name, ["8.8.8.8", "fd00::53"])
    assert path.read_text() == "10.89.1.1,fd89:1::1 8.8.8.8,fd00::53\n" + body
    await aardvark.update_network_dns_servers(net.name, ["1.0.0.1"])
    assert path.read_text() == "10.89.1.1,fd89:1::1 1.0.0.1\n" + body
    await aardvark.update_network_dns_servers(net.name, [""])  # netavark's way to clear them
    assert path.read_text() == "10.89.1.1,fd89:1::1\n" + body
    assert daemon_pid(aardvark) == pid and pid is not None and alive(pid)
    assert dig(sandbox, web.ns, net.gw4, "web") == [str(web.v4)]

    with pytest.raises(DnsError, match="invalid IP address"):
        await aardvark.update_network_dns_servers(net.name, ["not-an-ip"])
    await aardvark.update_network_dns_servers("no-such-network", ["8.8.8.8"])  # no file: nothing to do
    assert dir_listing(aardvark) == sorted([PID_FILE, net.name])
    missing = Aardvark(sandbox.config_dir, "/nonexistent/aardvark-dns", 53, Netns(sandbox.host))
    await missing.update_network_dns_servers(net.name, ["8.8.8.8"])  # not installed: no-op
    assert path.read_text() == "10.89.1.1,fd89:1::1\n" + body


# ---------------------------------------------------------------------------------------------------
# port, teardown, recovery


@needs_aardvark
@needs_dig
async def test_alternative_dns_port(sandbox: Sandbox) -> None:
    net = Net(sandbox, 1)
    web, db = net.containers([2, 3])
    a = Aardvark(sandbox.config_dir, BINARY, 1153, Netns(sandbox.host))
    try:
        await a.commit(add=[net.entry(web, "web"), net.entry(db, "db")])
        assert dig(sandbox, db.ns, net.gw4, "web", port=1153) == [str(web.v4)]
        assert dig(sandbox, db.ns, net.gw6, "web", "AAAA", port=1153) == [str(web.v6)]
        listening = sandbox.run(["ss", "-Hlnu"]).stdout
        assert "10.89.1.1:1153" in listening and "10.89.1.1:53 " not in listening
    finally:
        await a.stop()


@needs_aardvark
@needs_dig
async def test_teardown_of_last_entry_stops_daemon_and_leaves_nothing(sandbox: Sandbox,
                                                                       aardvark: Aardvark) -> None:
    n1, n2 = Net(sandbox, 1), Net(sandbox, 2, dual=False)
    web, db = n1.containers([2, 3])
    [other] = n2.containers([2])
    await aardvark.commit(add=[n1.entry(web, "web"), n1.entry(db, "db"), n2.entry(other, "other")])
    pid = daemon_pid(aardvark)
    assert pid is not None

    await aardvark.commit(remove=[(n1.name, web.cid), (n2.name, other.cid)])
    assert daemon_pid(aardvark) == pid and alive(pid)
    assert dir_listing(aardvark) == sorted([PID_FILE, n1.name])
    assert dig(sandbox, db.ns, n1.gw4, "db") == [str(db.v4)]
    assert "web" not in (aardvark.dns_dir / n1.name).read_text()
    assert "10.89.2.1:53" not in sandbox.run(["ss", "-Hlnu"]).stdout  # n2's listener went with its file

    await aardvark.commit(remove=[(n1.name, db.cid), (n1.name, "never-added")])
    assert not alive(pid)
    assert dir_listing(aardvark) == []
    assert sorted(os.listdir(sandbox.config_dir)) == ["aardvark-dns", "aardvark.lock"]  # no temp files
    await aardvark.commit(remove=[(n1.name, db.cid)])  # idempotent


@needs_aardvark
@needs_dig
async def test_recovers_from_dead_daemon_and_stale_pid_file(sandbox: Sandbox, aardvark: Aardvark) -> None:
    net = Net(sandbox, 1, dual=False)
    a, b, c = net.containers([2, 3, 4])
    await aardvark.commit(add=[net.entry(a, "a1")])
    pid = daemon_pid(aardvark)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    while alive(pid):  # noqa: ASYNC110 - a foreign process: no event to wait on
        await anyio.sleep(0.01)
    await aardvark.commit(add=[net.entry(b, "b1")])
    new = daemon_pid(aardvark)
    assert new not in (None, pid)
    assert dig(sandbox, a.ns, net.gw4, "b1") == [str(b.v4)]

    # a pid file naming a live process that is not our daemon (here: pytest itself) must not be signalled
    await aardvark.stop()
    (aardvark.dns_dir / PID_FILE).write_text(str(os.getpid()))
    await aardvark.commit(add=[net.entry(c, "c1")])
    assert daemon_pid(aardvark) != os.getpid()
    assert dig(sandbox, a.ns, net.gw4, "c1") == [str(c.v4)]


# ---------------------------------------------------------------------------------------------------
# errors


@needs_aardvark
async def test_error_binary_not_executable(sandbox: Sandbox, tmp_path: Path) -> None:
    net = Net(sandbox, 1, dual=False)
    [c] = net.containers([2])
    not_exec = tmp_path / "a-directory"
    not_exec.mkdir()
    a = Aardvark(sandbox.config_dir, str(not_exec), 53, Netns(sandbox.host))
    with pytest.raises(DnsError) as info:
        await a.commit(add=[net.entry(c, "c")])
    assert str(info.value) == f"aardvark-dns failed to start: Failed to find executable {not_exec}"
    assert dir_listing(a) == []


async def test_error_binary_exits_at_once(sandbox: Sandbox) -> None:
    net = Net(sandbox, 1)
    [c] = net.containers([2])
    a = Aardvark(sandbox.config_dir, "/usr/bin/false", 53, Netns(sandbox.host))
    with pytest.raises(DnsError) as info:
        await a.commit(add=[net.entry(c, "c")])
    assert str(info.value) == ("error while applying dns entries: IO error: "
                               "aardvark-dns exited unexpectedly without error message")
    assert dir_listing(a) == []
    assert sorted(os.listdir(sandbox.config_dir)) == ["aardvark-dns", "aardvark.lock"]


@needs_aardvark
@needs_dig
async def test_bind_failure_rolls_back_only_the_failed_commit(sandbox: Sandbox) -> None:
    """A gateway the daemon cannot bind (here: no such address in the host) fails the commit like
    newer aardvark-dns does; the files are restored and the earlier network keeps resolving."""
    good = Net(sandbox, 1, dual=False)
    ghost = Net(sandbox, 7, dual=False, up=False)  # no bridge: 10.89.7.1 exists nowhere
    [a] = good.containers([2])
    [b] = Net(sandbox, 8, dual=False).containers([2])  # some namespace; never reached
    dns = Aardvark(sandbox.config_dir, BINARY, 53, Netns(sandbox.host), ready_timeout=0.5)
    try:
        await dns.commit(add=[good.entry(a, "alpha")])
        before = (dns.dns_dir / good.name).read_text()
        with pytest.raises(DnsError) as info:
            await dns.commit(add=[ghost.entry(b, "ghost")])
        assert str(info.value) == ("error while applying dns entries: IO error: "
                                   "failed to bind udp listener on 10.89.7.1:53")
        assert dir_listing(dns) == sorted([PID_FILE, good.name])
        assert (dns.dns_dir / good.name).read_text() == before
        assert dig(sandbox, a.ns, good.gw4, "alpha") == [str(a.v4)]
    finally:
        await dns.stop()


@needs_aardvark
async def test_teardown_removals_stand_when_the_daemon_cannot_be_restarted(sandbox: Sandbox,
                                                                          aardvark: Aardvark) -> None:
    """Setup is all-or-nothing; teardown is not: its entries go even if DNS for the rest is broken."""
    net = Net(sandbox, 1, dual=False)
    a, b = net.containers([2, 3])
    await aardvark.commit(add=[net.entry(a, "a1"), net.entry(b, "b1")])
    pid = daemon_pid(aardvark)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    while alive(pid):  # noqa: ASYNC110 - a foreign process: no event to wait on
        await anyio.sleep(0.01)

    broken = Aardvark(sandbox.config_dir, "/usr/bin/false", 53, Netns(sandbox.host))
    with pytest.raises(DnsError, match="exited unexpectedly without error message"):
        await broken.commit(remove=[(net.name, a.cid)])
    text = (aardvark.dns_dir / net.name).read_text()
    assert a.cid not in text and b.cid in text
    await broken.commit(remove=[(net.name, b.cid)])  # the last one: nothing to start, no error
    assert dir_listing(aardvark) == []
