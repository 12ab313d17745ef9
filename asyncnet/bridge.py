"""The bridge driver's kernel work: make sure a bridge exists, attach one container to it.

What netavark's bridge.rs does, minus the firewall and DNS (engine.py drives those once per batch).
Every function here is idempotent where netavark's behaviour allows it, because concurrent creators
(tasks in this process or other processes) must all succeed: the loser of a create race gets EEXIST and
goes on with the object the winner made, after checking it is of the right kind.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import socket
import struct
from dataclasses import dataclass

import anyio
from pyroute2.netlink.exceptions import NetlinkError

from .errors import AsyncnetError, NetlinkOpError, netlink_error_text
from .netlink import (
    IFF_UP,
    IPV4_DEVCONF,
    Netlink,
    address_message,
    brport_message,
    inet_conf_message,
    link_table_sync,
    requests_sync,
    route_message,
    set_group_sync,
)
from .netns import run_in_netns
from .plan import Attachment, bridge_sysctls, container_sysctls, random_mac
from .sysctl import write_sysctls_sync
from .types import Network

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914


@dataclass(frozen=True)
class BridgeHandle:
    name: str
    index: int
    created: bool  # by this call: only then may a rollback delete it


async def ensure_bridge(host: Netlink, host_fd: int | None, network: Network) -> BridgeHandle:
    name = network.network_interface
    created = False
    try:
        link = await host.get_link(name)
        if link is None:
            master = await _vrf_index(host, network.bridge.vrf) if network.bridge.vrf else None
            # An explicit MAC pins the bridge address: with a random one the kernel would keep changing it
            # to the lowest port MAC as containers come and go (netavark pins it after the first attach;
            # setting it at creation does the same without the extra round trip).
            try:
                # The kernel acts inside sendmsg(); a cancellation while the answer is on its way must not
                # leave us unsure whether we made the bridge (and so unable to roll it back): wait for it.
                with anyio.CancelScope(shield=True):
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
        if not created and link.get("operstate") != "UP":
            # A reused bridge without a working port (e.g. fresh from `ip link add`: down, or up with
            # operstate UNKNOWN) may still have a kernel-chosen MAC, which our first port would replace
            # (and the last one leaving would turn into 00:00:00:00:00:00): pin it. A bridge that is UP
            # has ports and has been through this already.
            mac = link.get("address")
            await host.set_address(index, mac if mac and mac != "00:00:00:00:00:00" else random_mac())
        await run_in_netns(host_fd, lambda: write_sysctls_sync(bridge_sysctls(network)))
        for sub in network.subnets:
            gw = sub.gateway_interface
            if gw is not None:
                await host.add_address(index, gw, "add ip addr to bridge", exist_ok=True)
        await host.set_up(index, "set bridge up")
    except BaseException:
        if created:  # half-made: the caller never gets a handle, so it could not roll it back
            with anyio.CancelScope(shield=True):
                try:
                    await host.delete_link(name, "rollback: delete bridge")
                except NetlinkOpError:
                    pass
        raise
    return BridgeHandle(name, index, created)


async def _vrf_index(host: Netlink, vrf: str) -> int:
    link = await host.get_link(vrf)
    if link is None:
        raise NetlinkOpError(f"get vrf to set up bridge interface: {netlink_error_text(errno.ENODEV)}",
                             code=errno.ENODEV)
    kind = Netlink.kind_of(link)
    if kind != "vrf":
        raise AsyncnetError(f"vrf {vrf} already exists but is a {kind} interface")  # netavark's wording
    return int(link["index"])


async def create_veths(host: Netlink, ctr_fd: int, atts: list[Attachment], bridges: dict[str, BridgeHandle],
                       *, created: list[str], group: int = 0) -> None:
    """One request per network: the veth with its peer created directly in the container, host end up
    (without carrier until the container end comes up, so no traffic yet: see :func:`attach_ports_sync`)
    and in the batch's link ``group`` (see :func:`tag_for_teardown_sync`).

    Names go into ``created`` before the request, so a rollback also covers a request whose answer was
    lost to a cancellation.
    """
    for att in atts:
        created.append(att.host_veth)
        try:
            await host.create_veth(att.host_veth, bridge_index=bridges[att.bridge].index,
                                   mtu=att.network.bridge.mtu, peer_name=att.ifname, peer_netns_fd=ctr_fd,
                                   peer_mac=att.mac, group=group)
        except NetlinkOpError as exc:
            if exc.code != errno.EEXIST:
                raise
            created.pop()  # not ours: must not be rolled back
            if await run_in_netns(ctr_fd, functools.partial(ifindex, att.ifname)) is not None:
                raise NetlinkOpError(
                    f"create veth pair: interface {att.ifname} already exists on container namespace: "
                    f"{netlink_error_text(errno.EEXIST)}", code=errno.EEXIST) from None
            raise NetlinkOpError(
                f"create veth pair: host interface {att.host_veth} already exists (container "
                f"{att.container_id} is already attached to network {att.network.name}): "
                f"{netlink_error_text(errno.EEXIST)}", code=errno.EEXIST) from None


def attach_ports_sync(atts: list[Attachment], *, hairpin: bool, quiet: bool) -> dict[str, int]:
    """Runs in the host namespace (worker thread), before the container end comes up: the host ends'
    ifindexes, and their bridge port flags in one hand-packed request each — hairpin when the container
    has port mappings (netavark), and with ``quiet`` multicast flooding *off* until :func:`unquiet_sync`.

    Why quiet: every interface that comes up sends IPv6 link-local chatter (DAD neighbour solicitation,
    MLD reports, router solicitations) to multicast groups nobody registered, which the bridge floods to
    every port, so each new container costs a packet delivery into every other container on the bridge —
    O(ports) per container, O(N^2) per batch, much of it under the RTNL lock (DAD) that every netlink
    request of the batch also needs. The ports of one batch are quiet towards each other until the batch
    is made, then get the kernel default back (what netavark leaves): 4 bridges x 250 ports spent a third
    of the machine's CPU in br_flood/ipv6_rcv and made each container ~1.8x as expensive as at 25 ports.
    """
    indexes: dict[str, int] = {}
    requests = []
    for att in atts:
        index = ifindex(att.host_veth)
        if index is None:
            raise NetlinkOpError(f"get host interface {att.host_veth}: {netlink_error_text(errno.ENODEV)}",
                                 code=errno.ENODEV)
        indexes[att.host_veth] = index
        pin = hairpin and not att.network.internal
        if pin or quiet:
            requests.append((brport_message(index, hairpin=pin, mcast_flood=False if quiet else None),
                             "set hairpin mode" if pin else "set bridge port flags"))
    if requests:
        requests_sync(requests)
    return indexes


def unquiet_sync(indexes: list[int]) -> None:
    """Host namespace (worker thread): multicast flooding back on for ports :func:`attach_ports_sync`
    made quiet — the kernel default, as netavark leaves its ports."""
    requests_sync([(brport_message(index, mcast_flood=True), "set bridge port flags") for index in indexes])


@dataclass
class Tagged:
    """What :func:`tag_for_teardown_sync` put into ``group``, and what it could not."""

    group: int  # the link group to delete
    refused: dict[str, int]  # host veths the kernel refused: {name: errno} (ENODEV: no such link)
    bridges: list[str]  # bridges left with no port outside the group: they go with it
    bridge_errors: dict[str, AsyncnetError]  # bridges that could not be tagged
    gone: list[str]  # bridges that do not exist (any more)


def tag_for_teardown_sync(veths: list[str], bridges: list[str], fresh_group: int) -> Tagged:
    """Host namespace (worker thread), under the bridges' exclusive locks: gather the batch's host ends
    and the bridges they leave without ports into one link group, so that one delete takes them all.

    Setup creates a batch's host ends in a link group of the batch's own; when the teardown batch is
    exactly what remains of one such group, that group is deleted as it is. Otherwise the host ends are
    moved into ``fresh_group`` first — and every such move is a link change, after which the kernel walks
    the whole IPv6 routing table (rt6_sync_up), which holds routes of every host veth: 1000 moves cost
    100-200 ms at 1000 containers, the one delete ~600. Bridges are moved in either way: a bridge costs
    the kernel ~20 ms to delete however it is asked (an rcu_barrier in br_multicast_dev_del), and the
    host ends a grace period; one unregister for all of them shares the waits, and the caller can commit
    the firewall teardown (which must know which networks go) while the kernel deletes.
    """
    try:
        table = link_table_sync()
    except NetlinkError as exc:
        raise NetlinkOpError(f"list links: {netlink_error_text(exc.code)}", code=exc.code) from None
    by_name = {row.name: row for row in table}
    present = [v for v in veths if v in by_name]
    refused = {v: errno.ENODEV for v in veths if v not in by_name}
    group = fresh_group
    groups = {by_name[v].group for v in present}
    if len(groups) == 1:
        (made_in,) = groups
        members = {row.name for row in table if row.group == made_in}
        if made_in and members.issubset(present):
            group = made_in
    if group == fresh_group and present:
        refused.update(set_group_sync(present, group))
    tagged = set(veths).difference(refused)
    empty: list[str] = []
    out = Tagged(group, refused, [], {}, [])
    for br in bridges:
        row = by_name.get(br)
        if row is None:
            out.gone.append(br)
        elif tagged.issuperset(r.name for r in table if r.master == row.index):
            empty.append(br)
    for br, code in (set_group_sync(empty, group) if empty else {}).items():
        if code == errno.ENODEV:
            out.gone.append(br)
        else:
            out.bridge_errors[br] = NetlinkOpError(f"failed to delete bridge: {netlink_error_text(code)}",
                                                   code=code)
    out.bridges = [br for br in empty if br not in out.gone and br not in out.bridge_errors]
    return out


def prepare_container_sync(atts: list[Attachment]) -> dict[str, int]:
    """Runs inside the container namespace (worker thread): sysctls, lo and the new interfaces up, and
    their ifindexes — plain syscalls that would otherwise cost three netlink round trips per container.

    The IPv4 interface sysctls go over netlink (:func:`inet_conf_message`): a first /proc/sys/net/ipv4
    lookup in a new namespace costs O(namespaces alive), ~0.1 ms with 1000 containers (the IPv6 one has
    no netlink setter). With /proc/sys read-only they go through /proc like the rest, so that a value
    that differs fails as in netavark (write-if-different, ``Sysctl error``).
    """
    indexes: dict[str, int] = {}
    for att in atts:
        index = ifindex(att.ifname)
        if index is None:
            raise NetlinkOpError(f"get container interface {att.ifname}: "
                                 f"{netlink_error_text(errno.ENODEV)}", code=errno.ENODEV)
        indexes[att.ifname] = index
    writes = [w for att in atts for w in container_sysctls(att)]
    inet: dict[str, dict[str, int]] = {}
    if not os.statvfs("/proc/sys/net").f_flag & os.ST_RDONLY:
        proc = []
        for key, value, tolerant in writes:
            ifname, _, leaf = key.removeprefix("net/ipv4/conf/").partition("/")
            if key.startswith("net/ipv4/conf/") and ifname in indexes and leaf in IPV4_DEVCONF:
                inet.setdefault(ifname, {})[leaf] = int(value)
            else:
                proc.append((key, value, tolerant))
        writes = proc
    write_sysctls_sync(writes)
    if inet:
        requests_sync([(inet_conf_message(indexes[name], conf), f"Sysctl error: set net.ipv4.conf.{name}")
                       for name, conf in inet.items()])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        _set_up(sock, "lo")
        for att in atts:
            _set_up(sock, att.ifname)
    return indexes


def ifindex(name: str) -> int | None:
    """The index of ``name`` in the calling thread's namespace (an ioctl, no netlink), None if absent."""
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None


def _set_up(sock: socket.socket, name: str) -> None:
    try:
        req = struct.pack("16sH22x", name.encode(), 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(sock, SIOCGIFFLAGS, req))[1]
        if not flags & IFF_UP:
            fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH22x", name.encode(), flags | IFF_UP))
    except OSError as exc:
        code = exc.errno or errno.EIO
        raise NetlinkOpError(f"set {name} up: {netlink_error_text(code)}", code=code) from None


def container_requests(atts: list[Attachment], indexes: dict[str, int]) -> list[tuple[tuple[int, int, bytes], str]]:
    """Addresses, then default and static routes (routes need the on-link addresses first)."""
    out = [(address_message(indexes[att.ifname], addr), "add ip addr") for att in atts for addr in att.addresses]
    for att in atts:
        for route in att.routes:
            # a static route's gateway may be reachable through another container interface (netavark
            # passes no device for it); default routes are pinned to the network's interface
            index = None if route.static else indexes[att.ifname]
            out.append((route_message(index, route.destination, route.gateway, route.metric),
                        f"add route {route.destination} via {route.gateway}"))
    return out


def configure_container_sync(atts: list[Attachment]) -> None:
    """Everything inside the container, in one worker-thread visit (run it via run_in_netns)."""
    indexes = prepare_container_sync(atts)
    requests_sync(container_requests(atts, indexes))
