"""Container DNS end to end: both command lines → engine → firewall → real aardvark-dns, queried with
real ``dig`` from container namespaces.

``tests/test_dns.py`` drives ``asyncnet.dns`` against hand-made bridges; here nothing is hand-made:
``asyncnet-netavark`` runs under ``nsenter`` into the sandbox host (the way netavark's own suite runs
netavark), ``asyncnet up|down`` gets the sandbox host as ``--host-netns``, and the daemon they start must
serve the containers those calls networked — and be gone, with its files, after the last teardown.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _bridge_util import assert_only_lo, cid, error_of, netavark, network, ok_json, options
from test_dns import BINARY, dig, dig_status, needs_aardvark, needs_dig

from asyncnet.sandbox import Sandbox

pytestmark = [needs_aardvark, needs_dig]

ASYNCNET = str(Path(sys.executable).parent / "asyncnet")
SEARCH = ["dns.podman"]


@dataclass(frozen=True)
class DnsNet:
    """DNS network ``dnsnet<idx>`` on bridge ``dnsbr<idx>``: 10.89.<idx>.0/24 (+ fd89:<idx>::/64)."""

    idx: int
    dual: bool = True
    servers: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"dnsnet{self.idx}"

    @property
    def bridge(self) -> str:
        return f"dnsbr{self.idx}"

    @property
    def gw4(self) -> str:
        return f"10.89.{self.idx}.1"

    @property
    def gw6(self) -> str:
        return f"fd89:{self.idx}::1"

    @property
    def gateways(self) -> list[str]:
        return [self.gw4, self.gw6] if self.dual else [self.gw4]

    @property
    def subnets(self) -> list[str]:
        return [f"10.89.{self.idx}.0/24"] + ([f"fd89:{self.idx}::/64"] if self.dual else [])

    @property
    def doc(self) -> dict[str, Any]:
        subs: list[tuple[str, str | None]] = [(f"10.89.{self.idx}.0/24", self.gw4)]
        if self.dual:
            subs.append((f"fd89:{self.idx}::/64", self.gw6))
        extra: dict[str, Any] = {"network_dns_servers": list(self.servers)} if self.servers else {}
        return network(self.name, self.bridge, subnets=subs, net_id=f"{self.idx:02x}" * 32, dns_enabled=True,
                       **extra)

    def v4(self, host: int) -> str:
        return f"10.89.{self.idx}.{host}"

    def v6(self, host: int) -> str:
        return f"fd89:{self.idx}::{host:x}"

    def per(self, host: int, *aliases: str, ifname: str = "eth0") -> dict[str, Any]:
        ips = [self.v4(host)] + ([self.v6(host)] if self.dual else [])
        return {"interface_name": ifname, "static_ips": ips, **({"aliases": list(aliases)} if aliases else {})}


def env_with(**extra: str) -> dict[str, str]:
    return {**os.environ, **extra}


def setup(sb: Sandbox, ns: str, doc: dict[str, Any], *, firewall: str = "nftables", aardvark: str = BINARY,
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return netavark(sb, "-a", aardvark, "setup", ns, stdin=doc, firewall=firewall, env=env)


def teardown(sb: Sandbox, ns: str, doc: dict[str, Any], *, firewall: str = "nftables",
             env: dict[str, str] | None = None) -> None:
    res = netavark(sb, "-a", BINARY, "teardown", ns, stdin=doc, firewall=firewall, env=env)
    assert (res.returncode, res.stdout) == (0, b""), res


def dns_dir(sb: Sandbox) -> Path:
    return sb.config_dir / "aardvark-dns"


def dns_files(sb: Sandbox) -> list[str]:
    """What is left of aardvark-dns: netavark leaves ``$config/aardvark-dns`` empty (or never made it)."""
    d = dns_dir(sb)
    leftovers = sorted(os.listdir(d)) if d.exists() else []
    leftovers += [n for n in os.listdir(sb.config_dir) if n.startswith(".aardvark-dns")]  # temp files
    return leftovers


def procs_in_host(sb: Sandbox) -> dict[int, str]:
    """pid → command line of every process whose network namespace is the sandbox host (ours excluded)."""
    host = os.stat(sb.host).st_ino
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if os.stat(f"/proc/{entry}/ns/net").st_ino != host:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                out[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
    return out


def aardvark_running(sb: Sandbox) -> dict[int, str]:
    return {pid: cmd for pid, cmd in procs_in_host(sb).items() if cmd.startswith(BINARY)}


def nft_table(sb: Sandbox) -> str:
    return sb.run(["nft", "list", "table", "inet", "netavark"], check=False).stdout


def dnat_chain(sb: Sandbox) -> list[str]:
    out = sb.run(["nft", "list", "chain", "inet", "netavark", "NETAVARK-HOSTPORT-DNAT"]).stdout
    return [line.strip() for line in out.splitlines()[2:] if line.strip() not in ("", "}")]


def assert_nothing_of(sb: Sandbox, *nets: DnsNet) -> None:
    """No rule or chain of these networks is left in the ruleset (the table itself stays, like netavark's)."""
    table = nft_table(sb)
    for net in nets:
        for text in [*net.subnets, *net.gateways, f"nv_{net.idx:02x}", net.bridge]:
            assert text not in table, f"{text} left in the ruleset:\n{table}"


# --------------------------------------------------------------------------------------------------
# asyncnet-netavark


@pytest.mark.parametrize("firewall", ["nftables", "none"])
def test_resolves_by_name_and_alias_not_across_networks(sandbox: Sandbox, firewall: str) -> None:
    """A resolves B by name and alias (A and AAAA, over both gateways); a container on another DNS network
    asks its own gateway and does not get B's name; files in netavark's format; the last teardown stops the
    daemon and leaves neither a process nor a file."""
    n1 = DnsNet(1, servers=("1.1.1.1", "2606:4700:4700::1111"))
    n2 = DnsNet(2, dual=False)
    a, b, c = (sandbox.netns(x) for x in ("a", "b", "c"))
    doc_a = options(1, [(n1.doc, n1.per(2))])
    doc_b = options(2, [(n1.doc, n1.per(3, "web", "www"))], dns_servers=["9.9.9.9", "2620:fe::fe"])
    doc_c = options(3, [(n2.doc, n2.per(2, "other"))])

    out_a = ok_json(setup(sandbox, a, doc_a, firewall=firewall))
    out_b = ok_json(setup(sandbox, b, doc_b, firewall=firewall))
    out_c = ok_json(setup(sandbox, c, doc_c, firewall=firewall))
    for out, net in ((out_a, n1), (out_b, n1), (out_c, n2)):
        [block] = out.values()
        assert block["dns_search_domains"] == SEARCH
        assert block["dns_server_ips"] == net.gateways  # the gateways, not the container's dns_servers
    [cmdline] = aardvark_running(sandbox).values()
    assert f"--config {dns_dir(sandbox)} -p 53 run" in cmdline

    # netavark's files: gateways + network_dns_servers, then one line per container with its dns_servers
    assert (dns_dir(sandbox) / n1.name).read_text() == (
        "10.89.1.1,fd89:1::1 1.1.1.1,2606:4700:4700::1111\n"
        f"{cid(1)} 10.89.1.2 fd89:1::2 ctr1\n"
        f"{cid(2)} 10.89.1.3 fd89:1::3 ctr2,web,www 9.9.9.9,2620:fe::fe\n")
    assert (dns_dir(sandbox) / n2.name).read_text() == f"10.89.2.1\n{cid(3)} 10.89.2.2  ctr3,other\n"
    assert sorted(os.listdir(dns_dir(sandbox))) == ["aardvark.pid", n1.name, n2.name]

    for name in ("ctr2", "web", "www", "ctr2.dns.podman"):
        assert dig(sandbox, a, n1.gw4, name) == [n1.v4(3)], name
        assert dig(sandbox, a, n1.gw6, name, "AAAA") == [n1.v6(3)], name
    assert dig(sandbox, a, n1.gw6, "web", "A") == [n1.v4(3)]
    assert dig(sandbox, b, n1.gw4, "ctr1") == [n1.v4(2)]
    assert dig(sandbox, c, n2.gw4, "other") == [n2.v4(2)]
    # c's own gateway answers for c's network only
    for name in ("ctr2", "web", "ctr1"):
        assert dig_status(sandbox, c, n2.gw4, name) == ("NXDOMAIN", []), name
    assert dig_status(sandbox, a, n1.gw4, "other") == ("NXDOMAIN", [])

    # a container added after lookups resolves at once: a reload of a daemon that has answered queries
    # (the case of upstream aardvark-dns#389, which dns.py must survive)
    d = sandbox.netns("d")
    doc_d = options(4, [(n1.doc, n1.per(4, "late"))])
    ok_json(setup(sandbox, d, doc_d, firewall=firewall))
    assert dig(sandbox, a, n1.gw4, "late") == [n1.v4(4)]
    assert dig(sandbox, d, n1.gw6, "web", "AAAA") == [n1.v6(3)]
    teardown(sandbox, d, doc_d, firewall=firewall)

    # teardown: entries go one by one, the daemon keeps serving the rest; the last one stops it
    teardown(sandbox, b, doc_b, firewall=firewall)
    assert cid(2) not in (dns_dir(sandbox) / n1.name).read_text()
    assert dig_status(sandbox, a, n1.gw4, "web") == ("NXDOMAIN", [])
    assert dig(sandbox, c, n2.gw4, "other") == [n2.v4(2)]
    teardown(sandbox, c, doc_c, firewall=firewall)
    assert sorted(os.listdir(dns_dir(sandbox))) == ["aardvark.pid", n1.name]
    assert dig(sandbox, a, n1.gw4, "ctr1") == [n1.v4(2)]
    teardown(sandbox, a, doc_a, firewall=firewall)
    assert aardvark_running(sandbox) == {}
    assert procs_in_host(sandbox) == {}
    assert dns_files(sandbox) == []
    assert_only_lo(sandbox, None, a, b, c, d)
    if firewall == "nftables":
        assert_nothing_of(sandbox, n1, n2)
    else:
        assert sandbox.nft_tables() == []


def test_update_network_dns_servers(sandbox: Sandbox) -> None:
    net = DnsNet(1, servers=("1.1.1.1",))
    a = sandbox.netns("a")
    doc = options(1, [(net.doc, net.per(2, "web"))], dns_servers=["9.9.9.9"])
    ok_json(setup(sandbox, a, doc, firewall="none"))
    path = dns_dir(sandbox) / net.name
    body = f"{cid(1)} 10.89.1.2 fd89:1::2 ctr1,web 9.9.9.9\n"
    assert path.read_text() == "10.89.1.1,fd89:1::1 1.1.1.1\n" + body
    [daemon] = aardvark_running(sandbox)  # its pid
    assert dig(sandbox, a, net.gw4, "web") == [net.v4(2)]

    def update(*servers: str) -> None:
        args = [x for s in servers for x in ("--network-dns-servers", s)]
        res = netavark(sandbox, "-a", BINARY, "update", net.name, *args)
        assert (res.returncode, res.stdout) == (0, b""), res

    update("8.8.8.8", "fd00::53")
    assert path.read_text() == "10.89.1.1,fd89:1::1 8.8.8.8,fd00::53\n" + body
    update("8.8.4.4")
    assert path.read_text() == "10.89.1.1,fd89:1::1 8.8.4.4\n" + body
    update("")
    assert path.read_text() == "10.89.1.1,fd89:1::1\n" + body
    assert list(aardvark_running(sandbox)) == [daemon], "update reloads the daemon, it does not replace it"
    assert dig(sandbox, a, net.gw4, "web") == [net.v4(2)]
    bad = error_of(netavark(sandbox, "-a", BINARY, "update", net.name, "--network-dns-servers", "nope"))
    assert bad.startswith("unable to modify network dns servers"), bad
    assert path.read_text() == "10.89.1.1,fd89:1::1\n" + body

    teardown(sandbox, a, doc, firewall="none")
    assert aardvark_running(sandbox) == {} and dns_files(sandbox) == []


def test_alternative_dns_port_redirected_by_the_firewall(sandbox: Sandbox) -> None:
    """NETAVARK_DNS_PORT=1153: aardvark-dns listens on 1153 only, the container still asks gateway:53 and
    the nftables DNAT rules of netavark 1.14 (§5.1) carry the query over; they go with the network."""
    net = DnsNet(1)
    env = env_with(NETAVARK_DNS_PORT="1153")
    a, b = sandbox.netns("a"), sandbox.netns("b")
    doc_a = options(1, [(net.doc, net.per(2))])
    doc_b = options(2, [(net.doc, net.per(3, "web"))])
    ok_json(setup(sandbox, a, doc_a, env=env))
    ok_json(setup(sandbox, b, doc_b, env=env))

    [cmdline] = aardvark_running(sandbox).values()
    assert " -p 1153 run" in cmdline
    listening = sandbox.run(["ss", "-Hlnu"]).stdout
    assert "10.89.1.1:1153" in listening and "[fd89:1::1]:1153" in listening, listening
    assert ":53 " not in listening, listening
    # inserted at the head per gateway in order (so v6 first), once per network, not per container
    assert dnat_chain(sandbox) == [
        "ip6 daddr fd89:1::1 meta l4proto { tcp, udp } th dport 53 dnat ip6 to [fd89:1::1]:1153",
        "ip daddr 10.89.1.1 meta l4proto { tcp, udp } th dport 53 dnat ip to 10.89.1.1:1153",
    ]

    assert dig(sandbox, a, net.gw4, "web") == [net.v4(3)]  # port 53
    assert dig(sandbox, a, net.gw6, "web", "AAAA") == [net.v6(3)]
    assert dig(sandbox, b, net.gw4, "ctr1") == [net.v4(2)]

    teardown(sandbox, b, doc_b, env=env)
    assert len(dnat_chain(sandbox)) == 2  # the network is still in use
    teardown(sandbox, a, doc_a, env=env)
    assert dnat_chain(sandbox) == []
    assert aardvark_running(sandbox) == {} and dns_files(sandbox) == []
    assert_nothing_of(sandbox, net)


def test_aardvark_exits_at_once_tears_down_every_network(sandbox: Sandbox) -> None:
    """``-a /usr/bin/false``: netavark's exact error, and every network of the call is gone again (links,
    rules, entries); the container can then be set up normally (nothing of the failed call is held)."""
    n1, n2 = DnsNet(1), DnsNet(2, dual=False)
    a = sandbox.netns("a")
    doc = options(1, [(n1.doc, n1.per(2, "web")), (n2.doc, n2.per(2, ifname="eth1"))])
    res = setup(sandbox, a, doc, aardvark="/usr/bin/false")
    assert error_of(res) == ("error while applying dns entries: IO error: "
                             "aardvark-dns exited unexpectedly without error message")
    assert_only_lo(sandbox, None, a)
    assert_nothing_of(sandbox, n1, n2)
    assert dns_files(sandbox) == []
    assert procs_in_host(sandbox) == {}

    out = ok_json(setup(sandbox, a, doc))
    assert sorted(out) == [n1.name, n2.name]
    assert dig(sandbox, a, n1.gw4, "web") == [n1.v4(2)]
    # aardvark-dns answers from every network of the asking container: a is on both, so is its name
    assert sorted(dig(sandbox, a, n2.gw4, "ctr1")) == [n1.v4(2), n2.v4(2)]
    teardown(sandbox, a, doc)
    assert aardvark_running(sandbox) == {} and dns_files(sandbox) == []


def test_aardvark_not_executable(sandbox: Sandbox, tmp_path: Path) -> None:
    net = DnsNet(1)
    a = sandbox.netns("a")
    directory = tmp_path / "not-a-binary"
    directory.mkdir()
    doc = options(1, [(net.doc, net.per(2))])
    res = setup(sandbox, a, doc, aardvark=str(directory))
    assert "aardvark-dns failed to start: Failed to find executable" in error_of(res)
    assert dns_files(sandbox) == []
    assert_only_lo(sandbox, None, a)
    assert_nothing_of(sandbox, net)


# --------------------------------------------------------------------------------------------------
# asyncnet up/down


def test_bulk_up_100_resolve_right_after_up(sandbox: Sandbox, tmp_path: Path) -> None:
    """One batch of 100 DNS-enabled containers with IPAM-allocated addresses: every name resolves as soon as
    ``asyncnet up`` has returned (no retry, one try per query); a second batch after those lookups too;
    ``down`` leaves no process and no file."""
    net = DnsNet(5)
    first, second = 100, 10
    nss = [sandbox.netns(f"bulk{i}") for i in range(first + second)]
    containers = [{"netns": ns, "container_id": cid(i), "container_name": f"ctr{i}",
                   "networks": {net.name: {"interface_name": "eth0", "aliases": [f"alias{i}"]}}}
                  for i, ns in enumerate(nss)]
    v4: dict[str, str] = {}
    v6: dict[str, str] = {}

    def run(command: str, part: slice) -> dict[str, Any]:
        batch = tmp_path / f"{command}-{part.start}.json"
        batch.write_text(json.dumps({"networks": {net.name: net.doc}, "containers": containers[part]}))
        res = subprocess.run([ASYNCNET, command, "--config", str(sandbox.config_dir), "--host-netns", sandbox.host,
                              str(batch)], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res
        report = json.loads(res.stdout)
        assert sorted(report) == sorted(c["container_id"] for c in containers[part])
        if command == "up":
            for c in containers[part]:
                block = report[c["container_id"]]["status"][net.name]
                assert block["dns_search_domains"] == SEARCH and block["dns_server_ips"] == net.gateways
                v4[c["container_name"]], v6[c["container_name"]] = (
                    s["ipnet"].split("/")[0] for s in block["interfaces"]["eth0"]["subnets"])
        return report

    def dig_all(asker: str, names: list[str]) -> dict[str, list[str]]:
        """Every name with one ``dig -f`` batch file: one process, one try per query."""
        queries = tmp_path / "queries"
        queries.write_text("".join(f"+noall +answer +time=2 +tries=1 @{net.gw4} {n} A\n" for n in names))
        got: dict[str, list[str]] = {}
        for line in sandbox.run(["dig", "-f", str(queries)], asker, check=False, timeout=60).stdout.splitlines():
            cols = line.split()
            if len(cols) == 5 and cols[3] == "A":
                got.setdefault(cols[0].rstrip("."), []).append(cols[4])
        return got

    run("up", slice(0, first))
    assert len(set(v4.values())) == first and len(set(v6.values())) == first
    # a sample of names from a few containers, over both gateways, by name and alias
    rng = random.Random(6)
    for asker in (0, 37, 99):
        for i in rng.sample(range(first), 6):
            assert dig(sandbox, nss[asker], net.gw4, f"ctr{i}") == [v4[f"ctr{i}"]], (asker, i)
        i = rng.randrange(first)
        assert dig(sandbox, nss[asker], net.gw6, f"alias{i}", "AAAA") == [v6[f"ctr{i}"]], (asker, i)
    assert dig_all(nss[50], list(v4)) == {name: [ip] for name, ip in v4.items()}

    # the next batch reloads a daemon that has answered queries (aardvark-dns 1.4.0's weak spot)
    run("up", slice(first, first + second))
    assert len(v4) == first + second
    assert dig_all(nss[first + 5], list(v4)) == {name: [ip] for name, ip in v4.items()}

    down = run("down", slice(0, first + second))
    assert all(v == {"status": "removed"} for v in down.values()), down
    assert procs_in_host(sandbox) == {}
    assert dns_files(sandbox) == []
    assert_only_lo(sandbox, None, nss[0], nss[50], nss[-1])
    assert_nothing_of(sandbox, net)


def test_teardown_after_the_container_namespace_is_gone(sandbox: Sandbox) -> None:
    """The container died and took its namespace along: teardown still removes its entries, and being the
    last one, stops the daemon."""
    net = DnsNet(1)
    a, b = sandbox.netns("a"), sandbox.netns("b")
    doc_a = options(1, [(net.doc, net.per(2))])
    doc_b = options(2, [(net.doc, net.per(3, "web"))])
    ok_json(setup(sandbox, a, doc_a))
    ok_json(setup(sandbox, b, doc_b))
    sandbox.remove_netns(b)
    teardown(sandbox, b, doc_b)
    assert cid(2) not in (dns_dir(sandbox) / net.name).read_text()
    assert dig_status(sandbox, a, net.gw4, "web") == ("NXDOMAIN", [])
    sandbox.remove_netns(a)
    teardown(sandbox, a, doc_a)
    assert procs_in_host(sandbox) == {} and dns_files(sandbox) == []
    assert_only_lo(sandbox, None)
    assert_nothing_of(sandbox, net)
