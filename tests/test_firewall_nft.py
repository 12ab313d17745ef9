"""The nftables firewall against the real kernel, always inside the sandbox's private host namespace.

Listings are compared with the spec's §11 examples as printed by nft 1.0.6 (the only difference from
the spec's 1.1.x listing: ``priority -100`` on OUTPUT). Traffic through these rules is exercised by the
bridge/engine tests, which own the links.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from _fw_scenarios import (
    CHAINS_11_2,
    CTR1,
    CTR2,
    CTR3,
    CTR4,
    LISTING_11_1,
    LISTING_11_3,
    PODMAN1,
    STRICT1,
    chain_bodies,
    container,
)

from asyncnet.errors import ConfigError, FirewallError
from asyncnet.firewall.nftables import NftablesFirewall, NoFirewall, firewall_driver, network_hash_name
from asyncnet.firewall.ruleset import DNAT_CHAIN, PortFw
from asyncnet.netns import Netns
from asyncnet.sandbox import Sandbox
from asyncnet.types import PortMapping

pytestmark = pytest.mark.anyio

TESTS = Path(__file__).resolve().parent
PATHS = [("library", "netlink"), ("library", "text"), ("library", "json"), ("cli", "text"), ("cli", "json")]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make_fw(sb: Sandbox, ns: str | None = None, config: Path | None = None, **kw: Any) -> NftablesFirewall:
    return NftablesFirewall(Netns(ns or sb.host), config or sb.config_dir, **kw)


def nft_text(sb: Sandbox, ns: str | None = None) -> str:
    return sb.run(["nft", "list", "table", "inet", "netavark"], ns).stdout


def nft_json(sb: Sandbox, ns: str | None = None) -> list[dict[str, Any]]:
    out = orjson.loads(sb.run(["nft", "-j", "list", "table", "inet", "netavark"], ns).stdout)
    return [o for o in out["nftables"] if "metainfo" not in o]


def rule_lines(listing: str) -> list[str]:
    return [line for body in chain_bodies(listing).values() for line in body]


async def setup_each(fw: NftablesFirewall, *pfs: PortFw) -> None:
    """netavark's way: one call per container."""
    for pf in pfs:
        await fw.commit(setup_networks=[pf.network], setup_ports=[pf])


# --------------------------------------------------------------------------------------------------
# the spec's listings


@pytest.mark.parametrize(("backend", "syntax"), PATHS)
async def test_section_11_listings(sandbox: Sandbox, backend: str, syntax: str) -> None:
    fw = make_fw(sandbox, backend=backend, syntax=syntax)
    assert fw.backend_name == ("libnftables" if backend == "library" else "nft")

    await setup_each(fw, CTR1, CTR2)
    assert nft_text(sandbox) == LISTING_11_1

    await setup_each(fw, CTR3, CTR4)
    bodies = chain_bodies(nft_text(sandbox))
    for key, expected in CHAINS_11_2.items():
        chain, _, part = key.partition(":")
        got = bodies[chain]
        if part == "jumps":
            got = [line for line in got if "th dport 53" not in line]
        elif part == "dns":
            got = [line for line in got if "th dport 53" in line]
        assert got == expected.splitlines(), key

    for pf in (CTR1, CTR2, CTR3, CTR4):
        await fw.commit(teardown_ports=[pf], teardown_networks=[pf.network])
    assert nft_text(sandbox) == LISTING_11_3
    assert fw.transactions == 8


async def test_text_and_json_give_identical_kernel_objects(sandbox: Sandbox) -> None:
    """The text rendering is an optimisation: the kernel must end up with exactly netavark's objects."""
    other = sandbox.netns("host-json")
    fw_text = make_fw(sandbox, syntax="text")
    fw_json = make_fw(sandbox, other, sandbox.root / "cfg-json", syntax="json")
    for fw in (fw_text, fw_json):
        await setup_each(fw, CTR1, CTR2, CTR3, CTR4)
        await fw.commit(teardown_ports=[CTR3], teardown_networks=[CTR3.network])
        await fw.commit(teardown_ports=[CTR1])
    assert nft_json(sandbox) == nft_json(sandbox, other)


async def test_second_container_on_same_network_adds_nothing(sandbox: Sandbox) -> None:
    fw = make_fw(sandbox)
    a, b = container(PODMAN1, 0, dns_port=1153), container(PODMAN1, 1, dns_port=1153)
    await setup_each(fw, a)
    before = nft_text(sandbox)
    await setup_each(fw, b)
    assert nft_text(sandbox) == before

    # with ports, only the new container's own port rules appear
    c = container(PODMAN1, 2, ports=1, dns_port=1153)
    await setup_each(fw, c)
    added = sorted(set(rule_lines(nft_text(sandbox))) - set(rule_lines(before)))
    assert added == sorted([
        "ip saddr 10.88.0.0/16 tcp dport 10002 jump NETAVARK-HOSTPORT-SETMARK",
        "ip saddr 127.0.0.1 tcp dport 10002 jump NETAVARK-HOSTPORT-SETMARK",
        "tcp dport 10002 dnat ip to 10.88.0.4:80",
        "tcp dport 10002 jump nv_2f259bab_10_88_0_0_nm16_dnat",
    ])


async def test_teardown_one_of_two_keeps_the_other(sandbox: Sandbox) -> None:
    only_b = sandbox.netns("host-b")
    a = container(PODMAN1, 0, ports=2, dns_port=1153)
    b = container(PODMAN1, 1, ports=2, dns_port=1153)
    fw = make_fw(sandbox)
    await setup_each(fw, a, b)
    await fw.commit(teardown_ports=[a])
    ref = make_fw(sandbox, only_b, sandbox.root / "cfg-b")
    await setup_each(ref, b)
    assert nft_text(sandbox) == nft_text(sandbox, only_b)
    assert not (sandbox.config_dir / "firewall/ports" / f"{PODMAN1.network_id}_{a.container_id}").exists()
    assert (sandbox.config_dir / "firewall/ports" / f"{PODMAN1.network_id}_{b.container_id}").exists()


async def test_batch_of_200_equals_200_sequential_commits(sandbox: Sandbox) -> None:
    seq_ns = sandbox.netns("host-seq")
    ctrs = [container(PODMAN1, i, ports=2, dns_port=1153) for i in range(200)]
    batch = make_fw(sandbox)
    await batch.commit(setup_networks=[PODMAN1], setup_ports=ctrs)
    seq = make_fw(sandbox, seq_ns, sandbox.root / "cfg-seq")
    await setup_each(seq, *ctrs)
    assert batch.transactions == 1 and seq.transactions == 200
    assert nft_text(sandbox) == nft_text(sandbox, seq_ns)
    assert len(chain_bodies(nft_text(sandbox))[DNAT_CHAIN]) == 1 + 400

    # and tearing all of them down in one commit leaves what 200 netavark teardowns leave
    await batch.commit(teardown_ports=ctrs, teardown_networks=[PODMAN1])
    for i, pf in enumerate(ctrs):
        last = i == len(ctrs) - 1
        await seq.commit(teardown_ports=[pf], teardown_networks=[PODMAN1] if last else [])
    assert nft_text(sandbox) == nft_text(sandbox, seq_ns) == LISTING_11_3


# --------------------------------------------------------------------------------------------------
# atomicity, counting, errors


def snapshot_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "nftables.lock"}


@pytest.mark.parametrize(("backend", "syntax"), PATHS)
async def test_bad_transaction_changes_nothing(sandbox: Sandbox, backend: str, syntax: str) -> None:
    fw = make_fw(sandbox, backend=backend, syntax=syntax)
    await setup_each(fw, CTR1)
    before, files = nft_text(sandbox), snapshot_files(sandbox.config_dir)
    # nftables rejects the port 70000 (the last rule of the batch) after everything before it was accepted
    bogus = PortFw(STRICT1, "b" * 64, "bogus", CTR2.ipv4, None, (PortMapping("", 70000, 9999, 1, "tcp"),), 1153)
    with pytest.raises(FirewallError) as err:
        await fw.commit(setup_networks=[STRICT1], setup_ports=[CTR2, bogus],
                        teardown_ports=[CTR1], teardown_networks=[PODMAN1])
    assert str(err.value).startswith("nftables error: ")
    assert "\n" not in str(err.value)
    assert nft_text(sandbox) == before
    assert snapshot_files(sandbox.config_dir) == files  # written and removed files are restored
    assert fw.transactions == 1


async def test_invalid_host_ip_fails_before_anything(sandbox: Sandbox) -> None:
    fw = make_fw(sandbox)
    bad = PortFw(PODMAN1, "c" * 64, "c", CTR1.ipv4, None, (PortMapping("abcd", 80, 8080, 1, "tcp"),))
    with pytest.raises(ConfigError, match='^invalid host ip "abcd" provided for port 8080$'):
        await fw.commit(setup_networks=[PODMAN1], setup_ports=[bad])
    assert sandbox.nft_tables() == [] and not (sandbox.config_dir / "firewall").exists()


async def test_transactions_counter_and_missing_table(sandbox: Sandbox) -> None:
    fw = make_fw(sandbox)
    await fw.commit()
    await fw.commit(teardown_ports=[CTR1], teardown_networks=[PODMAN1])  # no table: nothing to do
    assert fw.transactions == 0 and sandbox.nft_tables() == []
    await fw.commit(setup_networks=[PODMAN1, STRICT1], setup_ports=[CTR1, CTR2])
    assert fw.transactions == 1
    await fw.commit(teardown_ports=[CTR1, CTR2], teardown_networks=[PODMAN1, STRICT1])
    assert fw.transactions == 2
    assert nft_text(sandbox) == LISTING_11_3
    assert (await fw.read_table()).exists


async def test_foreign_tables_are_untouched(sandbox: Sandbox) -> None:
    sandbox.run(["nft", "-f", "-"], input="add table inet other\nadd chain inet other INPUT\n"
                                         "add rule inet other INPUT tcp dport 22 accept\n")
    fw = make_fw(sandbox)
    await setup_each(fw, CTR1)
    await fw.commit(teardown_ports=[CTR1], teardown_networks=[PODMAN1])
    assert "tcp dport 22 accept" in sandbox.run(["nft", "list", "table", "inet", "other"]).stdout


# --------------------------------------------------------------------------------------------------
# state files and reload


async def test_state_files_are_netavarks(sandbox: Sandbox) -> None:
    fw = make_fw(sandbox)
    await setup_each(fw, CTR1)
    fwdir = sandbox.config_dir / "firewall"
    assert (fwdir / "firewall-driver").read_text() == "nftables"
    assert (fwdir / "networks" / PODMAN1.network_id).read_text() == (
        '{"subnets":["10.88.0.0/16","fd10:88:a::/64"],"bridge_name":"podman1",'
        f'"network_id":"{PODMAN1.network_id}","network_hash_name":"F11DC6A6D09CF","isolation":"Never",'
        '"dns_port":1153}')
    port_file = fwdir / "ports" / f"{PODMAN1.network_id}_{CTR1.container_id}"
    assert json.loads(port_file.read_text()) == {
        "container_id": CTR1.container_id, "network_id": PODMAN1.network_id,
        "port_mappings": [{"host_ip": "", "container_port": 80, "host_port": 8080, "range": 1, "protocol": "tcp"},
                          {"host_ip": "", "container_port": 6000, "host_port": 5000, "range": 3,
                           "protocol": "udp"}],
        "network_name": "podman1", "network_hash_name": network_hash_name("podman1"),
        "container_ip_v4": "10.88.0.2", "subnet_v4": "10.88.0.0/16",
        "container_ip_v6": "fd10:88:a::2", "subnet_v6": "fd10:88:a::/64",
        "dns_port": 1153, "dns_server_ips": ["10.88.0.1", "fd10:88:a::1"]}
    assert list(json.loads(port_file.read_text())) == [
        "container_id", "network_id", "port_mappings", "network_name", "network_hash_name", "container_ip_v4",
        "subnet_v4", "container_ip_v6", "subnet_v6", "dns_port", "dns_server_ips"]

    await fw.commit(teardown_ports=[CTR1])
    assert not port_file.exists() and (fwdir / "networks" / PODMAN1.network_id).exists()
    await fw.commit(teardown_networks=[PODMAN1])
    assert not (fwdir / "networks" / PODMAN1.network_id).exists()


async def test_rootless_writes_no_state(sandbox: Sandbox) -> None:
    fw = make_fw(sandbox, rootless=True)
    await setup_each(fw, CTR1)
    assert nft_text(sandbox) != ""
    assert snapshot_files(sandbox.config_dir) == {}


@pytest.mark.parametrize("backend", ["library", "cli"])
async def test_reload_is_idempotent_and_restores_after_flush(sandbox: Sandbox, backend: str) -> None:
    fw = make_fw(sandbox, backend=backend)
    await setup_each(fw, CTR1, CTR2, CTR3, CTR4)
    await fw.commit(setup_networks=[PODMAN1], setup_ports=[container(PODMAN1, i, ports=1) for i in range(5, 25)])
    full = nft_text(sandbox)
    await fw.reload()
    assert nft_text(sandbox) == full
    await fw.reload()
    assert nft_text(sandbox) == full

    sandbox.run(["nft", "flush", "ruleset"])
    assert sandbox.nft_tables() == []
    await fw.reload()
    assert nft_text(sandbox) == full
    await fw.reload()
    assert nft_text(sandbox) == full


async def test_reload_after_partial_loss_and_without_state(sandbox: Sandbox) -> None:
    fw = make_fw(sandbox)
    await fw.reload()  # nothing recorded: nothing to do
    assert sandbox.nft_tables() == [] and fw.transactions == 0
    await setup_each(fw, CTR1, CTR3)
    full = nft_text(sandbox)
    sandbox.run(["nft", "flush", "chain", "inet", "netavark", "nv_9e8d7c6b_10_90_0_0_nm24_dnat"])
    await fw.reload()
    assert sorted(rule_lines(nft_text(sandbox))) == sorted(rule_lines(full))


# --------------------------------------------------------------------------------------------------
# recorded rule handles (per-container teardown without reading the big chains)


async def test_single_teardown_uses_recorded_handles(sandbox: Sandbox) -> None:
    ref_ns = sandbox.netns("host-ref")
    ctrs = [container(PODMAN1, i, ports=2, dns_port=1153) for i in range(30)]
    fw = make_fw(sandbox)
    await fw.commit(setup_networks=[PODMAN1], setup_ports=ctrs)
    await fw.commit(teardown_ports=[ctrs[7]])
    assert fw.last_stats.rules_before == 0  # no chain content was read
    await fw.commit(teardown_ports=[ctrs[0], ctrs[29]])
    assert fw.last_stats.rules_before == 0
    ref = make_fw(sandbox, ref_ns, sandbox.root / "cfg-ref", rootless=True)  # rootless: no hints, by structure
    await ref.commit(setup_networks=[PODMAN1], setup_ports=ctrs)
    await ref.commit(teardown_ports=[ctrs[7]])
    assert ref.last_stats.rules_before > 0
    await ref.commit(teardown_ports=[ctrs[0], ctrs[29]])
    assert nft_text(sandbox) == nft_text(sandbox, ref_ns)
    assert not (sandbox.config_dir / "firewall/handles" / f"{PODMAN1.network_id}_{ctrs[7].container_id}").exists()


async def test_big_batch_is_located_by_the_first_structural_teardown(sandbox: Sandbox) -> None:
    """Without handle records (the text syntax learns no handles), the first per-container teardown
    reads its network's chains and records where every other container's rules are."""
    ref_ns = sandbox.netns("host-ref")
    ctrs = [container(PODMAN1, i, ports=2) for i in range(20)]
    fw = make_fw(sandbox, syntax="text")
    await fw.commit(setup_networks=[PODMAN1], setup_ports=ctrs)
    assert not (sandbox.config_dir / "firewall/handles" / PODMAN1.network_id).exists()
    await fw.commit(teardown_ports=[ctrs[3]])
    assert fw.last_stats.rules_before > 0
    for pf in (ctrs[0], ctrs[19], ctrs[10]):
        await fw.commit(teardown_ports=[pf])
        assert fw.last_stats.rules_before == 0
    ref = make_fw(sandbox, ref_ns, sandbox.root / "cfg-ref", rootless=True)
    await ref.commit(setup_networks=[PODMAN1], setup_ports=[c for i, c in enumerate(ctrs) if i not in (0, 3, 10, 19)])
    assert nft_text(sandbox) == nft_text(sandbox, ref_ns)


async def test_rule_deleted_behind_our_back_falls_back_to_structure(sandbox: Sandbox) -> None:
    a, b = container(PODMAN1, 0, ports=1), container(PODMAN1, 1, ports=1)
    fw = make_fw(sandbox)
    await fw.commit(setup_networks=[PODMAN1], setup_ports=[a, b])
    handles = sandbox.run(["nft", "-a", "list", "chain", "inet", "netavark", "nv_2f259bab_10_88_0_0_nm16_dnat"]).stdout
    victim = next(line for line in handles.splitlines() if "dnat ip to 10.88.0.2:80" in line).split("# handle ")[1]
    sandbox.run(["nft", "delete", "rule", "inet", "netavark", "nv_2f259bab_10_88_0_0_nm16_dnat", "handle", victim])
    await fw.commit(teardown_ports=[a])  # the recorded handle is gone: nft refuses, we retry by structure
    assert fw.transactions == 2
    lines = rule_lines(nft_text(sandbox))
    assert not any("10000" in line for line in lines) and sum("10001" in line for line in lines) == 4


async def test_recreated_table_invalidates_recorded_handles(sandbox: Sandbox) -> None:
    a, b = container(PODMAN1, 0, ports=1), container(PODMAN1, 1, ports=1)
    fw = make_fw(sandbox)
    await fw.commit(setup_networks=[PODMAN1], setup_ports=[a])
    sandbox.run(["nft", "flush", "ruleset"])
    # a new table built by another tool: same objects, same handle numbers, different table
    await make_fw(sandbox, config=sandbox.root / "other", rootless=True).commit(
        setup_networks=[PODMAN1], setup_ports=[b])
    await fw.commit(teardown_ports=[a])
    assert fw.last_stats.rules_before > 0  # searched by structure, not by the stale handles
    assert sum("10001" in line for line in rule_lines(nft_text(sandbox))) == 4


async def test_handles_after_flush_and_reload(sandbox: Sandbox) -> None:
    ref_ns = sandbox.netns("host-ref")
    ctrs = [container(PODMAN1, i, ports=1, dns_port=1153) for i in range(6)]
    fw = make_fw(sandbox)
    await fw.commit(setup_networks=[PODMAN1], setup_ports=ctrs)
    sandbox.run(["nft", "flush", "ruleset"])
    await fw.reload()
    await fw.commit(teardown_ports=[ctrs[2]])
    assert fw.last_stats.rules_before == 0
    await fw.reload()  # nothing to add: the records of kept rules stay valid
    await fw.commit(teardown_ports=[ctrs[4]])
    assert fw.last_stats.rules_before == 0
    ref = make_fw(sandbox, ref_ns, sandbox.root / "cfg-ref")
    await ref.commit(setup_networks=[PODMAN1], setup_ports=[c for i, c in enumerate(ctrs) if i not in (2, 4)])
    assert nft_text(sandbox) == nft_text(sandbox, ref_ns)


# --------------------------------------------------------------------------------------------------
# concurrency


CHILD = """
import asyncio, sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from _fw_scenarios import PODMAN1, container
from asyncnet.firewall.nftables import NftablesFirewall
from asyncnet.netns import Netns
host, config, i, mode = sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
pf = container(PODMAN1, i, ports=1, dns_port=1153)
fw = NftablesFirewall(Netns(host), config)
if mode == "setup":
    asyncio.run(fw.commit(setup_networks=[PODMAN1], setup_ports=[pf]))
else:
    asyncio.run(fw.commit(teardown_ports=[pf]))
"""


def run_children(sb: Sandbox, mode: str, n: int = 8) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(TESTS), sb.host, str(sb.config_dir), str(i), mode],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]  # type: ignore[union-attr]
    for p in procs:
        p.stdout.close()  # type: ignore[union-attr]
        p.stderr.close()  # type: ignore[union-attr]
    assert [rc for rc, _ in results] == [0] * n, [err for _, err in results]


async def test_eight_concurrent_processes_on_one_fresh_network(sandbox: Sandbox) -> None:
    run_children(sandbox, "setup")
    seq_ns = sandbox.netns("host-seq")
    ref = make_fw(sandbox, seq_ns, sandbox.root / "cfg-seq")
    await setup_each(ref, *[container(PODMAN1, i, ports=1, dns_port=1153) for i in range(8)])
    got, want = chain_bodies(nft_text(sandbox)), chain_bodies(nft_text(sandbox, seq_ns))
    assert list(got) == list(want)[:len(got)] and set(got) == set(want)
    for chain, lines in want.items():
        # the network part is identical; port rules appear in lock order, each exactly once
        assert sorted(got[chain]) == sorted(lines), chain
        assert len(set(got[chain])) == len(got[chain]), f"duplicate rule in {chain}"
    assert len(list((sandbox.config_dir / "firewall/ports").iterdir())) == 8

    run_children(sandbox, "teardown")
    assert chain_bodies(nft_text(sandbox))[DNAT_CHAIN] == [
        "ip daddr 10.88.0.1 meta l4proto { tcp, udp } th dport 53 dnat ip to 10.88.0.1:1153"]
    await make_fw(sandbox).commit(teardown_networks=[PODMAN1])
    assert nft_text(sandbox) == LISTING_11_3
    assert list((sandbox.config_dir / "firewall/ports").iterdir()) == []


async def test_concurrent_commits_in_one_process(sandbox: Sandbox) -> None:
    fws = [make_fw(sandbox) for _ in range(4)]
    ctrs = [container(PODMAN1, i, ports=1, dns_port=1153) for i in range(20)]
    async with anyio.create_task_group() as tg:
        for i, pf in enumerate(ctrs):
            tg.start_soon(lambda fw=fws[i % 4], pf=pf: fw.commit(setup_networks=[PODMAN1], setup_ports=[pf]))
    bodies = chain_bodies(nft_text(sandbox))
    assert len(bodies[DNAT_CHAIN]) == 1 + 20 and len(set(bodies[DNAT_CHAIN])) == 21
    assert len(bodies["INPUT"]) == 2
    assert sum(fw.transactions for fw in fws) == 20


# --------------------------------------------------------------------------------------------------
# size and the event loop


@pytest.mark.slow
@pytest.mark.parametrize("syntax", ["netlink", "text", "json"])
async def test_1000_containers_2_ports_one_transaction(sandbox: Sandbox, syntax: str) -> None:
    ctrs = [container(PODMAN1, i, ports=2) for i in range(1000)]
    fw = make_fw(sandbox, syntax=syntax, rootless=True)
    await fw.commit(setup_networks=[PODMAN1], setup_ports=ctrs)
    assert fw.transactions == 1
    bodies = chain_bodies(nft_text(sandbox))
    assert len(bodies[DNAT_CHAIN]) == 2000
    assert len(bodies["nv_2f259bab_10_88_0_0_nm16_dnat"]) == 6000
    # one more container on top of the big table: reads a few small chains, not 8000 rules
    await fw.commit(setup_networks=[PODMAN1], setup_ports=[container(PODMAN1, 1000, ports=2)])
    assert fw.last_stats.read_s < 0.05
    await fw.commit(teardown_ports=ctrs, teardown_networks=[PODMAN1])
    assert fw.transactions == 3
    assert nft_text(sandbox) == LISTING_11_3


@pytest.mark.slow
async def test_big_commit_does_not_block_the_event_loop(sandbox: Sandbox) -> None:
    ctrs = [container(PODMAN1, i, ports=2) for i in range(1000)]
    fw = make_fw(sandbox, rootless=True)
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    t0 = time.perf_counter()
    await fw.commit(setup_networks=[PODMAN1], setup_ports=ctrs)
    took = time.perf_counter() - t0
    done.set()
    await task
    # the loop keeps ticking while the transaction runs in a worker thread: ticks are late by the
    # GIL (shared with the planner) and by other load on the machine, never by the whole nft apply
    # (which alone is most of the commit); a loop blocked by the commit would show one gap >= took
    assert len(gaps) > 10 and max(gaps) < took / 3, (took, max(gaps), len(gaps))


async def test_falls_back_to_the_nft_binary_without_libnftables(sandbox: Sandbox, monkeypatch) -> None:
    import asyncnet.firewall.nftables as mod

    def missing(self: object) -> None:
        raise OSError("libnftables.so.1: cannot open shared object file")

    monkeypatch.setattr(mod._LibBackend, "__init__", missing)  # only availability is simulated
    fw = make_fw(sandbox)
    assert fw.backend_name == "nft"
    await setup_each(fw, CTR1, CTR2)
    assert nft_text(sandbox) == LISTING_11_1
    with pytest.raises(FirewallError):
        await make_fw(sandbox, backend="library").commit(setup_networks=[PODMAN1])


# --------------------------------------------------------------------------------------------------
# driver selection (no kernel)


def test_firewall_driver_selection(tmp_path: Path) -> None:
    assert isinstance(firewall_driver(None, Netns(None), tmp_path), NftablesFirewall)
    assert isinstance(firewall_driver("NFTables", Netns(None), tmp_path), NftablesFirewall)
    assert isinstance(firewall_driver("none", Netns(None), tmp_path), NoFirewall)
    assert isinstance(firewall_driver("NONE"), NoFirewall)
    with pytest.raises(ConfigError, match="^Must provide a valid firewall backend, got foo$"):
        firewall_driver("foo", Netns(None), tmp_path)
    with pytest.raises(FirewallError):
        firewall_driver("iptables", Netns(None), tmp_path)
    assert firewall_driver(None, Netns(None), tmp_path).log_message == "Using nftables firewall driver"
    assert NoFirewall().log_message == "Not using firewall"


async def test_no_firewall_does_nothing(tmp_path: Path) -> None:
    fw = NoFirewall(Netns(None), tmp_path)
    await fw.commit(setup_networks=[PODMAN1], setup_ports=[CTR1])
    await fw.reload()
    assert fw.transactions == 0 and os.listdir(tmp_path) == []
