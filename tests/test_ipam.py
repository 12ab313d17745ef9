"""Pure IPAM: usable ranges, round-robin allocation, static claims, batch atomicity (no kernel, no files)."""

from __future__ import annotations

import ipaddress
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncnet.errors import IpamError
from asyncnet.ipam import (
    SubnetPool,
    allocate_batch,
    check_assignable,
    host_bounds,
    usable_count,
    usable_range,
)
from asyncnet.types import LeaseRange, Network, Subnet, parse_network_options

ip = ipaddress.ip_address


def subnet(cidr: str, gateway: str | None = None, start: str | None = None, end: str | None = None) -> Subnet:
    lease = None
    if start or end:
        lease = LeaseRange(ip(start) if start else None, ip(end) if end else None)
    return Subnet(ipaddress.ip_network(cidr), ip(gateway) if gateway else None, lease)


def rng(sub: Subnet) -> tuple[str, str] | None:
    r = usable_range(sub)
    return None if r is None else (str(r[0]), str(r[1]))


# -- usable range -----------------------------------------------------------------------------------


def test_usable_range_excludes_network_broadcast_and_counts_gateway() -> None:
    sub = subnet("10.88.0.0/24", "10.88.0.1")
    assert rng(sub) == ("10.88.0.1", "10.88.0.254")
    assert usable_count(sub) == 253  # .1 is the gateway


def test_usable_range_v6_has_no_broadcast() -> None:
    sub = subnet("fd00::/120", "fd00::1")
    assert rng(sub) == ("fd00::1", "fd00::ff")
    assert usable_count(sub) == 254


@pytest.mark.parametrize(("cidr", "expected"), [
    ("10.0.0.0/31", ("10.0.0.0", "10.0.0.1")),
    ("10.0.0.7/32", ("10.0.0.7", "10.0.0.7")),
    ("fd00::/127", ("fd00::", "fd00::1")),
    ("fd00::5/128", ("fd00::5", "fd00::5")),
    ("10.0.0.0/30", ("10.0.0.1", "10.0.0.2")),
])
def test_point_to_point_and_single_address_prefixes(cidr: str, expected: tuple[str, str]) -> None:
    assert rng(subnet(cidr)) == expected


def test_slash32_whose_only_address_is_the_gateway_has_nothing() -> None:
    sub = subnet("10.0.0.7/32", "10.0.0.7")
    assert usable_count(sub) == 0
    with pytest.raises(IpamError, match="subnet 10.0.0.7/32 of network n has no address to allocate"):
        SubnetPool(sub, "n").allocate("c")


def test_lease_range_bounds_and_clamping() -> None:
    assert rng(subnet("10.0.0.0/24", "10.0.0.1", "10.0.0.100", "10.0.0.110")) == ("10.0.0.100", "10.0.0.110")
    assert rng(subnet("10.0.0.0/24", None, "10.0.0.200")) == ("10.0.0.200", "10.0.0.254")
    assert rng(subnet("10.0.0.0/24", None, None, "10.0.0.9")) == ("10.0.0.1", "10.0.0.9")
    # podman may write a start equal to the network address: clamp to the first host
    assert rng(subnet("10.0.0.0/24", None, "10.0.0.0", "10.0.0.255")) == ("10.0.0.1", "10.0.0.254")
    assert usable_count(subnet("10.0.0.0/24", "10.0.0.5", "10.0.0.5", "10.0.0.6")) == 1


def test_big_subnets_are_not_materialised() -> None:
    t0 = time.perf_counter()
    v6 = SubnetPool(subnet("fd00::/64", "fd00::1"), "big6")
    v4 = SubnetPool(subnet("10.0.0.0/8", "10.0.0.1"), "big4")
    assert v6.free_count == 2**64 - 2
    assert v4.free_count == 2**24 - 3
    assert str(v6.allocate("a")) == "fd00::2"
    assert str(v4.allocate("a")) == "10.0.0.2"
    assert time.perf_counter() - t0 < 0.05


def test_host_bounds() -> None:
    assert host_bounds(ipaddress.ip_network("192.168.1.0/24")) == (int(ip("192.168.1.1")), int(ip("192.168.1.254")))


# -- pool -------------------------------------------------------------------------------------------


def test_round_robin_skips_gateway_and_taken_then_wraps() -> None:
    taken = {ip("10.0.0.3"): ("x", True)}
    pool = SubnetPool(subnet("10.0.0.0/29", "10.0.0.1"), "n", taken)
    got = [str(pool.allocate(c)) for c in "abcd"]
    assert got == ["10.0.0.2", "10.0.0.4", "10.0.0.5", "10.0.0.6"]
    pool.release(ip("10.0.0.4"))
    pool.release(ip("10.0.0.2"))
    # after the last allocated (.6) comes the end: wrap and take the lowest free
    assert str(pool.allocate("e")) == "10.0.0.2"
    assert str(pool.allocate("f")) == "10.0.0.4"
    with pytest.raises(IpamError, match=r"no free IP address left in subnet 10.0.0.0/29 of network n: "
                                        r"all 5 addresses of 10.0.0.1-10.0.0.6 are allocated"):
        pool.allocate("g")


def test_cursor_persists_round_robin_across_pools() -> None:
    sub = subnet("10.0.0.0/24", "10.0.0.1")
    pool = SubnetPool(sub, "n", {ip("10.0.0.2"): ("a", False)}, cursor=ip("10.0.0.2"))
    pool.release(ip("10.0.0.2"))
    assert str(pool.allocate("b")) == "10.0.0.3"  # a just-released address is not reused first
    assert str(pool.cursor_address) == "10.0.0.3"
    # a cursor outside the (changed) lease range restarts at the range's start
    pool = SubnetPool(subnet("10.0.0.0/24", "10.0.0.1", "10.0.0.50", "10.0.0.60"), "n", cursor=ip("10.0.0.3"))
    assert str(pool.allocate("c")) == "10.0.0.50"


def test_allocate_is_idempotent_per_container() -> None:
    pool = SubnetPool(subnet("10.0.0.0/24"), "n")
    first = pool.allocate("a")
    assert pool.allocate("a") == first
    assert pool.free_count == 253


def test_static_claims() -> None:
    pool = SubnetPool(subnet("10.0.0.0/24", "10.0.0.1", "10.0.0.10", "10.0.0.20"), "net1")
    pool.claim(ip("10.0.0.10"), "a")
    pool.claim(ip("10.0.0.10"), "a")  # idempotent
    pool.claim(ip("10.0.0.200"), "s")  # outside the lease range is fine for a static address
    assert str(pool.allocate("b")) == "10.0.0.11"
    with pytest.raises(IpamError, match="IP address 10.0.0.11 requested by container c on network net1 is "
                                        "already allocated to container b"):
        pool.claim(ip("10.0.0.11"), "c")
    with pytest.raises(IpamError, match="is the gateway"):
        pool.claim(ip("10.0.0.1"), "c")
    with pytest.raises(IpamError, match="network or broadcast"):
        pool.claim(ip("10.0.0.255"), "c")
    with pytest.raises(IpamError, match="not in subnet"):
        pool.claim(ip("10.0.1.5"), "c")
    # a new static address replaces the container's old one
    pool.claim(ip("10.0.0.12"), "a")
    assert pool.holder(ip("10.0.0.10")) is None
    assert str(pool.held_by("a")) == "10.0.0.12"


def test_check_assignable_v6() -> None:
    sub = subnet("fd00::/64", "fd00::1")
    check_assignable(ip("fd00::ffff"), sub, "n")
    with pytest.raises(IpamError, match="network or broadcast"):
        check_assignable(ip("fd00::"), sub, "n")
    with pytest.raises(IpamError, match="not in subnet"):
        check_assignable(ip("10.0.0.1"), sub, "n")


def test_changes_report_only_the_difference() -> None:
    pool = SubnetPool(subnet("10.0.0.0/24"), "n", {ip("10.0.0.5"): ("a", False), ip("10.0.0.6"): ("b", True)})
    pool.release(ip("10.0.0.5"))
    pool.allocate("c")
    removed, added = pool.changes()
    assert [str(x) for x in removed] == ["10.0.0.5"]
    assert {str(k): v for k, v in added.items()} == {"10.0.0.1": ("c", False)}


# -- batch ------------------------------------------------------------------------------------------


def network(name: str = "net1", subnets: list[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
    return {"name": name, "id": f"id-{name}", "driver": "bridge", "network_interface": f"br-{name}",
            "subnets": subnets if subnets is not None else [{"subnet": "10.0.0.0/24", "gateway": "10.0.0.1"}],
            **extra}


def container(cid: str, nets: dict[str, dict[str, Any]], static: dict[str, list[str]] | None = None):
    per = {name: {"interface_name": f"eth{i}", **({"static_ips": static[name]} if static and name in static
                                                  else {})}
           for i, name in enumerate(sorted(nets))}
    return parse_network_options({"container_id": cid, "container_name": cid, "networks": per,
                                  "network_info": nets})


class Pools:
    def __init__(self) -> None:
        self.pools: dict[tuple[str, str], SubnetPool] = {}

    def __call__(self, net: Network, sub: Subnet) -> SubnetPool:
        key = (net.id, str(sub.subnet))
        if key not in self.pools:
            self.pools[key] = SubnetPool(sub, net.name)
        return self.pools[key]


def addrs(result: Any, net: str = "net1") -> list[str]:
    return [str(a) for a in result[net]]


def test_batch_one_address_per_subnet_with_prefix() -> None:
    net = network(subnets=[{"subnet": "10.0.0.0/24", "gateway": "10.0.0.1"},
                           {"subnet": "fd00::/64", "gateway": "fd00::1"}])
    res = allocate_batch([container("a", {"net1": net}), container("b", {"net1": net})], Pools())
    assert addrs(res["a"]) == ["10.0.0.2/24", "fd00::2/64"]
    assert addrs(res["b"]) == ["10.0.0.3/24", "fd00::3/64"]


def test_batch_statics_first_so_dynamic_never_steals_them() -> None:
    net = network()
    batch = [container("dyn", {"net1": net}), container("st", {"net1": net}, {"net1": ["10.0.0.2"]})]
    res = allocate_batch(batch, Pools())
    assert addrs(res["st"]) == ["10.0.0.2/24"]
    assert addrs(res["dyn"]) == ["10.0.0.3/24"]


def test_batch_failure_is_per_container_and_leaves_no_trace() -> None:
    small = network("small", [{"subnet": "10.1.0.0/30", "gateway": "10.1.0.1"}])  # one address: .2
    big = network("big", [{"subnet": "10.2.0.0/24", "gateway": "10.2.0.1"}])
    pools = Pools()
    batch = [container("a", {"small": small, "big": big}),
             container("b", {"big": big, "small": small}),  # big allocates, then small is exhausted
             container("c", {"big": big})]
    res = allocate_batch(batch, pools)
    assert addrs(res["a"], "small") == ["10.1.0.2/30"] and addrs(res["a"], "big") == ["10.2.0.2/24"]
    err = res["b"]
    assert isinstance(err, IpamError)
    assert "subnet 10.1.0.0/30 of network small" in str(err)
    assert addrs(res["c"], "big") == ["10.2.0.3/24"]  # b's rolled-back .3 went back into the pool
    big_pool = pools.pools[("id-big", "10.2.0.0/24")]
    assert big_pool.held_by("b") is None and big_pool.free_count == 253 - 2


def test_batch_static_conflict_names_both_containers() -> None:
    net = network()
    batch = [container("a", {"net1": net}, {"net1": ["10.0.0.9"]}),
             container("b", {"net1": net}, {"net1": ["10.0.0.9"]})]
    res = allocate_batch(batch, Pools())
    assert addrs(res["a"]) == ["10.0.0.9/24"]
    assert "10.0.0.9 requested by container b on network net1 is already allocated to container a" in str(res["b"])


def test_batch_duplicate_ids_and_ipam_none() -> None:
    net = network()
    none_net = network("raw", [], ipam_options={"driver": "none"})
    batch = [container("a", {"net1": net}), container("a", {"net1": net}), container("n", {"raw": none_net})]
    res = allocate_batch(batch, Pools())
    assert "appears 2 times" in str(res["a"])
    assert res["n"] == {"raw": ()}


def test_batch_of_1000_is_fast_and_linear() -> None:
    net = network(subnets=[{"subnet": "10.0.0.0/16", "gateway": "10.0.0.1"}])
    pools = Pools()
    # a dense block already taken in front of the cursor: the scan passes it once, not once per container
    pool = pools(_net(net), _net(net).subnets[0])
    for i in range(2, 5002):
        pool.claim(ipaddress.IPv4Address(int(ip("10.0.0.0")) + i), f"old{i}")
    batch = [container(f"c{i}", {"net1": net}) for i in range(1000)]
    t0 = time.perf_counter()
    res = allocate_batch(batch, pools)
    elapsed = time.perf_counter() - t0
    got = {str(r["net1"][0]) for r in res.values()}
    assert len(got) == 1000
    assert elapsed < 0.5, elapsed


def _net(raw: dict[str, Any]) -> Network:
    from asyncnet.types import parse_network
    return parse_network(raw, "n")


# -- property: the pool against a brute-force model ----------------------------------------------------


@st.composite
def subnets(draw: st.DrawFn) -> Subnet:
    v6 = draw(st.booleans())
    prefix = draw(st.integers(120, 128) if v6 else st.integers(24, 32))
    base = "fd00::" if v6 else "10.9.8.0"
    net = ipaddress.ip_network(f"{base}/{prefix}", strict=False)
    lo, hi = int(net.network_address), int(net.broadcast_address)
    gateway = draw(st.none() | st.integers(lo, hi))
    start = draw(st.none() | st.integers(lo, hi))
    end = draw(st.none() | st.integers(start if start is not None else lo, hi))
    make = ipaddress.IPv6Address if v6 else ipaddress.IPv4Address
    lease = None if start is None and end is None else LeaseRange(
        None if start is None else make(start), None if end is None else make(end))
    return Subnet(net, None if gateway is None else make(gateway), lease)


ops = st.lists(st.tuples(st.sampled_from(["alloc", "alloc", "alloc", "release", "claim"]), st.integers(0, 300)),
               max_size=120)


@settings(max_examples=300, deadline=None)
@given(subnets(), ops)
def test_pool_matches_brute_force_model(sub: Subnet, steps: list[tuple[str, int]]) -> None:
    net = sub.subnet
    lo, hi = int(net.network_address), int(net.broadcast_address)
    v4_reserved = net.version == 4 and net.prefixlen < 31
    v6_reserved = net.version == 6 and net.prefixlen < 127
    hosts = [a for a in range(lo, hi + 1)
             if not ((v4_reserved or v6_reserved) and a == lo) and not (v4_reserved and a == hi)]
    gw = None if sub.gateway is None else int(sub.gateway)
    start = int(sub.lease_range.start_ip) if sub.lease_range and sub.lease_range.start_ip else None
    end = int(sub.lease_range.end_ip) if sub.lease_range and sub.lease_range.end_ip else None
    dynamic = [a for a in hosts if a != gw and (start is None or a >= start) and (end is None or a <= end)]
    assert usable_count(sub) == len(dynamic)

    pool = SubnetPool(sub, "prop")
    model: dict[int, str] = {}
    cursor: int | None = None
    for n, (op, arg) in enumerate(steps):
        cid = f"c{n}"
        if op == "alloc":
            free = [a for a in dynamic if a not in model]
            if not free:
                with pytest.raises(IpamError, match="prop"):
                    pool.allocate(cid)
                continue
            after = [a for a in free if cursor is not None and a > cursor]
            expected = after[0] if after else free[0]
            got = int(pool.allocate(cid))
            assert got == expected
            model[got] = cid
            cursor = got
        elif op == "release" and model:
            victim = sorted(model)[arg % len(model)]
            pool.release(pool._make(victim))
            del model[victim]
        elif op == "claim":
            target = lo + arg % (hi - lo + 1)
            addr = pool._make(target)
            if target not in hosts or target == gw or target in model:
                with pytest.raises(IpamError):
                    pool.claim(addr, cid)
            else:
                pool.claim(addr, cid)
                model[target] = cid
        assert pool.free_count == len([a for a in dynamic if a not in model])
        assert {int(k): v[0] for k, v in pool.changes()[1].items()} == model
