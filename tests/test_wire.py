"""The netlink encoder (:mod:`asyncnet.firewall.wire`) against nft itself.

The netlink syntax is only acceptable if the kernel receives exactly what nft would have sent for the
same commands, so the main test captures nft's own batch (strace dumps what nft's sendmsg carries)
and compares bytes. The fast port-block path is held equal to the generic JSON path on many shapes of
port mappings, and the handles the firewall records from two echoes are checked against the kernel's.
"""

from __future__ import annotations

import ipaddress
import random
import re
import shutil
import struct
from typing import Any

import orjson
import pytest
from _fw_scenarios import CTR1, CTR2, CTR3, CTR4, DNS_PORT, ISO1, PODMAN, PODMAN1, STRICT1, container

from asyncnet.errors import FirewallError
from asyncnet.firewall import wire
from asyncnet.firewall.nftables import NftablesFirewall
from asyncnet.firewall.ruleset import NetworkFw, PortBlock, PortFw, Table, build_plan, port_rules, render_text
from asyncnet.netns import Netns
from asyncnet.sandbox import Sandbox
from asyncnet.types import Isolation, PortMapping

pytestmark = pytest.mark.anyio

ODD = NetworkFw("7c9a1d0e" + "5" * 56, "odd", "odd0",
                (ipaddress.ip_network("10.92.16.0/20"), ipaddress.ip_network("fd99:1:2:30::/60")),
                (ipaddress.ip_address("10.92.16.1"), ipaddress.ip_address("fd99:1:2:30::1")), Isolation.NORMAL)
CTR_ODD = PortFw(ODD, "c5" * 32, "ctr5", ipaddress.IPv4Interface("10.92.16.5/20"),
                 ipaddress.IPv6Interface("fd99:1:2:30::5/60"),
                 (PortMapping("", 90, 9090, 1, "tcp"), PortMapping("10.92.16.1", 91, 9091, 2, "udp"),
                  PortMapping("fd99:1:2:30::1", 92, 9092, 1, "sctp")), DNS_PORT)
EVERYTHING = (CTR1, CTR2, CTR3, CTR4, CTR_ODD)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _hexdump_buffers(text: str) -> list[bytes]:
    """The buffers of ``strace -e write=all`` hex dumps, in order."""
    out: list[bytes] = []
    for line in text.splitlines():
        if " bytes in buffer " in line:
            out.append(b"")
        elif re.match(r" \| [0-9a-f]{5}  ", line):
            out[-1] += bytes.fromhex(line[10:59].replace(" ", ""))
    return out


def nft_batch(sb: Sandbox, text: str) -> bytes:
    """What ``nft -f`` sends for ``text``: its last sendmsg (the transaction), via strace."""
    if shutil.which("strace") is None:
        pytest.fail("strace is needed to capture nft's batch (scripts/bootstrap installs it)")
    path, dump = sb.root / "batch.nft", sb.root / "strace.out"
    path.write_text(text)
    sb.run(["strace", "-f", "-xx", "-e", "trace=sendmsg", "-e", "write=all", "-o", str(dump),
            "nft", "-f", str(path)])
    batches = [b for b in _hexdump_buffers(dump.read_text()) if b[4:6] == struct.pack("=H", 16)]
    assert batches, "no nfnetlink batch in nft's sendmsg calls"
    return batches[-1]


def first_difference(a: bytes, b: bytes) -> str:
    def messages(data: bytes) -> list[bytes]:
        out, off = [], 0
        while off + 16 <= len(data):
            n = struct.unpack_from("=I", data, off)[0]
            out.append(data[off:off + n])
            off += (n + 3) & ~3
        return out
    for i, (x, y) in enumerate(zip(messages(a), messages(b), strict=False)):
        if x != y:
            return f"message {i}:\n nft  {x.hex()}\n ours {y.hex()}"
    return f"lengths {len(a)} != {len(b)}"


def read_table(sb: Sandbox) -> Table:
    return Table.from_json(sb.run(["nft", "-j", "list", "table", "inet", "netavark"]).stdout)


def test_setup_and_teardown_bytes_equal_what_nft_sends(sandbox: Sandbox) -> None:
    setup = build_plan(None, setup_networks=[p.network for p in EVERYTHING], setup_ports=EVERYTHING)
    ours = wire.encode(setup.items).framed()
    theirs = nft_batch(sandbox, render_text(setup.commands))
    assert ours == theirs, first_difference(theirs, ours)
    # the table now exists; a teardown plan deletes by the handles read back from it
    table = read_table(sandbox)
    teardown = build_plan(table, teardown_ports=[CTR1, CTR3], teardown_networks=[ISO1, STRICT1])
    assert any("delete" in c and "rule" in c["delete"] for c in teardown.commands)
    assert any("delete" in c and "chain" in c["delete"] for c in teardown.commands)
    ours = wire.encode(teardown.items, existing_chains=set(table.chains)).framed()
    theirs = nft_batch(sandbox, render_text(teardown.commands))
    assert ours == theirs, first_difference(theirs, ours)


def _random_container(rng: random.Random, n: int) -> PortFw:
    net = rng.choice([PODMAN1, ISO1, ODD, PODMAN])
    v4 = ipaddress.IPv4Interface(f"{net.subnets[0].network_address + 2 + n}/{net.subnets[0].prefixlen}")
    v6 = None
    if len(net.subnets) > 1 and rng.random() < 0.7:
        v6 = ipaddress.IPv6Interface(f"{net.subnets[1].network_address + 2 + n}/{net.subnets[1].prefixlen}")
    hosts = ["", "", "0.0.0.0", "::", str(net.gateways[0]), "127.0.0.1", str(net.gateways[-1])]
    mappings = tuple(
        PortMapping(rng.choice(hosts), rng.randrange(1, 60000), rng.randrange(1, 60000),
                    rng.choice([0, 1, 1, 1, 2, 5]), rng.choice(["tcp", "udp", "sctp"]))
        for _ in range(rng.randrange(0, 5)))
    return PortFw(net, f"{n:064x}", f"c{n}", v4, v6, mappings, rng.choice([53, DNS_PORT]))


def test_port_blocks_encode_exactly_like_their_json_rules() -> None:
    rng = random.Random(1153)
    ctrs = [_random_container(rng, n) for n in range(300)]
    plan = build_plan(None, setup_networks=[ODD], setup_ports=ctrs)
    assert sum(isinstance(item, PortBlock) for item in plan.items) > 300
    assert len(plan) == len(plan.commands)
    fast = wire.encode(plan.items)
    generic = wire.encode(plan.commands)
    assert fast.framed() == generic.framed(), first_difference(generic.framed(), fast.framed())
    assert fast.command_of == generic.command_of and fast.rule_chains == generic.rule_chains
    # the owners the handle records use are exactly the spelled-out port rules, in container order
    port_rule_idx = [i for i, c in enumerate(plan.commands) if "add" in c and "rule" in c["add"]
                     and (c["add"]["rule"]["chain"].endswith("_dnat")
                          or c["add"]["rule"]["chain"] == "NETAVARK-HOSTPORT-DNAT")]
    assert sorted(plan.owners) == port_rule_idx
    owners_in_order = list(dict.fromkeys(plan.owners[i] for i in port_rule_idx))
    assert owners_in_order == [c.key for c in ctrs if any(block.pf is c and block.chains for block in plan.items
                                                          if isinstance(block, PortBlock))]


def test_port_rules_encoded_ahead_are_the_same_bytes_and_only_serve_their_own_container() -> None:
    rng = random.Random(5353)
    ctrs = [_random_container(rng, n) for n in range(200)]
    prepared = wire.PreparedPorts()
    for pf in ctrs[:150]:  # the rest were not ready in time: encoded in the commit as usual
        prepared.add(pf)
    # a container prepared with other ports, then committed as a new object under the same key
    stale = ctrs[7]
    ctrs[7] = PortFw(stale.network, stale.container_id, stale.container_name, stale.ipv4, stale.ipv6,
                     (PortMapping("", 4242, 80, 1, "tcp"),), stale.dns_port)
    assert len(prepared) >= 150
    plan = build_plan(None, setup_networks=[ODD], setup_ports=ctrs)
    ahead = wire.encode(plan.items, prepared=prepared)
    now = wire.encode(plan.items)
    assert ahead.framed() == now.framed(), first_difference(now.framed(), ahead.framed())
    assert ahead.command_of == now.command_of and ahead.rule_chains == now.rule_chains
    assert bytes(ahead.kinds) == bytes(now.kinds)
    block = next(b for b in plan.items if isinstance(b, PortBlock) and b.pf is ctrs[8] and b.chains)
    assert prepared.bodies(block) is not None
    assert all(prepared.bodies(b) is None for b in plan.items if isinstance(b, PortBlock) and b.pf is ctrs[7])


@pytest.mark.parametrize("cmd", [
    {"add": {"rule": {"family": "inet", "table": "netavark", "chain": "X", "expr": [{"counter": None}]}}},
    {"add": {"rule": {"family": "ip", "table": "netavark", "chain": "X", "expr": [{"accept": None}]}}},
    {"add": {"set": {"family": "inet", "table": "netavark", "name": "s"}}},
    {"add": {"rule": {"family": "inet", "table": "netavark", "chain": "X", "expr": [
        {"match": {"left": {"payload": {"protocol": "tcp", "field": "dport"}}, "right": 70000, "op": "=="}},
        {"accept": None}]}}},
    {"add": {"rule": {"family": "inet", "table": "netavark", "chain": "X", "expr": [
        {"match": {"left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "fd00::1", "op": "=="}},
        {"accept": None}]}}},
])
def test_commands_outside_the_planners_set_are_refused(cmd: dict[str, Any]) -> None:
    with pytest.raises(wire.Unencodable):
        wire.encode([cmd])


def assert_records_match_kernel(sb: Sandbox, expected: list[PortFw]) -> None:
    listing = orjson.loads(sb.run(["nft", "-j", "-a", "list", "table", "inet", "netavark"]).stdout)
    rules = {(o["rule"]["chain"], o["rule"]["handle"]): o["rule"]["expr"]
             for o in listing["nftables"] if "rule" in o}
    chains = {o["chain"]["name"]: o["chain"]["handle"] for o in listing["nftables"] if "chain" in o}
    for pf in expected:
        record = orjson.loads((sb.config_dir / "firewall/handles" / pf.network.network_id).read_bytes())
        entry = record["containers"][pf.container_id]
        want = [(chain, expr) for cip, _v6 in pf.families() for chain, expr in port_rules(pf, cip)]
        got = [(chain, rules.get((chain, handle))) for chain, handle in entry["rules"]]
        assert got == want, pf.container_name
        assert entry["chains"] == {c: chains[c] for c in entry["chains"]}


async def test_recorded_handles_are_the_kernels(sandbox: Sandbox) -> None:
    """Handles are counted from two echoes over rules, new chains and the DNS rules' anonymous sets:
    every recorded (chain, handle) must be that container's rule in the kernel, chain handles too."""
    fw = NftablesFirewall(Netns(sandbox.host), sandbox.config_dir)
    await fw.commit(setup_networks=[CTR1.network], setup_ports=[CTR1])  # the table exists before
    ctrs = [container(PODMAN1, i, ports=2, dns_port=DNS_PORT) for i in range(1, 40)] + [CTR3, CTR_ODD]
    await fw.commit(setup_networks=[ISO1, ODD], setup_ports=ctrs)
    assert_records_match_kernel(sandbox, [CTR1, *ctrs])
    # a network torn down and set up again in one batch: its chains are deleted and made anew
    again = PortFw(ISO1, "c6" * 32, "ctr6", CTR3.ipv4, CTR3.ipv6, CTR3.port_mappings, DNS_PORT)
    await fw.commit(teardown_ports=[CTR3], teardown_networks=[ISO1], setup_networks=[ISO1], setup_ports=[again])
    assert_records_match_kernel(sandbox, [CTR1, *ctrs[:-2], CTR_ODD, again])


async def test_kernel_rejection_reports_the_command_and_changes_nothing(sandbox: Sandbox) -> None:
    """A batch the kernel refuses (a chain called INPUT of another type exists) fails whole, with
    nft's wording and the offending command."""
    sandbox.run(["nft", "add", "table", "inet", "netavark"])
    sandbox.run(["nft", "add chain inet netavark INPUT { type nat hook prerouting priority -100; }"])
    before = sandbox.run(["nft", "list", "ruleset"]).stdout
    fw = NftablesFirewall(Netns(sandbox.host), sandbox.config_dir, rootless=True)
    with pytest.raises(FirewallError) as err:
        await fw.commit(setup_networks=[PODMAN1], setup_ports=[CTR1])
    text = str(err.value)
    assert text.startswith("nftables error: Error: Could not process rule: ") and "\n" not in text
    assert "add chain inet netavark INPUT" in text
    assert sandbox.run(["nft", "list", "ruleset"]).stdout == before


def test_strace_dump_parser() -> None:
    sample = (' * 20 bytes in buffer 0\n'
              ' | 00000  14 00 00 00 10 00 01 00  00 00 00 00 00 00 00 00  ................ |\n'
              ' | 00010  00 00 00 0a                                       ....             |\n')
    assert _hexdump_buffers(sample) == [bytes.fromhex("14000000100001000000000000000000" "0000000a")]
