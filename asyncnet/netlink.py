"""Per-namespace async netlink sockets and the few typed operations the bridge driver needs.

Sockets are created in a worker thread that has ``setns()``-ed into the target namespace and are
handed to ``AsyncIPRoute(fileno=…)``: no fork per socket (pyroute2's ``netns=`` forks and blocks the
loop ~10 ms) and no silent creation of a missing namespace. Every failure is translated into an
error that says what was being done; transient codes are retried with bounded jittered backoff.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
from pyroute2.iproute.linux import AsyncIPRoute
from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTM_NEWROUTE
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from .errors import NetlinkOpError, netlink_error_text
from .netns import run_in_netns
from .types import IPInterface, IPNetwork

TRANSIENT = frozenset({errno.EBUSY, errno.EAGAIN, errno.ENOBUFS, errno.EINTR})
IFA_F_NODAD = 0x02
IFF_UP = 0x1
NETLINK_ROUTE = 0
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_RTM_NEWLINK, _RTM_DELLINK, _RTM_GETLINK = 16, 17, 18
_IFLA_IFNAME, _IFLA_MASTER, _IFLA_GROUP = 3, 10, 27
_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_DUMP = 0x1, 0x4, 0x300
_NLMSG_HDR, _IFINFO_HDR = 16, 16
T = TypeVar("T")


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, NetlinkError) and exc.code in TRANSIENT


def _new_route_socket() -> int:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_ROUTE)
    return sock.detach()


def translate(exc: NetlinkError, context: str) -> NetlinkOpError:
    return NetlinkOpError(f"{context}: {netlink_error_text(exc.code)}", code=exc.code)


class Netlink:
    """One rtnetlink socket bound to one namespace. Not shared across threads (pyroute2 rule)."""

    def __init__(self, ipr: AsyncIPRoute, netns_fd: int | None = None,
                 in_flight: anyio.Semaphore | None = None) -> None:
        self.ipr = ipr
        self.netns_fd = netns_fd  # borrowed (the opener closes it): for the requests run in a thread
        self.requests = 0  # for profiling and tests: round trips made through this socket
        self.in_flight = in_flight

    @classmethod
    async def open(cls, netns_fd: int | None, in_flight: anyio.Semaphore | None = None) -> Netlink:
        fd = await run_in_netns(netns_fd, _new_route_socket)
        ipr = AsyncIPRoute(fileno=fd)
        try:
            await ipr.setup_endpoint()
        except BaseException:
            ipr.close()
            raise
        return cls(ipr, netns_fd, in_flight)

    def close(self) -> None:
        self.ipr.close()

    async def call(self, context: str, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Run one request with the retry policy; NetlinkError becomes NetlinkOpError(context).

        pyroute2 sends synchronously, and the kernel runs the request inside that ``sendmsg()`` on the
        loop thread (~1 ms for a veth pair). ``in_flight`` (shared by all sockets of an engine) bounds how
        many requests are outstanding, and so how many sends one loop iteration can run back to back:
        without it, 64 tasks starting together stalled the loop 80-140 ms.
        """
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception(_is_transient),
                stop=stop_after_attempt(6),
                wait=wait_random_exponential(multiplier=0.002, max=0.1),
                reraise=True,
            ):
                with attempt:
                    self.requests += 1
                    if self.in_flight is None:
                        return await fn(*args, **kwargs)
                    async with self.in_flight:
                        return await fn(*args, **kwargs)
        except NetlinkError as exc:
            raise translate(exc, context) from None
        raise AssertionError("unreachable")  # pragma: no cover

    # ---- links -----------------------------------------------------------------------------------

    async def get_link(self, name: str) -> Any | None:
        """The link message for ``name``, or None when there is no such link."""
        try:
            self.requests += 1
            msgs = await self.ipr.link("get", ifname=name)
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return None
            raise translate(exc, f"get interface {name}") from None
        return msgs[0] if msgs else None

    @staticmethod
    def kind_of(link: Any) -> str:
        info = link.get(("linkinfo", "kind")) if hasattr(link, "get") else None
        if info is None:
            linkinfo = link.get_attr("IFLA_LINKINFO")
            info = linkinfo.get_attr("IFLA_INFO_KIND") if linkinfo is not None else None
        return info or "device"

    async def create_bridge(self, name: str, *, mtu: int, mac: str, master: int | None) -> None:
        kwargs: dict[str, Any] = {"ifname": name, "kind": "bridge", "address": mac}
        if mtu:
            kwargs["mtu"] = mtu
        if master is not None:
            kwargs["master"] = master
        await self.call("create bridge", self.ipr.link, "add", **kwargs)

    async def create_veth(self, host_name: str, *, bridge_index: int, mtu: int, peer_name: str,
                          peer_netns_fd: int, peer_mac: str, group: int = 0) -> None:
        """Both ends in one request; the host end comes up at creation (ifi_flags in the same message),
        in link ``group``. Bridge port flags (hairpin) cannot ride along (the kernel ignores slave data
        on creation): see :func:`brport_message`."""
        peer: dict[str, Any] = {"ifname": peer_name, "net_ns_fd": peer_netns_fd, "address": peer_mac}
        kwargs: dict[str, Any] = {"ifname": host_name, "kind": "veth", "master": bridge_index,
                                  "flags": IFF_UP, "change": IFF_UP, "peer": peer}
        if group:
            kwargs["group"] = group
        if mtu:
            kwargs["mtu"] = mtu
            peer["mtu"] = mtu
        await self.call("create veth pair", self.ipr.link, "add", **kwargs)

    async def set_up(self, index: int, context: str = "set interface up") -> None:
        await self.call(context, self.ipr.link, "set", index=index, flags=IFF_UP, change=IFF_UP)

    async def set_address(self, index: int, mac: str) -> None:
        await self.call("set mac address", self.ipr.link, "set", index=index, address=mac)

    # Deleting links waits for RCU grace periods (20-50 ms per request, a group of 200 veths ~150 ms) and
    # a port dump returns every port's full link message (~1-2 ms each to decode in pyroute2). The kernel
    # runs a request synchronously inside sendmsg(), so on the loop thread these stall every other task:
    # they go to a worker thread instead, on a plain socket in this namespace, parsing only headers.

    async def _in_thread(self, msg_type: int, flags: int, attrs: list[bytes]) -> list[str]:
        return await run_in_netns(self.netns_fd, lambda: link_request_sync(msg_type, flags, attrs))

    async def delete_link(self, name: str, context: str) -> None:
        await self.call(context, self._in_thread, _RTM_DELLINK, _NLM_F_REQUEST | _NLM_F_ACK,
                        [_attr(_IFLA_IFNAME, name.encode() + b"\0")])

    async def delete_group(self, group: int) -> None:
        """One RTM_DELLINK for a whole link group: one RCU wait instead of one per veth."""
        await self.call("delete veth group", self._in_thread, _RTM_DELLINK, _NLM_F_REQUEST | _NLM_F_ACK,
                        [_attr(_IFLA_GROUP, struct.pack("=I", group))])

    async def port_names(self, bridge_index: int) -> list[str]:
        """Ports of a bridge; IFLA_MASTER in the dump request makes the kernel do the filtering."""
        return await self.call("list bridge ports", run_in_netns, self.netns_fd,
                               functools.partial(port_names_sync, bridge_index))

    # ---- addresses and routes ---------------------------------------------------------------------

    async def add_address(self, index: int, addr: IPInterface, context: str, *, exist_ok: bool = False) -> None:
        kwargs: dict[str, Any] = {"index": index, "address": str(addr.ip), "prefixlen": addr.network.prefixlen}
        if addr.version == 6:
            kwargs["flags"] = IFA_F_NODAD
        try:
            await self.call(context, self.ipr.addr, "add", **kwargs)
        except NetlinkOpError as exc:
            if exist_ok and exc.code == errno.EEXIST:
                return
            if addr.version == 6 and exc.code == errno.EACCES:
                raise NetlinkOpError(
                    f"{context}: failed to add ipv6 address, is ipv6 enabled in the kernel?: "
                    f"{netlink_error_text(errno.EACCES)}", code=errno.EACCES) from None
            raise

    async def add_route(self, *, index: int | None, destination: IPNetwork, gateway: ipaddress.IPv4Address |
                        ipaddress.IPv6Address, metric: int, context: str) -> None:
        """netavark's request: NLM_F_CREATE without NLM_F_EXCL, so the equal-metric default route of a
        second network is added beside the first one instead of failing with EEXIST (an identical route
        still does). ``index=None`` lets the kernel pick the device from the gateway: a static route's
        gateway may sit on another interface of the container."""
        kwargs: dict[str, Any] = {"dst": str(destination.network_address), "dst_len": destination.prefixlen,
                                  "gateway": str(gateway), "priority": metric, "proto": "static",
                                  "type": "unicast", "family": _family(destination)}
        if index is not None:
            kwargs["oif"] = index
        await self.call(context, self.ipr.route, (RTM_NEWROUTE, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE),
                        **kwargs)

    async def delete_route(self, *, destination: IPNetwork, gateway: ipaddress.IPv4Address |
                           ipaddress.IPv6Address, metric: int, context: str) -> None:
        await self.call(context, self.ipr.route, "del", dst=str(destination.network_address),
                        dst_len=destination.prefixlen, gateway=str(gateway), priority=metric,
                        family=_family(destination))


def _family(net: IPNetwork) -> int:
    return socket.AF_INET if net.version == 4 else socket.AF_INET6


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * (-length % 4)


def _ifinfomsg(index: int = 0, family: int = socket.AF_UNSPEC) -> bytes:
    """The ifinfomsg a link request starts with (index 0: the kernel finds the link by IFLA_IFNAME)."""
    return struct.pack("=BxHiII", family, 0, index, 0, 0)


@dataclass(frozen=True)
class LinkRow:
    """What teardown needs to know about a link: no stats, no pyroute2 objects."""

    index: int
    name: str
    group: int
    master: int  # 0: not enslaved


def link_request_sync(msg_type: int, flags: int, attrs: list[bytes]) -> list[str]:
    """One rtnetlink link request (ifinfomsg + ``attrs``) on a fresh socket in the calling thread's
    namespace; blocking, for worker threads. Returns the names of the links a dump answered with (only
    IFLA_IFNAME is read); raises ``NetlinkError`` for an error answer."""
    return [row.name for row in _link_rows_sync(msg_type, flags, attrs)]


def link_table_sync() -> list[LinkRow]:
    """Every link of the calling thread's namespace (blocking): one dump, parsing four fields."""
    return _link_rows_sync(_RTM_GETLINK, _NLM_F_REQUEST | _NLM_F_DUMP, [])


def _link_rows_sync(msg_type: int, flags: int, attrs: list[bytes]) -> list[LinkRow]:
    body = _ifinfomsg() + b"".join(attrs)
    request = struct.pack("=IHHII", _NLMSG_HDR + len(body), msg_type, flags, 1, 0) + body
    rows: list[LinkRow] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_ROUTE) as sock:
        sock.send(request)
        while True:
            data = sock.recv(1 << 17)
            off = 0
            while off + _NLMSG_HDR <= len(data):
                length, kind = struct.unpack_from("=IH", data, off)
                if length < _NLMSG_HDR:
                    break
                if kind in (_NLMSG_ERROR, _NLMSG_DONE):
                    code = -struct.unpack_from("=i", data, off + _NLMSG_HDR)[0] if length >= 20 else 0
                    if code > 0:
                        raise NetlinkError(code)
                    return rows
                if kind == _RTM_NEWLINK:
                    rows.append(_link_row(data, off + _NLMSG_HDR, off + length))
                off += (length + 3) & ~3


def port_names_sync(bridge_index: int) -> list[str]:
    """The ports of a bridge (blocking, calling thread's namespace); IFLA_MASTER in the dump request
    makes the kernel do the filtering."""
    return link_request_sync(_RTM_GETLINK, _NLM_F_REQUEST | _NLM_F_DUMP,
                             [_attr(_IFLA_MASTER, struct.pack("=I", bridge_index))])


def set_group_sync(names: list[str], group: int, *, chunk: int = 256) -> dict[str, int]:
    """Move links (by name) into link ``group``; blocking, for a worker thread in their namespace.
    Returns ``{name: errno}`` for the links the kernel refused (ENODEV: no such link).

    Teardown tags every host end of a batch this way before one group delete. The kernel needs ~50 us
    per request; sending them one by one through pyroute2 on the event loop cost ~1.4 ms each (1000
    containers: 1.4 s of a 2 s teardown). Here they go ``chunk`` at a time in one ``send``, each
    acknowledged; transient refusals (EBUSY and the like) are retried a few times."""
    failed: dict[str, int] = {}
    pending = list(names)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_ROUTE) as sock:
        for attempt in range(6):
            retry: list[str] = []
            for start in range(0, len(pending), chunk):
                part = pending[start:start + chunk]
                msgs = []
                for seq, name in enumerate(part, 1):
                    body = (_ifinfomsg() + _attr(_IFLA_IFNAME, name.encode() + b"\0")
                            + _attr(_IFLA_GROUP, struct.pack("=I", group)))
                    msgs.append(struct.pack("=IHHII", _NLMSG_HDR + len(body), _RTM_SETLINK,
                                            _NLM_F_REQUEST | _NLM_F_ACK, seq, 0) + body)
                sock.send(b"".join(msgs))
                answered = 0
                while answered < len(part):
                    data = sock.recv(1 << 17)
                    off = 0
                    while off + _NLMSG_HDR + 4 <= len(data):
                        length, kind, _flags, seq = struct.unpack_from("=IHHI", data, off)
                        if length < _NLMSG_HDR:
                            break
                        if kind == _NLMSG_ERROR and 1 <= seq <= len(part):
                            answered += 1
                            code = -struct.unpack_from("=i", data, off + _NLMSG_HDR)[0]
                            if code in TRANSIENT and attempt < 5:
                                retry.append(part[seq - 1])
                            elif code:
                                failed[part[seq - 1]] = code
                        off += (length + 3) & ~3
            if not retry:
                break
            pending = retry
            time.sleep(0.002 * 2 ** attempt)
    return failed


def _link_row(data: bytes, off: int, end: int) -> LinkRow:
    index = struct.unpack_from("=i", data, off + 4)[0]
    name, group, master = "", 0, 0
    off += _IFINFO_HDR
    while off + 4 <= end:
        length, kind = struct.unpack_from("=HH", data, off)
        if length < 4:
            break
        kind &= 0x3FFF
        if kind == _IFLA_IFNAME:
            name = data[off + 4:off + length].split(b"\0", 1)[0].decode()
        elif kind == _IFLA_GROUP:
            group = struct.unpack_from("=I", data, off + 4)[0]
        elif kind == _IFLA_MASTER:
            master = struct.unpack_from("=I", data, off + 4)[0]
        off += (length + 3) & ~3
    return LinkRow(index, name, group, master)


# ---- per-container requests, hand-packed, for the worker thread that is already in the namespace ----
# Encoding them with pyroute2 cost ~40% of a container's setup CPU and needed an AsyncIPRoute per container
# whose kernel work ran on the loop thread; packed here they run beside the loop, in the thread hop that
# already writes the container's sysctls (and, in the host namespace, sets its bridge port flags).

_RTM_NEWADDR = 20
_RTM_NEWROUTE_NUM = 24
_NLM_F_EXCL = 0x200
_NLM_F_CREATE = 0x400
_IFA_ADDRESS, _IFA_LOCAL = 1, 2
_RTA_DST, _RTA_OIF, _RTA_GATEWAY, _RTA_PRIORITY = 1, 4, 5, 6
_RTM_SETLINK, _IFLA_PROTINFO, _NLA_F_NESTED = 19, 12, 0x8000
_IFLA_AF_SPEC, _IFLA_INET_CONF = 26, 1
#: net.ipv4.conf.IFACE.* leaves settable over netlink (linux/ip.h IPV4_DEVCONF_*): the ones netavark writes
IPV4_DEVCONF = {"rp_filter": 8, "arp_notify": 22}
_IFLA_BRPORT_MODE, _IFLA_BRPORT_MCAST_FLOOD = 4, 27
_RT_TABLE_MAIN, _RTPROT_STATIC, _RT_SCOPE_UNIVERSE, _RTN_UNICAST = 254, 4, 0, 1


def address_message(index: int, addr: IPInterface) -> tuple[int, int, bytes]:
    """RTM_NEWADDR as `ip addr add` sends it (v4: IFA_LOCAL and IFA_ADDRESS; v6: NODAD)."""
    packed = addr.ip.packed
    flags = IFA_F_NODAD if addr.version == 6 else 0
    body = struct.pack("=BBBBI", _family(addr.network), addr.network.prefixlen, flags, _RT_SCOPE_UNIVERSE, index)
    if addr.version == 4:
        body += _attr(_IFA_LOCAL, packed)
    body += _attr(_IFA_ADDRESS, packed)
    return _RTM_NEWADDR, _NLM_F_CREATE | _NLM_F_EXCL, body


def route_message(index: int | None, destination: IPNetwork, gateway: ipaddress.IPv4Address |
                  ipaddress.IPv6Address, metric: int) -> tuple[int, int, bytes]:
    """RTM_NEWROUTE with NLM_F_CREATE but no EXCL (netavark's request; see :meth:`Netlink.add_route`)."""
    body = struct.pack("=BBBBBBBBI", _family(destination), destination.prefixlen, 0, 0, _RT_TABLE_MAIN,
                       _RTPROT_STATIC, _RT_SCOPE_UNIVERSE, _RTN_UNICAST, 0)
    if destination.prefixlen:
        body += _attr(_RTA_DST, destination.network_address.packed)
    body += _attr(_RTA_GATEWAY, gateway.packed) + _attr(_RTA_PRIORITY, struct.pack("=I", metric))
    if index is not None:
        body += _attr(_RTA_OIF, struct.pack("=I", index))
    return _RTM_NEWROUTE_NUM, _NLM_F_CREATE, body


def brport_message(index: int, *, hairpin: bool = False, mcast_flood: bool | None = None) -> tuple[int, int, bytes]:
    """AF_BRIDGE RTM_SETLINK with a nested IFLA_PROTINFO, as `bridge link set` sends it: ``hairpin``
    sets IFLA_BRPORT_MODE (netavark's hairpin for port mappings), ``mcast_flood`` IFLA_BRPORT_MCAST_FLOOD;
    what is left out keeps its value. Needs the port's ifindex (the kernel looks the port up by index)."""
    attrs = b""
    if hairpin:
        attrs += _attr(_IFLA_BRPORT_MODE, b"\1")
    if mcast_flood is not None:
        attrs += _attr(_IFLA_BRPORT_MCAST_FLOOD, b"\1" if mcast_flood else b"\0")
    body = _ifinfomsg(index, socket.AF_BRIDGE) + _attr(_IFLA_PROTINFO | _NLA_F_NESTED, attrs)
    return _RTM_SETLINK, 0, body


def inet_conf_message(index: int, conf: dict[str, int]) -> tuple[int, int, bytes]:
    """RTM_SETLINK with IFLA_AF_SPEC/AF_INET/IFLA_INET_CONF: per-interface IPv4 sysctls (keys of
    :data:`IPV4_DEVCONF`) as the kernel stores a /proc/sys write (value and "explicitly set" mark), but
    without the path walk: /proc/sys/net/ipv4 of every namespace hangs in one dcache hash chain, and the
    first lookup in a new namespace walks it three times under a global spinlock (sysctl.py)."""
    entries = b"".join(_attr(IPV4_DEVCONF[key], struct.pack("=I", value)) for key, value in conf.items())
    inet = _attr(socket.AF_INET | _NLA_F_NESTED, _attr(_IFLA_INET_CONF | _NLA_F_NESTED, entries))
    body = _ifinfomsg(index) + _attr(_IFLA_AF_SPEC | _NLA_F_NESTED, inet)
    return _RTM_SETLINK, 0, body


def requests_sync(requests: list[tuple[tuple[int, int, bytes], str]]) -> None:
    """Send (message, context) pairs in order on one socket in the calling thread's namespace, each
    acknowledged before the next; the first error becomes ``NetlinkOpError(context)``."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_ROUTE) as sock:
        for seq, ((msg_type, flags, body), context) in enumerate(requests, 1):
            sock.send(struct.pack("=IHHII", _NLMSG_HDR + len(body), msg_type, flags | _NLM_F_REQUEST | _NLM_F_ACK,
                                  seq, 0) + body)
            while True:
                data = sock.recv(65536)
                length, kind, _, rseq = struct.unpack_from("=IHHI", data, 0)
                if kind == _NLMSG_ERROR and rseq == seq:
                    code = -struct.unpack_from("=i", data, _NLMSG_HDR)[0]
                    if code:
                        raise NetlinkOpError(f"{context}: {netlink_error_text(code)}", code=code)
                    break
