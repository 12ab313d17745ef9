"""Real packets through netavark's ruleset: port forwarding, hairpin, isolation, masquerade, reload.

Everything runs through the engine (bridge driver + nftables firewall) inside the sandbox: servers are
small Python programs in container namespaces that answer "<tag> <local port> <peer address>", so a
test sees both which container/port a forwarded connection reached and what source address it came
from. Only addresses the test assigned inside its own namespaces are contacted.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from _bridge_util import network, options, ping
from _fw_scenarios import LISTING_11_3

from asyncnet.engine import Container, Engine
from asyncnet.sandbox import Sandbox
from asyncnet.types import parse_network_options

pytestmark = pytest.mark.anyio

SERVER = r"""
import select, socket, sys
tag, specs = sys.argv[1], sys.argv[2:]
socks = []
for spec in specs:
    kind, port = spec.split(":")
    fam = socket.AF_INET6 if kind.endswith("6") else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM if kind.startswith("tcp") else socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", int(port)))
    if s.type == socket.SOCK_STREAM:
        s.listen(16)
    socks.append(s)
print("ready", flush=True)
while True:
    for s in select.select(socks, [], [])[0]:
        me = s.getsockname()[1]
        if s.type == socket.SOCK_STREAM:
            c, peer = s.accept()
            c.settimeout(2)
            try:
                c.recv(100)
                c.sendall(f"{tag} {me} {peer[0]}".encode())
            except OSError:
                pass
            c.close()
        else:
            _data, peer = s.recvfrom(100)
            s.sendto(f"{tag} {me} {peer[0]}".encode(), peer)
"""

CLIENT = r"""
import socket, sys
proto, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
s.settimeout(1.5)
try:
    if proto == "tcp":
        s.connect((host, port))
        s.sendall(b"hi")
        print(s.recv(200).decode())
    else:
        s.sendto(b"hi", (host, port))
        print(s.recvfrom(200)[0].decode())
except OSError as exc:
    print("ERR", exc)
    sys.exit(1)
"""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@contextmanager
def servers(sb: Sandbox, *specs: tuple[str, str, list[str]]) -> Iterator[None]:
    """(namespace, tag, ["tcp4:80", "udp6:6000", …]) servers, stopped on exit (no process may remain)."""
    procs = []
    try:
        for ns, tag, ports in specs:
            p = subprocess.Popen(["nsenter", f"--net={ns}", sys.executable, "-c", SERVER, tag, *ports],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            procs.append(p)
            assert p.stdout is not None and p.stdout.readline().strip() == "ready", p.stderr
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()
            for stream in (p.stdout, p.stderr):
                if stream is not None:
                    stream.close()


def talk(sb: Sandbox, ns: str | None, proto: str, host: str, port: int) -> str | None:
    """The server's answer, or None when nothing answered (refused, dropped, timed out)."""
    res = sb.run([sys.executable, "-c", CLIENT, proto, host, str(port)], ns, check=False)
    return res.stdout.strip() if res.returncode == 0 else None


def engine(sb: Sandbox, **kw: Any) -> Engine:
    return Engine(config_dir=sb.config_dir, firewall="nftables", host_netns=sb.host, **kw)


def attach(n: int, net: dict[str, Any], ips: list[str], **extra: Any) -> dict[str, Any]:
    return options(n, [(net, {"interface_name": "eth0", "static_ips": ips})], **extra)


async def up(e: Engine, *pairs: tuple[str, dict[str, Any]]) -> None:
    results = await e.setup([Container.of(ns, parse_network_options(doc)) for ns, doc in pairs])
    assert all(r.ok for r in results), [r.error for r in results]


async def down(e: Engine, *pairs: tuple[str, dict[str, Any]]) -> None:
    results = await e.teardown([Container.of(ns, parse_network_options(doc)) for ns, doc in pairs])
    assert all(r.ok for r in results), [r.error for r in results]


def upstream(sb: Sandbox) -> str:
    """A namespace plugged into the host like an uplink: host 192.0.2.1/24 <-> upstream 192.0.2.2/24."""
    ns = sb.netns("upstream")
    sb.run(["ip", "link", "add", "up0", "type", "veth", "peer", "name", "eth0", "netns", ns])
    sb.run(["ip", "addr", "add", "192.0.2.1/24", "dev", "up0"])
    sb.run(["ip", "link", "set", "up0", "up"])
    sb.run(["ip", "addr", "add", "192.0.2.2/24", "dev", "eth0"], ns)
    sb.run(["ip", "link", "set", "eth0", "up"], ns)
    sb.run(["ip", "link", "set", "lo", "up"], ns)
    return ns


DUAL = network("podman1", "podman1", subnets=[("10.88.0.0/16", "10.88.0.1"), ("fd10:88:a::/64", "fd10:88:a::1")])


# --------------------------------------------------------------------------------------------------


async def test_port_forwarding_v4_v6_tcp_udp_range_localhost_hairpin(sandbox: Sandbox) -> None:
    c1, c2 = sandbox.netns("c1"), sandbox.netns("c2")
    doc1 = attach(1, DUAL, ["10.88.0.2", "fd10:88:a::2"], port_mappings=[
        {"host_ip": "", "container_port": 80, "host_port": 8080, "range": 1, "protocol": "tcp"},
        {"host_ip": "", "container_port": 6000, "host_port": 5000, "range": 3, "protocol": "udp"}])
    doc2 = attach(2, DUAL, ["10.88.0.3", "fd10:88:a::3"])
    async with engine(sandbox) as e:
        await up(e, (c1, doc1), (c2, doc2))
        assert e.firewall.transactions == 1
        with servers(sandbox, (c1, "c1", ["tcp4:80", "tcp6:80", "udp4:6000", "udp4:6001", "udp4:6002",
                                          "udp6:6000", "udp6:6002"])):
            # host -> gateway:hostport, both families, tcp and udp, every port of the range
            assert talk(sandbox, None, "tcp", "10.88.0.1", 8080).startswith("c1 80 ")
            assert talk(sandbox, None, "tcp", "fd10:88:a::1", 8080).startswith("c1 80 ")
            for i in range(3):
                assert talk(sandbox, None, "udp", "10.88.0.1", 5000 + i).startswith(f"c1 {6000 + i} ")
            assert talk(sandbox, None, "udp", "fd10:88:a::1", 5002).startswith("c1 6002 ")
            assert talk(sandbox, None, "udp", "10.88.0.1", 5003) is None  # past the range
            # host -> 127.0.0.1:hostport (route_localnet + the 127.0.0.1 SETMARK rule + masquerade)
            assert talk(sandbox, None, "tcp", "127.0.0.1", 8080) == "c1 80 10.88.0.1"
            # another container -> published port via the gateway
            assert talk(sandbox, c2, "tcp", "10.88.0.1", 8080).startswith("c1 80 ")
            # the container -> its own published port via the gateway (hairpin, masqueraded)
            assert talk(sandbox, c1, "tcp", "10.88.0.1", 8080) == "c1 80 10.88.0.1"
        await down(e, (c1, doc1), (c2, doc2))
    assert sandbox.run(["nft", "list", "table", "inet", "netavark"]).stdout == LISTING_11_3


async def test_specific_host_ip_and_masquerade_to_upstream(sandbox: Sandbox) -> None:
    up_ns, c1 = upstream(sandbox), sandbox.netns("c1")
    net = network("podman1", "podman1", subnets=[("10.88.0.0/16", "10.88.0.1")])
    doc = attach(1, net, ["10.88.0.2"], port_mappings=[
        {"host_ip": "192.0.2.1", "container_port": 90, "host_port": 9090, "range": 1, "protocol": "tcp"},
        {"host_ip": "", "container_port": 80, "host_port": 8080, "range": 1, "protocol": "tcp"}])
    async with engine(sandbox) as e:
        await up(e, (c1, doc))
        with servers(sandbox, (c1, "c1", ["tcp4:80", "tcp4:90"]), (up_ns, "upstream", ["tcp4:7777"])):
            # published on 192.0.2.1 only: reachable there (from outside and from the host) …
            assert talk(sandbox, up_ns, "tcp", "192.0.2.1", 9090) == "c1 90 192.0.2.2"
            assert talk(sandbox, None, "tcp", "192.0.2.1", 9090).startswith("c1 90 ")
            # … and not on another address of the host
            assert talk(sandbox, None, "tcp", "10.88.0.1", 9090) is None
            # host_ip "" is published on every address, from outside too (source preserved)
            assert talk(sandbox, up_ns, "tcp", "192.0.2.1", 8080) == "c1 80 192.0.2.2"
            # container -> upstream: masqueraded to the host's address on that link
            assert talk(sandbox, c1, "tcp", "192.0.2.2", 7777) == "upstream 7777 192.0.2.1"
        await down(e, (c1, doc))


async def test_isolation_true_strict_and_none(sandbox: Sandbox) -> None:
    nets = {
        "a": network("iso-a", "isoa0", subnets=[("10.90.1.0/24", "10.90.1.1")], net_id="a1" * 32,
                     options={"isolate": "true"}),
        "b": network("iso-b", "isob0", subnets=[("10.90.2.0/24", "10.90.2.1")], net_id="b2" * 32,
                     options={"isolate": "true"}),
        "s": network("strict", "strs0", subnets=[("10.90.3.0/24", "10.90.3.1")], net_id="c3" * 32,
                     options={"isolate": "strict"}),
        "o": network("open", "open0", subnets=[("10.90.4.0/24", "10.90.4.1")], net_id="d4" * 32),
    }
    ns = {k: sandbox.netns(f"ctr-{k}") for k in nets}
    docs = {k: attach(i, nets[k], [f"10.90.{i + 1}.2"]) for i, k in enumerate(nets)}
    ip = {k: f"10.90.{i + 1}.2" for i, k in enumerate(nets)}
    async with engine(sandbox) as e:
        await up(e, *[(ns[k], docs[k]) for k in nets])
        assert not ping(sandbox, ns["a"], ip["b"]) and not ping(sandbox, ns["b"], ip["a"])  # isolated <-> isolated
        assert ping(sandbox, ns["o"], ip["a"]) and ping(sandbox, ns["a"], ip["o"])  # true <-> none: allowed
        assert not ping(sandbox, ns["o"], ip["s"])  # strict: the reply to a non-isolated network is dropped
        assert not ping(sandbox, ns["s"], ip["a"])
        assert ping(sandbox, ns["a"], "10.90.1.1") and ping(sandbox, ns["s"], "10.90.3.1")  # gateways fine
        await down(e, *[(ns[k], docs[k]) for k in nets])
    assert sandbox.run(["nft", "list", "table", "inet", "netavark"]).stdout == LISTING_11_3


async def test_teardown_of_one_keeps_the_other_and_reload_restores(sandbox: Sandbox) -> None:
    c1, c2 = sandbox.netns("c1"), sandbox.netns("c2")
    net = network("podman1", "podman1", subnets=[("10.88.0.0/16", "10.88.0.1")])
    pm = lambda port: [{"host_ip": "", "container_port": 80, "host_port": port, "range": 1,  # noqa: E731
                        "protocol": "tcp"}]
    doc1, doc2 = attach(1, net, ["10.88.0.2"], port_mappings=pm(8081)), attach(2, net, ["10.88.0.3"],
                                                                               port_mappings=pm(8082))
    async with engine(sandbox) as e:
        await up(e, (c1, doc1))
        await up(e, (c2, doc2))
        with servers(sandbox, (c1, "c1", ["tcp4:80"]), (c2, "c2", ["tcp4:80"])):
            assert talk(sandbox, None, "tcp", "10.88.0.1", 8081).startswith("c1 ")
            assert talk(sandbox, None, "tcp", "10.88.0.1", 8082).startswith("c2 ")
            await down(e, (c1, doc1))
            assert talk(sandbox, None, "tcp", "10.88.0.1", 8081) is None
            assert talk(sandbox, None, "tcp", "10.88.0.1", 8082).startswith("c2 ")

            sandbox.run(["nft", "flush", "ruleset"])
            assert talk(sandbox, None, "tcp", "10.88.0.1", 8082) is None
            await e.firewall.reload()
            assert talk(sandbox, None, "tcp", "10.88.0.1", 8082).startswith("c2 ")
            assert talk(sandbox, c2, "tcp", "10.88.0.1", 8082).startswith("c2 ")  # hairpin after reload
        await down(e, (c2, doc2))
    assert sandbox.run(["nft", "list", "table", "inet", "netavark"]).stdout == LISTING_11_3


async def test_dns_redirect_to_the_dns_port(sandbox: Sandbox) -> None:
    """dns_port != 53: a container's query to gateway:53 lands on gateway:dns_port (even dns_enabled=false)."""
    c1 = sandbox.netns("c1")
    net = network("podman1", "podman1", subnets=[("10.88.0.0/16", "10.88.0.1")])
    doc = attach(1, net, ["10.88.0.2"])
    async with engine(sandbox, dns_port=1153) as e:
        await up(e, (c1, doc))
        with servers(sandbox, (sandbox.host, "dns", ["udp4:1153", "tcp4:1153"])):
            assert talk(sandbox, c1, "udp", "10.88.0.1", 53) == "dns 1153 10.88.0.2"
            assert talk(sandbox, c1, "tcp", "10.88.0.1", 53) == "dns 1153 10.88.0.2"
        await down(e, (c1, doc))
