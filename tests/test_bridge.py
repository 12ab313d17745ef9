"""The bridge driver through the library API (Engine → real kernel), in a private host namespace.

Every test builds its containers in the sandbox, checks the kernel state with ``ip -j`` / ``/proc/sys``
(never through asyncnet itself), pings only addresses it assigned, tears down and checks that only
``lo`` is left on both sides. The firewall is ``none``: rules and DNS are tested elsewhere.
"""

from __future__ import annotations

import errno
from typing import Any

import anyio
import pytest
from _bridge_util import (
    NET_ID2,
    add_veth,
    addr_info,
    addrs,
    assert_only_lo,
    link,
    link_names,
    network,
    options,
    ping,
    ports,
    routes,
    simple,
    sysctls,
)

from asyncnet.engine import Container, Engine, Result
from asyncnet.errors import MultipleErrors
from asyncnet.sandbox import Sandbox
from asyncnet.types import parse_network_options

pytestmark = pytest.mark.anyio

GW_EEXIST = "Netlink error: File exists (os error 17)"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def engine(sb: Sandbox, **kw: Any) -> Engine:
    return Engine(config_dir=sb.config_dir, firewall="none", host_netns=sb.host, **kw)


def batch(pairs: list[tuple[str, dict[str, Any]]]) -> list[Container]:
    return [Container.of(ns, parse_network_options(doc)) for ns, doc in pairs]


async def setup(sb: Sandbox, *pairs: tuple[str, dict[str, Any]]) -> list[Result]:
    async with engine(sb) as e:
        return await e.setup(batch(list(pairs)))


async def teardown(sb: Sandbox, *pairs: tuple[str, dict[str, Any]]) -> list[Result]:
    async with engine(sb) as e:
        return await e.teardown(batch(list(pairs)))


async def up(sb: Sandbox, ns: str, doc: dict[str, Any]) -> dict[str, Any]:
    [res] = await setup(sb, (ns, doc))
    assert res.ok, res.error
    assert res.status is not None
    return {name: block.to_json() for name, block in res.status.items()}


async def down(sb: Sandbox, ns: str, doc: dict[str, Any]) -> None:
    [res] = await teardown(sb, (ns, doc))
    assert res.ok, res.error


def dual(**extra: Any) -> dict[str, Any]:
    return network(subnets=[("10.88.0.0/16", "10.88.0.1"), ("fd10:88:a::/64", "fd10:88:a::1")], **extra)


def two_networks(container: int = 1) -> dict[str, Any]:
    """net1 → bridge podman0 / eth0, net2 → bridge podman1 / eth1 (sorted order = eth0 first)."""
    return options(container, [
        (network("net1", "podman0"), {"interface_name": "eth0", "static_ips": ["10.88.0.2"]}),
        (network("net2", "podman1", subnets=[("10.89.0.0/24", "10.89.0.1")], net_id=NET_ID2),
         {"interface_name": "eth1", "static_ips": ["10.89.0.2"]}),
    ])


# --------------------------------------------------------------------------------------------------


async def test_simple_v4(sandbox: Sandbox) -> None:
    c = sandbox.netns("c1")
    doc = simple()
    status = await up(sandbox, c, doc)

    eth0 = link(sandbox, "eth0", c)
    assert status == {"podman": {
        "dns_search_domains": [],
        "dns_server_ips": [],
        "interfaces": {"eth0": {"mac_address": eth0["address"],
                                "subnets": [{"gateway": "10.88.0.1", "ipnet": "10.88.0.2/16"}]}},
    }}
    assert eth0["linkinfo"]["info_kind"] == "veth" and "UP" in eth0["flags"]
    assert addrs(sandbox, "eth0", c) == ["10.88.0.2/16"]
    assert "UP" in link(sandbox, "lo", c)["flags"]
    assert routes(sandbox, c) == ["default via 10.88.0.1 dev eth0 metric 100"]

    br = link(sandbox, "podman0")
    assert br["linkinfo"]["info_kind"] == "bridge" and "UP" in br["flags"]
    assert addrs(sandbox, "podman0") == ["10.88.0.1/16"]
    [host_veth] = ports(sandbox, "podman0")
    hv = link(sandbox, host_veth)
    assert hv["linkinfo"]["info_kind"] == "veth" and "UP" in hv["flags"]
    assert hv["address"] != br["address"], "bridge and veth must have different MAC addresses"

    assert sysctls(sandbox, ["net/ipv4/ip_forward", "net/ipv4/conf/podman0/rp_filter",
                             "net/ipv6/conf/all/forwarding"]) == {
        "net/ipv4/ip_forward": "1", "net/ipv4/conf/podman0/rp_filter": "2",
        "net/ipv6/conf/all/forwarding": "0"}  # v4-only network: IPv6 forwarding untouched
    assert sysctls(sandbox, ["net/ipv4/conf/eth0/arp_notify", "net/ipv4/conf/eth0/rp_filter",
                             "net/ipv6/conf/eth0/autoconf"], c) == {
        "net/ipv4/conf/eth0/arp_notify": "1", "net/ipv4/conf/eth0/rp_filter": "2",
        "net/ipv6/conf/eth0/autoconf": "0"}

    assert ping(sandbox, c, "10.88.0.1")
    assert ping(sandbox, None, "10.88.0.2")

    await down(sandbox, c, doc)
    assert_only_lo(sandbox, None, c)


async def test_dual_stack(sandbox: Sandbox) -> None:
    c = sandbox.netns("c1")
    doc = options(1, [(dual(), {"interface_name": "eth0", "static_ips": ["10.88.0.2", "fd10:88:a::2"]})])
    status = await up(sandbox, c, doc)
    assert status["podman"]["interfaces"]["eth0"]["subnets"] == [
        {"gateway": "10.88.0.1", "ipnet": "10.88.0.2/16"},
        {"gateway": "fd10:88:a::1", "ipnet": "fd10:88:a::2/64"},
    ]

    assert addrs(sandbox, "eth0", c) == ["10.88.0.2/16", "fd10:88:a::2/64"]
    assert addr_info(sandbox, "eth0", "fd10:88:a::2", c).get("nodad") is True
    assert "tentative" not in addr_info(sandbox, "eth0", "fd10:88:a::2", c)
    assert addrs(sandbox, "podman0") == ["10.88.0.1/16", "fd10:88:a::1/64"]
    assert addr_info(sandbox, "podman0", "fd10:88:a::1").get("nodad") is True
    assert routes(sandbox, c, 6) == ["default via fd10:88:a::1 dev eth0 metric 100"]

    [host_veth] = ports(sandbox, "podman0")
    assert sysctls(sandbox, ["net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding",
                             "net/ipv6/conf/podman0/accept_dad", "net/ipv6/conf/podman0/accept_ra",
                             f"net/ipv6/conf/{host_veth}/accept_dad"]) == {
        "net/ipv4/ip_forward": "1", "net/ipv6/conf/all/forwarding": "1",
        "net/ipv6/conf/podman0/accept_dad": "0", "net/ipv6/conf/podman0/accept_ra": "0",
        f"net/ipv6/conf/{host_veth}/accept_dad": "0"}
    assert sysctls(sandbox, ["net/ipv6/conf/eth0/accept_dad", "net/ipv6/conf/eth0/autoconf"], c) == {
        "net/ipv6/conf/eth0/accept_dad": "0", "net/ipv6/conf/eth0/autoconf": "0"}

    assert ping(sandbox, c, "fd10:88:a::1")
    assert ping(sandbox, c, "10.88.0.1")
    assert ping(sandbox, None, "fd10:88:a::2")

    await down(sandbox, c, doc)
    assert_only_lo(sandbox, None, c)


async def test_two_containers_ping_each_other(sandbox: Sandbox) -> None:
    c1, c2 = sandbox.netns("c1"), sandbox.netns("c2")
    d1, d2 = simple(1, "10.88.0.2"), simple(2, "10.88.0.3")
    results = await setup(sandbox, (c1, d1), (c2, d2))
    assert [r.ok for r in results] == [True, True], [r.error for r in results]
    assert len(ports(sandbox, "podman0")) == 2

    assert ping(sandbox, c1, "10.88.0.3")
    assert ping(sandbox, c2, "10.88.0.2")
    assert ping(sandbox, c1, "10.88.0.1")
    assert ping(sandbox, c2, "10.88.0.1")

    results = await teardown(sandbox, (c1, d1), (c2, d2))
    assert [r.error for r in results] == [None, None]
    assert_only_lo(sandbox, None, c1, c2)


async def test_teardown_removes_bridge_only_with_last_port(sandbox: Sandbox) -> None:
    c1, c2 = sandbox.netns("c1"), sandbox.netns("c2")
    d1, d2 = simple(1, "10.88.0.2"), simple(2, "10.88.0.3")
    await up(sandbox, c1, d1)
    mac = link(sandbox, "podman0")["address"]
    await up(sandbox, c2, d2)
    assert link(sandbox, "podman0")["address"] == mac, "bridge MAC changed when a port was added"

    await down(sandbox, c1, d1)
    assert link_names(sandbox) == sorted(["lo", "podman0", *ports(sandbox, "podman0")])
    assert len(ports(sandbox, "podman0")) == 1
    assert link(sandbox, "podman0")["address"] == mac, "bridge MAC changed when a port was removed"
    assert addrs(sandbox, "podman0") == ["10.88.0.1/16"]
    assert_only_lo(sandbox, c1)
    assert ping(sandbox, c2, "10.88.0.1")

    await down(sandbox, c2, d2)
    assert_only_lo(sandbox, None, c2)


async def test_two_networks_on_one_container(sandbox: Sandbox) -> None:
    c = sandbox.netns("c1")
    doc = two_networks()
    status = await up(sandbox, c, doc)
    assert sorted(status) == ["net1", "net2"]
    assert list(status["net1"]["interfaces"]) == ["eth0"]
    assert list(status["net2"]["interfaces"]) == ["eth1"]

    assert addrs(sandbox, "eth0", c) == ["10.88.0.2/16"]
    assert addrs(sandbox, "eth1", c) == ["10.89.0.2/24"]
    assert routes(sandbox, c) == ["default via 10.88.0.1 dev eth0 metric 100",
                                  "default via 10.89.0.1 dev eth1 metric 100"]
    assert len(ports(sandbox, "podman0")) == 1 and len(ports(sandbox, "podman1")) == 1
    assert ping(sandbox, c, "10.88.0.1")
    assert ping(sandbox, c, "10.89.0.1")

    await down(sandbox, c, doc)
    assert_only_lo(sandbox, None, c)


async def test_static_routes(sandbox: Sandbox) -> None:
    """netavark's own case: one route's gateway is reachable only through another container interface
    (not the network's), and teardown removes that route too."""
    c = sandbox.netns("c1")
    add_veth(sandbox, "ext0", "ext1", c)
    sandbox.run(["ip", "addr", "add", "10.91.0.10/24", "dev", "ext0"], c)
    sandbox.run(["ip", "link", "set", "ext0", "up"], c)
    sandbox.run(["ip", "link", "set", "ext1", "up"], c)
    doc = options(1, [(dual(routes=[
        {"destination": "10.89.0.0/24", "gateway": "10.88.0.2"},
        {"destination": "10.90.0.0/24", "gateway": "10.88.0.3", "metric": 50},
        {"destination": "10.92.0.0/24", "gateway": "10.91.0.1"},
        {"destination": "fd10:89:b::/64", "gateway": "fd10:88:a::ac02"},
    ]), {"interface_name": "eth0", "static_ips": ["10.88.0.2", "fd10:88:a::2"]})])
    await up(sandbox, c, doc)
    assert routes(sandbox, c) == [
        "10.89.0.0/24 via 10.88.0.2 dev eth0 metric 100",
        "10.90.0.0/24 via 10.88.0.3 dev eth0 metric 50",
        "10.92.0.0/24 via 10.91.0.1 dev ext0 metric 100",
        "default via 10.88.0.1 dev eth0 metric 100",
    ]
    assert routes(sandbox, c, 6) == [
        "default via fd10:88:a::1 dev eth0 metric 100",
        "fd10:89:b::/64 via fd10:88:a::ac02 dev eth0 metric 100",
    ]

    await down(sandbox, c, doc)
    assert routes(sandbox, c) == [] and routes(sandbox, c, 6) == []
    assert link_names(sandbox, c) == ["ext0", "ext1", "lo"]
    sandbox.run(["ip", "link", "del", "ext0"], c)
    assert_only_lo(sandbox, None, c)


async def test_no_default_route(sandbox: Sandbox) -> None:
    c = sandbox.netns("c1")
    doc = options(1, [(dual(options={"no_default_route": "true"},
                            routes=[{"destination": "10.89.0.0/24", "gateway": "10.88.0.3"}]),
                       {"interface_name": "eth0", "static_ips": ["10.88.0.2", "fd10:88:a::2"]})])
    await up(sandbox, c, doc)
    assert routes(sandbox, c) == ["10.89.0.0/24 via 10.88.0.3 dev eth0 metric 100"]
    assert routes(sandbox, c, 6) == []
    assert ping(sandbox, c, "10.88.0.1")
    await down(sandbox, c, doc)
    assert_only_lo(sandbox, None, c)


async def test_metric(sandbox: Sandbox) -> None:
    c = sandbox.netns("c1")
    doc = options(1, [(dual(options={"metric": "200"},
                            routes=[{"destination": "10.89.0.0/24", "gateway": "10.88.0.3"}]),
                       {"interface_name": "eth0", "static_ips": ["10.88.0.2", "fd10:88:a::2"]})])
    await up(sandbox, c, doc)
    # the metric option is for default routes; static routes keep their own (default 100)
    assert routes(sandbox, c) == ["10.89.0.0/24 via 10.88.0.3 dev eth0 metric 100",
                                  "default via 10.88.0.1 dev eth0 metric 200"]
    assert routes(sandbox, c, 6) == ["default via fd10:88:a::1 dev eth0 metric 200"]
    await down(sandbox, c, doc)
    assert_only_lo(sandbox, None, c)


async def test_internal_network(sandbox: Sandbox) -> None:
    # forwarding on: a new bridge would inherit forwarding=1, so the 0 below is the driver's doing
    sandbox.run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"])
    c = sandbox.netns("c1")
    doc = options(1, [(dual(internal=True), {"interface_name": "eth0",
                                             "static_ips": ["10.88.0.2", "fd10:88:a::2"]})])
    await up(sandbox, c, doc)
    assert sysctls(sandbox, ["net/ipv4/conf/podman0/forwarding", "net/ipv6/conf/podman0/forwarding"]) == {
        "net/ipv4/conf/podman0/forwarding": "0", "net/ipv6/conf/podman0/forwarding": "0"}
    assert routes(sandbox, c) == [] and routes(sandbox, c, 6) == []
    assert ping(sandbox, c, "10.88.0.1")
    await down(sandbox, c, doc)
    assert_only_lo(sandbox, None, c)


async def test_internal_network_leaves_host_forwarding_alone(sandbox: Sandbox) -> None:
    c = sandbox.netns("c1")
    doc = options(1, [(network(internal=True), {"interface_name": "eth0", "static_ips": ["10.88.0.2"]})])
    await up(sandbox, c, doc)
    assert sysctls(sandbox, ["net/ipv4/ip_forward", "net/ipv4/conf/podman0/forwarding"]) == {
        "net/ipv4/ip_forward": "0", "net/ipv4/conf/podman0/forwarding": "0"}
    await down(sandbox, c, doc)
    assert_only_lo(sandbox, None, c)


async def test_static_mac(sandbox: Sandbox) -> None:
    c = sandbox.netns("c1")
    doc = simple(static_mac="02:42:AC:11:00:09")
    status = await up(sandbox, c, doc)
    assert status["podman"]["interfaces"]["eth0"]["mac_address"] == "02:42:ac:11:00:09"
    assert link(sandbox, "eth0", c)["address"] == "02:42:ac:11:00:09"
    await down(sandbox, c, doc)
    assert_only_lo(sandbox, None, c)


async def test_mtu(sandbox: Sandbox) -> None:
    c = sandbox.netns("c1")
    doc = options(1, [(network(options={"mtu": "1400"}), {"interface_name": "eth0",
                                                          "static_ips": ["10.88.0.2"]})])
    await up(sandbox, c, doc)
    [host_veth] = ports(sandbox, "podman0")
    assert link(sandbox, "podman0")["mtu"] == 1400
    assert link(sandbox, host_veth)["mtu"] == 1400
    assert link(sandbox, "eth0", c)["mtu"] == 1400
    assert ping(sandbox, c, "10.88.0.1")
    await down(sandbox, c, doc)
    assert_only_lo(sandbox, None, c)


async def test_ipam_none(sandbox: Sandbox) -> None:
    c = sandbox.netns("c1")
    doc = options(1, [(network(subnets=[], ipam_options={"driver": "none"}), {"interface_name": "eth0"})])
    status = await up(sandbox, c, doc)
    assert status["podman"]["interfaces"]["eth0"]["subnets"] == []
    assert addrs(sandbox, "eth0", c) == [] and addrs(sandbox, "podman0") == []
    assert routes(sandbox, c) == []
    assert "UP" in link(sandbox, "eth0", c)["flags"]
    await down(sandbox, c, doc)
    assert_only_lo(sandbox, None, c)


async def test_bridge_reuse(sandbox: Sandbox) -> None:
    """A bridge made with `ip link add` (kernel-random MAC) is reused, and its MAC stays put as ports
    come and go (the kernel would otherwise switch it to the lowest port MAC, then to 00:00:…)."""
    sandbox.run(["ip", "link", "add", "podman0", "type", "bridge"])
    before = link(sandbox, "podman0")
    c1, c2 = sandbox.netns("c1"), sandbox.netns("c2")
    d1, d2 = simple(1, "10.88.0.2"), simple(2, "10.88.0.3")

    await up(sandbox, c1, d1)
    after = link(sandbox, "podman0")
    assert after["ifindex"] == before["ifindex"], "the existing bridge was not reused"
    assert after["address"] == before["address"]
    assert "UP" in after["flags"] and addrs(sandbox, "podman0") == ["10.88.0.1/16"]
    await up(sandbox, c2, d2)
    assert link(sandbox, "podman0")["address"] == before["address"]
    assert ping(sandbox, c1, "10.88.0.3")

    await down(sandbox, c1, d1)
    assert link(sandbox, "podman0")["address"] == before["address"]
    assert ping(sandbox, c2, "10.88.0.1")
    await down(sandbox, c2, d2)
    assert_only_lo(sandbox, None, c1, c2)


async def test_non_bridge_link_with_the_bridge_name(sandbox: Sandbox) -> None:
    add_veth(sandbox, "podman0", "podman0p")
    c = sandbox.netns("c1")
    [res] = await setup(sandbox, (c, simple()))
    assert str(res.error) == "bridge interface podman0 already exists but is a veth interface"
    assert link_names(sandbox) == ["lo", "podman0", "podman0p"]
    assert link(sandbox, "podman0")["linkinfo"]["info_kind"] == "veth"
    assert addrs(sandbox, "podman0") == []
    assert_only_lo(sandbox, c)
    sandbox.run(["ip", "link", "del", "podman0"])
    assert_only_lo(sandbox, None)


async def test_container_interface_exists(sandbox: Sandbox) -> None:
    c = sandbox.netns("c1")
    add_veth(sandbox, "eth0", "eth0p", c)
    [res] = await setup(sandbox, (c, simple()))
    assert str(res.error) == ("create veth pair: interface eth0 already exists on container namespace: "
                              + GW_EEXIST)
    assert res.error.code == errno.EEXIST
    assert_only_lo(sandbox, None)  # the bridge this call made is gone again
    assert link_names(sandbox, c) == ["eth0", "eth0p", "lo"]
    assert addrs(sandbox, "eth0", c) == []
    sandbox.run(["ip", "link", "del", "eth0"], c)
    assert_only_lo(sandbox, c)


async def test_second_setup_of_same_container_keeps_the_first(sandbox: Sandbox) -> None:
    """A repeated setup fails loudly; its rollback must not destroy the working attachment."""
    c = sandbox.netns("c1")
    doc = simple()
    await up(sandbox, c, doc)
    [res] = await setup(sandbox, (c, doc))
    assert not res.ok
    assert "already" in str(res.error)
    assert addrs(sandbox, "eth0", c) == ["10.88.0.2/16"]
    assert len(ports(sandbox, "podman0")) == 1
    assert ping(sandbox, c, "10.88.0.1")
    await down(sandbox, c, doc)
    assert_only_lo(sandbox, None, c)


async def test_teardown_error_accumulation(sandbox: Sandbox) -> None:
    c = sandbox.netns("c1")
    doc = two_networks()
    await up(sandbox, c, doc)
    sandbox.run(["ip", "link", "del", "eth0"], c)
    sandbox.run(["ip", "link", "del", "eth1"], c)
    [res] = await teardown(sandbox, (c, doc))
    assert isinstance(res.error, MultipleErrors)
    assert str(res.error) == (
        "netavark encountered multiple errors:"
        "\n\t- failed to delete container veth eth0: Netlink error: No such device (os error 19)"
        "\n\t- failed to delete container veth eth1: Netlink error: No such device (os error 19)")
    # the rest is still cleaned: both bridges had no port left
    assert_only_lo(sandbox, None, c)


async def test_teardown_one_veth_gone_still_cleans_the_other(sandbox: Sandbox) -> None:
    c = sandbox.netns("c1")
    doc = two_networks()
    await up(sandbox, c, doc)
    sandbox.run(["ip", "link", "del", "eth1"], c)
    [res] = await teardown(sandbox, (c, doc))
    assert str(res.error) == "failed to delete container veth eth1: Netlink error: No such device (os error 19)"
    assert_only_lo(sandbox, None, c)


async def test_rollback_when_second_bridge_name_is_taken(sandbox: Sandbox) -> None:
    add_veth(sandbox, "podman1", "podman1p")
    c = sandbox.netns("c1")
    [res] = await setup(sandbox, (c, two_networks()))
    assert str(res.error) == "bridge interface podman1 already exists but is a veth interface"
    assert link_names(sandbox) == ["lo", "podman1", "podman1p"]  # no podman0, no veth
    assert_only_lo(sandbox, c)
    sandbox.run(["ip", "link", "del", "podman1"])


async def test_rollback_when_second_network_fails_in_the_container(sandbox: Sandbox) -> None:
    c = sandbox.netns("c1")
    add_veth(sandbox, "eth1", "eth1p", c)
    [res] = await setup(sandbox, (c, two_networks()))
    assert str(res.error) == ("create veth pair: interface eth1 already exists on container namespace: "
                              + GW_EEXIST)
    assert_only_lo(sandbox, None)  # eth0's veth and both bridges are gone
    assert link_names(sandbox, c) == ["eth1", "eth1p", "lo"]
    sandbox.run(["ip", "link", "del", "eth1"], c)


async def test_rollback_when_second_network_route_fails(sandbox: Sandbox) -> None:
    """Network 2 fails after its veth, addresses and default route exist: everything goes."""
    c = sandbox.netns("c1")
    doc = two_networks()
    doc["network_info"]["net2"]["routes"] = [{"destination": "192.168.77.0/24", "gateway": "172.31.0.1"}]
    [res] = await setup(sandbox, (c, doc))
    assert res.error is not None
    assert str(res.error).endswith("Netlink error: Network is unreachable (os error 101)"), res.error
    assert_only_lo(sandbox, None, c)


async def test_rollback_keeps_a_reused_bridge(sandbox: Sandbox) -> None:
    sandbox.run(["ip", "link", "add", "podman0", "type", "bridge"])
    c = sandbox.netns("c1")
    add_veth(sandbox, "eth1", "eth1p", c)
    [res] = await setup(sandbox, (c, two_networks()))
    assert not res.ok
    assert link_names(sandbox) == ["lo", "podman0"] and ports(sandbox, "podman0") == []
    sandbox.run(["ip", "link", "del", "podman0"])
    sandbox.run(["ip", "link", "del", "eth1"], c)


async def test_twenty_containers_in_one_batch(sandbox: Sandbox) -> None:
    n = 20
    nss = [sandbox.netns(f"c{i}") for i in range(n)]
    docs = [simple(i, f"10.88.0.{i + 2}") for i in range(n)]
    results = await setup(sandbox, *zip(nss, docs, strict=True))
    assert [r.error for r in results] == [None] * n
    assert len(ports(sandbox, "podman0")) == n
    assert ping(sandbox, nss[0], f"10.88.0.{n + 1}")
    assert ping(sandbox, nss[-1], "10.88.0.2")
    results = await teardown(sandbox, *zip(nss, docs, strict=True))
    assert [r.error for r in results] == [None] * n
    assert_only_lo(sandbox, None, *nss)


async def test_twenty_concurrent_engines_one_new_bridge(sandbox: Sandbox) -> None:
    """Twenty independent callers race to create the same bridge: all of them must succeed."""
    n = 20
    nss = [sandbox.netns(f"c{i}") for i in range(n)]
    docs = [simple(i, f"10.88.0.{i + 2}") for i in range(n)]
    errors: list[Any] = []

    async def one(ns: str, doc: dict[str, Any]) -> None:
        [res] = await setup(sandbox, (ns, doc))
        errors.append(res.error)

    async with anyio.create_task_group() as tg:
        for ns, doc in zip(nss, docs, strict=True):
            tg.start_soon(one, ns, doc)
    assert errors == [None] * n
    assert len(ports(sandbox, "podman0")) == n
    assert ping(sandbox, nss[3], "10.88.0.9")
    results = await teardown(sandbox, *zip(nss, docs, strict=True))
    assert [r.error for r in results] == [None] * n
    assert_only_lo(sandbox, None, *nss)


async def test_missing_namespace_touches_nothing(sandbox: Sandbox) -> None:
    [res] = await setup(sandbox, (str(sandbox.root / "ns" / "nope"), simple()))
    assert str(res.error) == "invalid namespace path: IO error: No such file or directory (os error 2)"
    assert_only_lo(sandbox, None)


async def test_batch_with_one_bad_container(sandbox: Sandbox) -> None:
    """A failing container of a batch does not take the others down (nor their bridge)."""
    c1, c2 = sandbox.netns("c1"), sandbox.netns("c2")
    add_veth(sandbox, "eth0", "eth0p", c2)
    d1, d2 = simple(1, "10.88.0.2"), simple(2, "10.88.0.3")
    r1, r2 = await setup(sandbox, (c1, d1), (c2, d2))
    assert r1.ok, r1.error
    assert str(r2.error).startswith("create veth pair: interface eth0 already exists")
    assert len(ports(sandbox, "podman0")) == 1
    assert ping(sandbox, c1, "10.88.0.1")
    await down(sandbox, c1, d1)
    sandbox.run(["ip", "link", "del", "eth0"], c2)
    assert_only_lo(sandbox, None, c1, c2)


def _have_vrf(sb: Sandbox) -> bool:
    probe = sb.run(["ip", "link", "add", "vrf-probe", "type", "vrf", "table", "10"], check=False)
    if probe.returncode != 0:
        return False
    sb.run(["ip", "link", "del", "vrf-probe"])
    return True


async def test_vrf_master(sandbox: Sandbox) -> None:
    if not _have_vrf(sandbox):
        pytest.skip("kernel has no vrf support (no `vrf` module on this machine)")
    sandbox.run(["ip", "link", "add", "vrf0", "type", "vrf", "table", "10"])
    c = sandbox.netns("c1")
    doc = options(1, [(network(options={"vrf": "vrf0"}), {"interface_name": "eth0", "static_ips": ["10.88.0.2"]})])
    await up(sandbox, c, doc)
    assert link(sandbox, "podman0").get("master") == "vrf0"
    await down(sandbox, c, doc)
    sandbox.run(["ip", "link", "del", "vrf0"])
    assert_only_lo(sandbox, None, c)


async def test_vrf_missing(sandbox: Sandbox) -> None:
    c = sandbox.netns("c1")
    doc = options(1, [(network(options={"vrf": "vrf0"}), {"interface_name": "eth0", "static_ips": ["10.88.0.2"]})])
    [res] = await setup(sandbox, (c, doc))
    assert str(res.error) == "get vrf to set up bridge interface: Netlink error: No such device (os error 19)"
    assert_only_lo(sandbox, None, c)


async def test_vrf_is_not_a_vrf(sandbox: Sandbox) -> None:
    add_veth(sandbox, "vrf0", "vrf0p")
    c = sandbox.netns("c1")
    doc = options(1, [(network(options={"vrf": "vrf0"}), {"interface_name": "eth0", "static_ips": ["10.88.0.2"]})])
    [res] = await setup(sandbox, (c, doc))
    assert str(res.error) == "vrf vrf0 already exists but is a veth interface"
    assert link_names(sandbox) == ["lo", "vrf0", "vrf0p"]
    assert_only_lo(sandbox, c)
    sandbox.run(["ip", "link", "del", "vrf0"])


async def test_setup_racing_teardown_of_the_last_port(sandbox: Sandbox) -> None:
    """A setup onto a bridge whose last port is being torn down at the same moment must end up on a
    bridge (recreated if need be): never an error, never its veth silently detached."""
    c1, c2 = sandbox.netns("c1"), sandbox.netns("c2")
    d1, d2 = simple(1, "10.88.0.2"), simple(2, "10.88.0.3")
    results: dict[str, Result] = {}

    async def td() -> None:
        [results["teardown"]] = await teardown(sandbox, (c1, d1))

    async def su(delay: float) -> None:
        await anyio.sleep(delay)
        [results["setup"]] = await setup(sandbox, (c2, d2))

    for i in range(16):  # sweep the setup's start across the teardown's bridge check → delete window
        await up(sandbox, c1, d1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(td)
            tg.start_soon(su, i * 0.002)
        assert results["teardown"].error is None and results["setup"].error is None, results
        assert len(ports(sandbox, "podman0")) == 1, "the new veth is not on the bridge"
        assert ping(sandbox, c2, "10.88.0.1")
        await down(sandbox, c2, d2)
    assert_only_lo(sandbox, None, c1, c2)
