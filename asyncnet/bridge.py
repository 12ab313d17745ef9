"""The bridge driver's kernel work: make sure a bridge exists, attach one container to it.

What netavark's bridge.rs does, minus the firewall and DNS (engine.py drives those once per batch).
Every function here is idempotent where netavark's behaviour allows it, because concurrent creators
(tasks in this process or other processes) must all succeed: the loser of a create race gets EEXIST and
goes on with the object the winner made, after checking it is of the right kind.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from .errors import AsyncnetError, NetlinkOpError, netlink_error_text
from .netlink import Netlink
from .netns import run_in_netns
from .plan import Attachment, bridge_sysctls, container_sysctls, random_mac
from .sysctl import write_sysctls_sync
from .types import Network

LOOPBACK_IFINDEX = 1  # fixed by the kernel in every namespace


@dataclass(frozen=True)
class BridgeHandle:
    name: str
    index: int
    created: bool  # by this call: only then may a rollback delete it


async def ensure_bridge(host: Netlink, host_fd: int | None, network: Network) -> BridgeHandle:
    name = network.network_interface
    created = False
    link = await host.get_link(name)
    if link is None:
        master = await _vrf_index(host, network.bridge.vrf) if network.bridge.vrf else None
        # An explicit MAC pins the bridge address: with a random one the kernel would keep changing it
        # to the lowest port MAC as containers come and go (netavark pins it after the first attach;
        # setting it at creation does the same without the extra round trip).
        try:
            await host.create_bridge(name, mtu=network.bridge.mtu, mac=random_mac(), master=master)
            created = True
        except NetlinkOpError as exc:
            if exc.code != errno.EEXIST:
                raise
        link = await host.get_link(name)
        if link is None:  # deleted under us by a concurrent teardown
            raise NetlinkOpError(f"create bridge: {netlink_error_text(errno.ENODEV)}", code=errno.ENODEV)
    kind = Netlink.kind_of(link)
    if kind != "bridge":
        raise AsyncnetError(f"bridge interface {name} already exists but is a {kind} interface")
    index = link["index"]
    await run_in_netns(host_fd, lambda: write_sysctls_sync(bridge_sysctls(network)))
    for sub in network.subnets:
        gw = sub.gateway_interface
        if gw is not None:
            await host.add_address(index, gw, "add ip addr to bridge", exist_ok=True)
    await host.set_up(index, "set bridge up")
    return BridgeHandle(name, index, created)


async def _vrf_index(host: Netlink, vrf: str) -> int:
    link = await host.get_link(vrf)
    if link is None:
        raise NetlinkOpError(f"get vrf to set up bridge interface: {netlink_error_text(errno.ENODEV)}",
                             code=errno.ENODEV)
    kind = Netlink.kind_of(link)
    if kind != "vrf":
        raise AsyncnetError(f"vrf interface {vrf} already exists but is a {kind} interface")
    return int(link["index"])


async def attach(host: Netlink, ctr: Netlink, ctr_fd: int, att: Attachment, bridge: BridgeHandle, *,
                 hairpin: bool) -> None:
    """veth with its peer created directly in the container, then the container side configured.

    On failure the caller deletes ``att.host_veth`` (which takes the peer with it).
    """
    try:
        await host.create_veth(att.host_veth, bridge_index=bridge.index, mtu=att.network.bridge.mtu,
                               peer_name=att.ifname, peer_netns_fd=ctr_fd, peer_mac=att.mac, hairpin=hairpin)
    except NetlinkOpError as exc:
        if exc.code == errno.EEXIST:
            if await ctr.get_link(att.ifname) is not None:
                raise NetlinkOpError(
                    f"create veth pair: interface {att.ifname} already exists on container namespace: "
                    f"{netlink_error_text(errno.EEXIST)}", code=errno.EEXIST) from None
            if await host.get_link(att.host_veth) is not None:
                raise NetlinkOpError(
                    f"create veth pair: host interface {att.host_veth} already exists (container "
                    f"{att.container_id} is already attached to network {att.network.name}): "
                    f"{netlink_error_text(errno.EEXIST)}", code=errno.EEXIST) from None
        raise
    link = await ctr.get_link(att.ifname)
    if link is None:
        raise NetlinkOpError(f"get container interface {att.ifname}: {netlink_error_text(errno.ENODEV)}",
                             code=errno.ENODEV)
    index = int(link["index"])
    await run_in_netns(ctr_fd, lambda: write_sysctls_sync(container_sysctls(att)))
    for addr in att.addresses:
        await ctr.add_address(index, addr, "add ip addr")
    await ctr.set_up(index, "set container interface up")
    for route in att.routes:
        await ctr.add_route(index=index, destination=route.destination, gateway=route.gateway,
                            metric=route.metric, context=f"add route {route.destination} via {route.gateway}")


async def loopback_up(ctr: Netlink) -> None:
    await ctr.set_up(LOOPBACK_IFINDEX, "set lo up")
