"""Pure tests of the planner: no kernel, a small nft simulator stands in for the table.

The simulator applies commands the way nftables does (append / insert at head / delete by handle,
chains listed in creation order) and enforces the two batch-killers of spec §13: deleting a chain that
is still jumped to (EBUSY) and deleting a handle that does not exist (ENOENT). Its listings are
``nft -j``-shaped, so they feed straight back into :func:`plan_transaction`.
"""

from __future__ import annotations

import copy
import ipaddress
import random
from typing import Any

import pytest
from _fw_scenarios import CTR1, CTR2, CTR3, CTR4, ISO1, PODMAN, PODMAN1, STRICT1, container

from asyncnet.errors import ConfigError
from asyncnet.firewall.ruleset import (
    DNAT_CHAIN,
    FIXED_CHAINS,
    ISOLATION3,
    NetworkFw,
    PortFw,
    Table,
    Unrenderable,
    chain_name,
    chains_to_read,
    locate_port_rules,
    plan_transaction,
    render_text,
)
from asyncnet.types import Isolation, PortMapping

# --------------------------------------------------------------------------------------------------
# a minimal nftables simulator


class NftError(Exception):
    pass


class SimTable:
    def __init__(self) -> None:
        self.exists = False
        self.chains: dict[str, list[tuple[int, list[Any]]]] = {}
        self.handle = 0

    def apply(self, cmds: list[dict[str, Any]]) -> None:
        """All or nothing, like a transaction (rule bodies are copied in, so a shallow snapshot does)."""
        snapshot = (self.exists, {n: list(r) for n, r in self.chains.items()}, self.handle)
        try:
            for cmd in cmds:
                self._one(cmd)
        except NftError:
            self.exists, self.chains, self.handle = snapshot
            raise

    def _next(self) -> int:
        self.handle += 1
        return self.handle

    def _one(self, cmd: dict[str, Any]) -> None:
        (verb, obj), = cmd.items()
        (kind, body), = obj.items()
        if kind == "table":
            self.exists = True
            return
        if not self.exists:
            raise NftError("No such file or directory (table)")
        if kind == "chain":
            name = body["name"]
            if verb == "add":
                self.chains.setdefault(name, [])
            elif verb == "delete":
                if name not in self.chains:
                    raise NftError(f"No such file or directory (chain {name})")
                for other, rules in self.chains.items():
                    if other != name and any(_jumps(e) == name for _h, e in rules):
                        raise NftError(f"Device or resource busy (chain {name} jumped to from {other})")
                del self.chains[name]
            return
        chain = body["chain"]
        if chain not in self.chains:
            raise NftError(f"No such file or directory (chain {chain})")
        rules = self.chains[chain]
        if verb == "add":
            target = _jumps(body["expr"])
            if target is not None and target not in self.chains:
                raise NftError(f"No such file or directory (jump target {target})")
            rules.append((self._next(), copy.deepcopy(body["expr"])))
        elif verb == "insert":
            rules.insert(0, (self._next(), copy.deepcopy(body["expr"])))
        elif verb == "delete":
            for i, (h, _e) in enumerate(rules):
                if h == body["handle"]:
                    del rules[i]
                    break
            else:
                raise NftError(f"No such file or directory (handle {body['handle']})")

    def listing(self) -> dict[str, Any] | None:
        if not self.exists:
            return None
        objs: list[dict[str, Any]] = [{"table": {"family": "inet", "name": "netavark", "handle": 1}}]
        for name in self.chains:
            objs.append({"chain": {"family": "inet", "table": "netavark", "name": name}})
        for name, rules in self.chains.items():
            for h, e in rules:
                objs.append({"rule": {"family": "inet", "table": "netavark", "chain": name, "handle": h,
                                      "expr": e}})
        return {"nftables": objs}

    def shape(self) -> list[tuple[str, list[Any]]]:
        """Chains in order with their rule bodies in order, handles dropped: what `nft list` shows."""
        return [(name, [e for _h, e in rules]) for name, rules in self.chains.items()]

    def run(self, **kwargs: Any) -> list[dict[str, Any]]:
        cmds = plan_transaction(self.listing(), **kwargs)
        self.apply(cmds)
        return cmds


def _jumps(expr: list[Any]) -> str | None:
    for stmt in expr:
        if "jump" in stmt:
            return stmt["jump"]["target"]
    return None


def netavark_setup(sim: SimTable, pf: PortFw) -> None:
    """What one netavark setup does for one container-network: two driver calls."""
    sim.run(setup_networks=[pf.network])
    sim.run(setup_ports=[pf])


def netavark_teardown(sim: SimTable, pf: PortFw, complete: bool) -> None:
    if complete:
        sim.run(teardown_networks=[pf.network])
    sim.run(teardown_ports=[pf], teardown_networks=[pf.network] if complete else [])


def rules_of(sim: SimTable, chain: str) -> list[list[Any]]:
    return dict(sim.shape()).get(chain, [])


# --------------------------------------------------------------------------------------------------
# names


def test_chain_names_follow_spec_mangling() -> None:
    nid = "2f259bab" + "0" * 56
    assert chain_name(nid, ipaddress.ip_network("10.88.0.0/16")) == "nv_2f259bab_10_88_0_0_nm16"
    assert chain_name(nid, ipaddress.ip_network("fd10:88:a::/64")) == "nv_2f259bab_fd10-88-a--_nm64"
    assert chain_name("9e8d7c6b1", ipaddress.ip_network("fd90::/64"), dnat=True) == "nv_9e8d7c6b_fd90--_nm64_dnat"
    assert chain_name("abc", ipaddress.ip_network("10.0.0.0/8")) == "nv_abc_10_0_0_0_nm8"


# --------------------------------------------------------------------------------------------------
# setup layout


def test_first_setup_batch_starts_with_table_and_fixed_chains() -> None:
    cmds = plan_transaction(None, setup_networks=[PODMAN1], setup_ports=[CTR1])
    assert cmds[0] == {"add": {"table": {"family": "inet", "name": "netavark"}}}
    assert cmds[1] == {"add": {"chain": {"family": "inet", "table": "netavark", "name": "INPUT", "type": "filter",
                                         "hook": "input", "prio": 0, "policy": "accept"}}}
    assert cmds[5]["add"]["chain"]["prio"] == -100 and cmds[5]["add"]["chain"]["hook"] == "output"
    assert [c["add"]["chain"]["name"] for c in cmds[6:11]] == list(FIXED_CHAINS)
    # isolate unset → the ISOLATION-3 drop is an insert (head), the jump to -2 an add (tail)
    iso3 = [c for c in cmds if next(iter(c.values())).get("rule", {}).get("chain") == ISOLATION3]
    assert list(iso3[0]) == ["insert"] and list(iso3[1]) == ["add"]


def test_section_11_1_layout_in_simulator() -> None:
    sim = SimTable()
    netavark_setup(sim, CTR1)
    netavark_setup(sim, CTR2)
    names = [n for n, _ in sim.shape()]
    assert names == ["INPUT", "FORWARD", "POSTROUTING", "PREROUTING", "OUTPUT", *FIXED_CHAINS,
                     "nv_2f259bab_10_88_0_0_nm16", "nv_2f259bab_fd10-88-a--_nm64",
                     "nv_2f259bab_10_88_0_0_nm16_dnat", "nv_2f259bab_fd10-88-a--_nm64_dnat",
                     "nv_5c9a1d0e_10_89_5_0_nm24"]
    dnat = rules_of(sim, DNAT_CHAIN)
    # DNS redirects: each inserted at the head → strict0's first, then podman1's v6, then v4
    assert [r[0]["match"]["right"] for r in dnat[:3]] == ["10.89.5.1", "fd10:88:a::1", "10.88.0.1"]
    assert dnat[1][-1] == {"dnat": {"addr": "fd10:88:a::1", "family": "ip6", "port": 1153}}
    assert len(dnat) == 3 + 4
    # tcp 8080: 2 SETMARK jumps + 1 dnat; udp 5000-5002: 2 SETMARK jumps + 3 dnat
    assert len(rules_of(sim, "nv_2f259bab_10_88_0_0_nm16_dnat")) == 3 + 5
    assert len(rules_of(sim, "nv_2f259bab_fd10-88-a--_nm64_dnat")) == 2 + 4  # no 127.0.0.1 rule in v6
    v6mask = rules_of(sim, "nv_2f259bab_fd10-88-a--_nm64")[1][0]["match"]
    assert v6mask["right"] == {"prefix": {"addr": "ff::", "len": 8}} and v6mask["op"] == "!="


def test_second_container_on_same_network_adds_nothing() -> None:
    sim = SimTable()
    netavark_setup(sim, container(PODMAN1, 0))
    before = sim.shape()
    cmds = plan_transaction(sim.listing(), setup_networks=[PODMAN1], setup_ports=[container(PODMAN1, 1)])
    assert all("table" in c["add"] or "chain" in c["add"] for c in cmds)  # only the idempotent preamble
    sim.apply(cmds)
    assert sim.shape() == before


def test_isolation_rules() -> None:
    sim = SimTable()
    for pf in (CTR1, CTR2, CTR3, CTR4):
        netavark_setup(sim, pf)
    iso1 = rules_of(sim, "NETAVARK-ISOLATION-1")
    assert [r[-1]["jump"]["target"] for r in iso1] == ["NETAVARK-ISOLATION-3", "NETAVARK-ISOLATION-2"]
    assert [r[0]["match"]["right"] for r in rules_of(sim, "NETAVARK-ISOLATION-2")] == ["strict0", "iso1"]
    iso3 = rules_of(sim, ISOLATION3)
    assert [r[0]["match"]["right"] for r in iso3[:2]] == ["podman0", "podman1"]
    assert iso3[-1] == [{"jump": {"target": "NETAVARK-ISOLATION-2"}}]


def test_host_ip_variants_pick_families() -> None:
    v4 = [e for c, e in _port_rules(CTR3) if c == DNAT_CHAIN and "10_90" in e[-1]["jump"]["target"]]
    v6 = [e for c, e in _port_rules(CTR3) if c == DNAT_CHAIN and "fd90" in e[-1]["jump"]["target"]]
    ports4 = [next(s["match"]["right"] for s in e if s["match"]["left"]["payload"]["field"] == "dport") for e in v4]
    ports6 = [next(s["match"]["right"] for s in e if s["match"]["left"]["payload"]["field"] == "dport") for e in v6]
    assert ports4 == [9090, 8443, 8445, 7000]
    assert ports6 == [8444, {"range": [8446, 8447]}, 7000]


def _port_rules(pf: PortFw) -> list[tuple[str, list[Any]]]:
    cmds = plan_transaction(None, setup_networks=[pf.network], setup_ports=[pf])
    return [(c["add"]["rule"]["chain"], c["add"]["rule"]["expr"]) for c in cmds
            if "add" in c and "rule" in c["add"]]


def test_invalid_host_ip_is_rejected_with_netavark_text() -> None:
    bad = PortFw(PODMAN1, "x", "x", CTR1.ipv4, None, (PortMapping("abcd", 80, 8080, 1, "tcp"),))
    with pytest.raises(ConfigError) as err:
        plan_transaction(None, setup_networks=[PODMAN1], setup_ports=[bad])
    assert str(err.value) == 'invalid host ip "abcd" provided for port 8080'


def test_port_mappings_none_vs_empty() -> None:
    none = PortFw(PODMAN1, "a", "a", CTR1.ipv4, CTR1.ipv6, None)
    empty = PortFw(PODMAN1, "a", "a", CTR1.ipv4, CTR1.ipv6, ())
    chains = lambda cmds: [c["add"]["chain"]["name"] for c in cmds if "add" in c and "chain" in c["add"]]  # noqa: E731
    assert not any(n.endswith("_dnat") for n in chains(plan_transaction(None, setup_ports=[none])))
    assert [n for n in chains(plan_transaction(None, setup_ports=[empty])) if n.endswith("_dnat")] == [
        "nv_2f259bab_10_88_0_0_nm16_dnat", "nv_2f259bab_fd10-88-a--_nm64_dnat"]


def test_dns_redirect_only_off_port_53_and_per_family() -> None:
    on53 = PortFw(PODMAN1, "a", "a", CTR1.ipv4, CTR1.ipv6, None, 53)
    assert not any("insert" in c for c in plan_transaction(None, setup_ports=[on53]))
    v4only = PortFw(PODMAN1, "a", "a", CTR1.ipv4, None, None, 1153)
    inserts = [c["insert"]["rule"] for c in plan_transaction(None, setup_ports=[v4only]) if "insert" in c]
    assert [r["expr"][0]["match"]["right"] for r in inserts] == ["10.88.0.1"]


# --------------------------------------------------------------------------------------------------
# batch == sequence


def test_batch_of_200_equals_200_sequential_netavark_calls() -> None:
    ctrs = [container(PODMAN1, i, ports=2, dns_port=1153) for i in range(200)]
    seq = SimTable()
    for pf in ctrs:
        netavark_setup(seq, pf)
    batch = SimTable()
    batch.run(setup_networks=[PODMAN1], setup_ports=ctrs)
    assert batch.shape() == seq.shape()
    assert len(rules_of(batch, DNAT_CHAIN)) == 1 + 400  # one DNS redirect (v4 only), one jump per port


def test_batch_over_several_networks_equals_netavark_per_container_order() -> None:
    rng = random.Random(7)
    nets = [PODMAN1, STRICT1, ISO1, PODMAN]
    entries = []
    for i in range(40):
        net = rng.choice(nets)
        entries.append(PortFw(net, f"{i:064x}", f"c{i}",
                              ipaddress.ip_interface(f"{net.subnets[0][10 + i]}/{net.subnets[0].prefixlen}"),
                              None, tuple(PortMapping("", 80, 20000 + i, rng.choice([0, 1, 3]), "udp")
                                          for _ in range(rng.choice([0, 1]))) or rng.choice([None, ()]),
                              rng.choice([53, 1153])))
    seq = SimTable()
    for pf in entries:
        netavark_setup(seq, pf)
    batch = SimTable()
    batch.run(setup_networks=nets, setup_ports=entries)
    assert batch.shape() == seq.shape()


def test_existing_table_plus_batch_equals_sequence() -> None:
    first = [container(PODMAN1, i, ports=1, dns_port=1153) for i in range(5)]
    more = [container(PODMAN1, i, ports=1, dns_port=1153) for i in range(5, 30)]
    seq, batch = SimTable(), SimTable()
    for pf in first + more:
        netavark_setup(seq, pf)
    for pf in first:
        netavark_setup(batch, pf)
    batch.run(setup_networks=[PODMAN1], setup_ports=more)
    assert batch.shape() == seq.shape()


# --------------------------------------------------------------------------------------------------
# teardown


def test_teardown_one_of_two_keeps_the_other() -> None:
    a, b = container(PODMAN1, 0, ports=2, dns_port=1153), container(PODMAN1, 1, ports=2, dns_port=1153)
    sim, only_b = SimTable(), SimTable()
    netavark_setup(sim, a)
    netavark_setup(sim, b)
    netavark_setup(only_b, b)
    sim.run(teardown_ports=[a])
    assert rules_of(sim, "nv_2f259bab_10_88_0_0_nm16_dnat") == rules_of(only_b, "nv_2f259bab_10_88_0_0_nm16_dnat")
    assert rules_of(sim, DNAT_CHAIN) == rules_of(only_b, DNAT_CHAIN)


def test_teardown_everything_leaves_base_layout_and_orders_deletes() -> None:
    sim = SimTable()
    for pf in (CTR1, CTR2, CTR3, CTR4):
        netavark_setup(sim, pf)
    for pf in (CTR1, CTR2, CTR3, CTR4):
        cmds = plan_transaction(sim.listing(), teardown_ports=[pf], teardown_networks=[pf.network])
        verbs = [(next(iter(c)), next(iter(next(iter(c.values()))))) for c in cmds]
        # every rule delete comes before every chain delete
        assert verbs == sorted(verbs, key=lambda v: v[1] == "chain")
        # rules inside deleted chains are not deleted one by one
        dead = {c["delete"]["chain"]["name"] for c in cmds if "chain" in c["delete"]}
        assert not any(c["delete"]["rule"]["chain"] in dead for c in cmds if "rule" in c["delete"])
        sim.apply(cmds)
    base = SimTable()
    netavark_setup(base, PortFw(PODMAN1, "x", "x", None, None, None))
    base.run(teardown_networks=[PODMAN1])
    assert sim.shape() == base.shape()
    assert [n for n, _ in sim.shape()] == ["INPUT", "FORWARD", "POSTROUTING", "PREROUTING", "OUTPUT",
                                          *FIXED_CHAINS]
    assert sum(len(r) for _n, r in sim.shape()) == 7


def test_sequential_netavark_teardown_matches_one_batch() -> None:
    ctrs = [container(PODMAN1, i, ports=1, dns_port=1153) for i in range(20)]
    seq, batch = SimTable(), SimTable()
    for sim in (seq, batch):
        sim.run(setup_networks=[PODMAN1], setup_ports=ctrs)
    for i, pf in enumerate(ctrs):
        netavark_teardown(seq, pf, complete=i == len(ctrs) - 1)
    batch.run(teardown_ports=ctrs, teardown_networks=[PODMAN1])
    assert batch.shape() == seq.shape()


def test_stale_jump_does_not_block_chain_delete() -> None:
    """A container whose port rules were never torn down: netavark's batch would fail with EBUSY."""
    a, b = container(PODMAN1, 0, ports=1), container(PODMAN1, 1, ports=1)
    sim = SimTable()
    sim.run(setup_networks=[PODMAN1], setup_ports=[a, b])
    sim.run(teardown_ports=[a], teardown_networks=[PODMAN1])  # b forgotten
    assert rules_of(sim, DNAT_CHAIN) == []
    assert not any(n.startswith("nv_") for n, _ in sim.shape())


def test_teardown_and_setup_of_the_same_network_in_one_batch() -> None:
    a = container(PODMAN1, 0, ports=1, dns_port=1153)
    sim, fresh = SimTable(), SimTable()
    sim.run(setup_networks=[PODMAN1], setup_ports=[a])
    sim.run(teardown_ports=[a], teardown_networks=[PODMAN1], setup_networks=[PODMAN1], setup_ports=[a])
    fresh.run(setup_networks=[PODMAN1], setup_ports=[a])
    assert sim.shape() == fresh.shape()


def test_teardown_on_missing_table_is_empty() -> None:
    assert plan_transaction(None, teardown_ports=[CTR1], teardown_networks=[PODMAN1]) == []


def test_no_double_delete_of_one_handle() -> None:
    dup = PortFw(PODMAN1, "d", "d", CTR1.ipv4, None,
                 (PortMapping("", 80, 8080, 1, "tcp"), PortMapping("", 80, 8080, 1, "tcp")))
    sim = SimTable()
    sim.run(setup_networks=[PODMAN1], setup_ports=[dup])
    cmds = sim.run(teardown_ports=[dup])  # the simulator raises on a second delete of a handle
    handles = [c["delete"]["rule"]["handle"] for c in cmds]
    assert len(handles) == len(set(handles)) == 8


# --------------------------------------------------------------------------------------------------
# reload support and partial reads


def test_skip_existing_port_rules_makes_replay_idempotent() -> None:
    sim = SimTable()
    for pf in (CTR1, CTR2, CTR3, CTR4):
        netavark_setup(sim, pf)
    before = sim.shape()
    nets = [PODMAN1, STRICT1, ISO1, PODMAN]
    sim.run(setup_networks=nets, setup_ports=[CTR1, CTR2, CTR3, CTR4], skip_existing_port_rules=True)
    assert sim.shape() == before
    # …and without the flag, netavark's replay duplicates the port rules
    dup = copy.deepcopy(sim)
    dup.run(setup_networks=nets, setup_ports=[CTR1])
    assert len(rules_of(dup, DNAT_CHAIN)) > len(rules_of(sim, DNAT_CHAIN))


def _partial(listing: dict[str, Any] | None, need: set[str]) -> Table:
    full = Table.from_json(listing)
    return Table(exists=full.exists, chains=dict(full.chains),
                 rules=[r for r in full.rules if r[0] in need], loaded=set(need) & set(full.chains))


@pytest.mark.parametrize("seed", range(6))
def test_partial_read_gives_the_same_plan(seed: int) -> None:
    rng = random.Random(seed)
    nets = [PODMAN1, STRICT1, ISO1, PODMAN]
    ctrs = [container(n, i, ports=rng.choice([0, 1, 2]), dns_port=rng.choice([53, 1153]),
                      base_port=10000 + 100 * k) for k, n in enumerate(nets) for i in range(3)]
    sim = SimTable()
    sim.run(setup_networks=nets, setup_ports=ctrs)
    for _ in range(3):
        kwargs: dict[str, Any] = {}
        picked = rng.sample(ctrs, 4)
        torn = [n for n in nets if rng.random() < 0.3]
        kwargs["teardown_ports"] = [pf for pf in picked if rng.random() < 0.5]
        kwargs["teardown_networks"] = torn
        kwargs["setup_ports"] = [pf for pf in picked if pf not in kwargs["teardown_ports"]]
        kwargs["setup_networks"] = [pf.network for pf in kwargs["setup_ports"]]
        kwargs["skip_existing_port_rules"] = rng.random() < 0.5
        need = chains_to_read(**kwargs)
        full_plan = plan_transaction(sim.listing(), **kwargs)
        assert plan_transaction(_partial(sim.listing(), need), **kwargs) == full_plan
        sim.apply(full_plan)


def test_table_from_json_accepts_listing_forms() -> None:
    listing = {"nftables": [{"metainfo": {"version": "1.0.6"}},
                            {"table": {"family": "inet", "name": "netavark", "handle": 3}},
                            {"chain": {"family": "inet", "table": "netavark", "name": "INPUT", "handle": 1}},
                            {"chain": {"family": "inet", "table": "other", "name": "X", "handle": 2}},
                            {"rule": {"family": "inet", "table": "netavark", "chain": "INPUT", "handle": 5,
                                      "expr": [{"accept": None}]}}]}
    t = Table.from_json(listing)
    assert t.exists and list(t.chains) == ["INPUT"] and t.rules == [("INPUT", 5, [{"accept": None}])]
    import orjson
    assert Table.from_json(orjson.dumps(listing)).rules == t.rules
    assert not Table.from_json(None).exists and not Table.from_json("").exists


# --------------------------------------------------------------------------------------------------
# text rendering


def test_render_text_covers_every_planned_command() -> None:
    sim = SimTable()
    cmds = []
    for pf in (CTR1, CTR2, CTR3, CTR4):
        cmds += sim.run(setup_networks=[pf.network], setup_ports=[pf])
    for pf in (CTR1, CTR3):
        cmds += sim.run(teardown_ports=[pf], teardown_networks=[pf.network])
    text = render_text(cmds)
    assert text.count("\n") == len(cmds)
    assert "add chain inet netavark OUTPUT { type nat hook output priority -100; policy accept; }" in text
    assert 'insert rule inet netavark NETAVARK-ISOLATION-3 meta oifname == "podman1" drop' in text
    assert ("insert rule inet netavark NETAVARK-HOSTPORT-DNAT ip6 daddr == fd10:88:a::1 meta l4proto == "
            "{ udp, tcp } th dport == 53 dnat ip6 to [fd10:88:a::1]:1153") in text
    assert "FORWARD ip daddr == 10.88.0.0/16 ct state established,related accept" in text
    assert "add rule inet netavark NETAVARK-HOSTPORT-SETMARK meta mark set meta mark | 8192" in text
    assert "delete chain inet netavark nv_2f259bab_10_88_0_0_nm16_dnat" in text
    assert "delete rule inet netavark INPUT handle " in text


@pytest.mark.parametrize("cmd", [
    {"add": {"rule": {"family": "inet", "table": "netavark", "chain": "bad name", "expr": [{"accept": None}]}}},
    {"add": {"rule": {"family": "ip", "table": "filter", "chain": "INPUT", "expr": [{"accept": None}]}}},
    {"add": {"rule": {"family": "inet", "table": "netavark", "chain": "INPUT", "expr": [{"counter": None}]}}},
    {"add": {"rule": {"family": "inet", "table": "netavark", "chain": "INPUT",
                      "expr": [{"match": {"left": {"meta": {"key": "iifname"}}, "right": 'a"b', "op": "=="}}]}}},
    {"add": {"rule": {"family": "inet", "table": "netavark", "chain": "INPUT",
                      "expr": [{"mangle": {"key": {"meta": {"key": "mark"}}}}]}}},
])
def test_render_text_refuses_unknown_shapes(cmd: dict[str, Any]) -> None:
    with pytest.raises(Unrenderable):
        render_text([cmd])


def test_isolation_enum_values_are_state_file_values() -> None:
    assert [i.value for i in Isolation] == ["Never", "Normal", "Strict"]
    assert NetworkFw("i", "n", "b", (), ()).isolation is Isolation.NEVER


def test_locate_port_rules_finds_each_containers_handles() -> None:
    ctrs = [container(PODMAN1, i, ports=2) for i in range(5)]
    sim = SimTable()
    sim.run(setup_networks=[PODMAN1], setup_ports=ctrs)
    table = Table.from_json(sim.listing())
    found = locate_port_rules(table, ctrs)
    assert set(found) == {pf.key for pf in ctrs}
    handles = [h for refs in found.values() for _c, h in refs]
    assert len(handles) == len(set(handles)) == 5 * 8
    # deleting exactly those handles removes exactly that container
    cmds = [{"delete": {"rule": {"family": "inet", "table": "netavark", "chain": c, "handle": h}}}
            for c, h in found[ctrs[2].key]]
    sim.apply(cmds)
    other = SimTable()
    other.run(setup_networks=[PODMAN1], setup_ports=[pf for pf in ctrs if pf is not ctrs[2]])
    assert sim.shape() == other.shape()
    # a container whose rules are not all there is left out
    missing = container(PODMAN1, 9, ports=1)
    assert missing.key not in locate_port_rules(table, [missing])
