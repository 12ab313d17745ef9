"""Pure address arithmetic for the host-local IPAM: which addresses a subnet may hand out, and which one next.

No I/O here: ``state.py`` loads what is taken from the database, calls :func:`allocate_batch` inside one
write transaction and stores the outcome. Addresses are handled as integers so that a /8 or an IPv6 /64
is never materialised; what is taken is a ``dict`` of integers, so a batch of *k* allocations among *n*
taken addresses costs O(k + n), not O(k·n).

**Order: round-robin after the last allocated address** (a per-subnet cursor, wrapping at the end of the
range), as podman's own IPAM and CNI's host-local do. Lowest-free would hand a just-released address to
the very next container while neighbours' ARP/NDP caches, conntrack entries, DNS caches and port-forward
rules may still point at the old one; round-robin delays reuse for as long as the range allows. It is
also cheaper across many small batches (one container per process in the netavark face): the cursor
starts at the end of the dense region instead of rescanning it every time. It is deterministic: the same
taken set, cursor and request order give the same addresses.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping, Sequence

from .errors import IpamError
from .types import IPAddress, IPInterface, IPNetwork, Network, NetworkOptions, Subnet

# What a pool remembers per taken address: (container id, static?).
Holder = tuple[str, bool]
# The addresses one container got: network name -> one interface address per subnet (in subnet order).
ContainerAddresses = dict[str, tuple[IPInterface, ...]]


def host_bounds(net: IPNetwork) -> tuple[int, int]:
    """First and last address of ``net`` that can be a host, as integers (inclusive).

    The network address is excluded (in IPv6 it is the subnet-router anycast address), and in IPv4 the
    broadcast address; IPv6 has no broadcast. Point-to-point prefixes (/31, /127; RFC 3021 and 6164) and
    single-address prefixes (/32, /128) have no such reserved addresses: every address is usable.
    """
    lo, hi = int(net.network_address), int(net.broadcast_address)
    if net.prefixlen >= net.max_prefixlen - 1:
        return lo, hi
    return lo + 1, (hi - 1 if net.version == 4 else hi)


def lease_bounds(subnet: Subnet) -> tuple[int, int]:
    """The dynamic range: host addresses inside ``lease_range`` (start/end inclusive, either optional).

    May be empty (``first > last``) when the lease range lies entirely on reserved addresses.
    """
    lo, hi = host_bounds(subnet.subnet)
    lease = subnet.lease_range
    if lease is not None:
        if lease.start_ip is not None:
            lo = max(lo, int(lease.start_ip))
        if lease.end_ip is not None:
            hi = min(hi, int(lease.end_ip))
    return lo, hi


def usable_range(subnet: Subnet) -> tuple[IPAddress, IPAddress] | None:
    """First and last address the allocator may hand out (the gateway in between is skipped), or None."""
    lo, hi = lease_bounds(subnet)
    if lo > hi:
        return None
    make = _address_class(subnet.subnet)
    return make(lo), make(hi)


def usable_count(subnet: Subnet) -> int:
    """How many addresses the allocator can hand out in an empty subnet."""
    lo, hi = lease_bounds(subnet)
    if lo > hi:
        return 0
    gw = _gateway_int(subnet)
    return hi - lo + 1 - (1 if gw is not None and lo <= gw <= hi else 0)


def check_assignable(ip: IPAddress, subnet: Subnet, network: str) -> None:
    """A static address must be a host address of the subnet and not its gateway (lease_range does not apply:
    it bounds what the allocator picks, not what a user may ask for, as in podman)."""
    net = subnet.subnet
    if ip.version != net.version or ip not in net:
        raise IpamError(f"IPAM error: static IP {ip} is not in subnet {net} of network {network}")
    lo, hi = host_bounds(net)
    if not lo <= int(ip) <= hi:
        raise IpamError(f"IPAM error: static IP {ip} is the network or broadcast address of subnet {net} "
                        f"of network {network}")
    if ip == subnet.gateway:
        raise IpamError(f"IPAM error: static IP {ip} is the gateway of subnet {net} of network {network}")


def _address_class(net: IPNetwork) -> type[ipaddress.IPv4Address] | type[ipaddress.IPv6Address]:
    return ipaddress.IPv4Address if net.version == 4 else ipaddress.IPv6Address


def _gateway_int(subnet: Subnet) -> int | None:
    return None if subnet.gateway is None else int(subnet.gateway)


class SubnetPool:
    """Allocation state of one subnet of one network: who holds which address, and the round-robin cursor.

    ``taken`` is everything already allocated in the subnet (static or not, inside the lease range or
    not; addresses outside the subnet are ignored, integer keys must be of the subnet's IP version); a
    container holds at most one address per subnet. The pool remembers its initial contents so
    that the caller can write back only what changed (:meth:`changes`).
    """

    def __init__(self, subnet: Subnet, network: str, taken: Mapping[IPAddress | int, Holder] | None = None,
                 cursor: IPAddress | None = None) -> None:
        self.subnet = subnet
        self.network = network
        self.first, self.last = lease_bounds(subnet)
        self._make = _address_class(subnet.subnet)
        self._iface = ipaddress.IPv4Interface if subnet.subnet.version == 4 else ipaddress.IPv6Interface
        self._gateway = _gateway_int(subnet)
        self._size = usable_count(subnet)
        self._holders: dict[int, Holder] = {}
        self._held: dict[str, int] = {}  # container id -> its address here
        self._in_range = 0  # taken addresses the allocator could otherwise pick
        lo, hi = int(subnet.subnet.network_address), int(subnet.subnet.broadcast_address)
        version = subnet.subnet.version
        for ip, holder in (taken or {}).items():
            if isinstance(ip, int):
                pos = ip
            elif ip.version == version:
                pos = int(ip)
            else:
                continue
            if lo <= pos <= hi:
                self._set(pos, holder)
        self.initial: dict[int, Holder] = dict(self._holders)
        self.cursor: int | None = None if cursor is None else int(cursor)

    # -- queries -------------------------------------------------------------------------------------

    @property
    def free_count(self) -> int:
        """Addresses the allocator can still hand out (O(1): no scan)."""
        return self._size - self._in_range

    @property
    def cursor_address(self) -> IPAddress | None:
        """The last address handed out (round-robin continues after it)."""
        return None if self.cursor is None else self._make(self.cursor)

    def holder(self, ip: IPAddress) -> Holder | None:
        return self._holders.get(int(ip))

    def held_by(self, container_id: str) -> IPAddress | None:
        pos = self._held.get(container_id)
        return None if pos is None else self._make(pos)

    def interface(self, ip: IPAddress) -> IPInterface:
        """``ip`` with the subnet's prefix length, as the kernel and the StatusBlock want it."""
        # from the integer: given an address object, IPv6Interface() would format and re-parse it
        return self._iface((int(ip), self.subnet.subnet.prefixlen))

    def changes(self) -> tuple[list[IPAddress], dict[IPAddress, Holder]]:
        """(addresses whose initial holder is gone or changed, addresses with a new or changed holder)."""
        removed = [self._make(p) for p, h in self.initial.items() if self._holders.get(p) != h]
        added = {self._make(p): h for p, h in self._holders.items() if self.initial.get(p) != h}
        return removed, added

    # -- changes -------------------------------------------------------------------------------------

    def _counts(self, pos: int) -> bool:
        return self.first <= pos <= self.last and pos != self._gateway

    def _set(self, pos: int, holder: Holder | None) -> Holder | None:
        """The one primitive that changes the pool; returns the previous holder (for undo)."""
        prev = self._holders.get(pos)
        if prev is not None:
            del self._holders[pos]
            if self._held.get(prev[0]) == pos:
                del self._held[prev[0]]
            if self._counts(pos):
                self._in_range -= 1
        if holder is not None:
            self._holders[pos] = holder
            self._held[holder[0]] = pos
            if self._counts(pos):
                self._in_range += 1
        return prev

    def allocate(self, container_id: str, undo: list[Callable[[], None]] | None = None) -> IPAddress:
        """The container's dynamic address: the one it already holds here if that is still inside the
        dynamic range (a retried batch keeps its addresses), else the next free one after the cursor
        (wrapping); an address it held outside the range is given up.

        Amortised O(1) per call within a batch: the scan only passes over taken addresses, and the cursor
        keeps it from passing them twice. Exhaustion is known from the counters before any scan.
        """
        old = self._held.get(container_id)
        if old is not None:
            if self._counts(old):
                return self._make(old)
            self._record(old, None, undo)
        if self.free_count <= 0:
            raise self._exhausted()
        cur = self.cursor
        pos = cur + 1 if cur is not None and self.first <= cur < self.last else self.first
        holders, gateway, first, last = self._holders, self._gateway, self.first, self.last
        while pos in holders or pos == gateway:
            pos = pos + 1 if pos < last else first
        self._record(pos, (container_id, False), undo)
        self.cursor = pos
        return self._make(pos)

    def claim(self, ip: IPAddress, container_id: str, undo: list[Callable[[], None]] | None = None) -> None:
        """Make the static address ``ip`` the container's address in this subnet.

        Idempotent for the same container; an address held by another container is an error naming both.
        If the container held a different address here (a retried batch with a new static IP), that one is
        given up.
        """
        check_assignable(ip, self.subnet, self.network)
        pos = int(ip)
        holder = self._holders.get(pos)
        if holder is not None and holder[0] != container_id:
            raise IpamError(f"IPAM error: IP address {ip} requested by container {container_id} on network "
                            f"{self.network} is already allocated to container {holder[0]}")
        old = self._held.get(container_id)
        if old is not None and old != pos:
            self._record(old, None, undo)
        self._record(pos, (container_id, True), undo)

    def release(self, ip: IPAddress) -> None:
        self._set(int(ip), None)

    def _record(self, pos: int, holder: Holder | None, undo: list[Callable[[], None]] | None) -> None:
        prev = self._set(pos, holder)
        if undo is not None:
            cursor = self.cursor

            def restore() -> None:
                self._set(pos, prev)
                self.cursor = cursor

            undo.append(restore)

    def _exhausted(self) -> IpamError:
        rng = usable_range(self.subnet)
        net = self.subnet.subnet
        if rng is None or self._size == 0:
            return IpamError(f"IPAM error: subnet {net} of network {self.network} has no address to allocate "
                             f"(lease range and gateway leave none)")
        return IpamError(f"IPAM error: no free IP address left in subnet {net} of network {self.network}: "
                         f"all {self._size} addresses of {rng[0]}-{rng[1]} are allocated")


PoolSource = Callable[[Network, Subnet], SubnetPool]


def allocate_batch(containers: Sequence[NetworkOptions], pool_for: PoolSource,
                   ) -> dict[str, ContainerAddresses | IpamError]:
    """Addresses for every container of a batch, each container all-or-nothing.

    Per network of a container (networks with ``ipam_driver`` other than host-local get ``()``):
    ``static_ips`` absent → one address per subnet, the one the container already holds if any (a retried
    batch keeps its addresses) or the next free one; ``static_ips`` given → ``static_ips[i]`` is claimed
    in ``subnets[i]`` (netavark's pairing) and nothing else is allocated.

    All static claims of the batch are made before any dynamic allocation, so a dynamic pick never takes
    an address that a later container of the same batch asked for statically. A container that fails
    (exhaustion, a conflict, a duplicate id) gets its error and leaves the pools as it found them; the
    others are unaffected. ``pool_for(network, subnet)`` must return the same pool object for the same
    (network id, subnet) throughout the call.
    """
    results: dict[str, ContainerAddresses | IpamError] = {}
    undo: dict[str, list[Callable[[], None]]] = {}
    counts: dict[str, int] = {}
    for opts in containers:
        counts[opts.container_id] = counts.get(opts.container_id, 0) + 1
    out: dict[str, dict[str, list[IPInterface]]] = {}
    for opts in containers:
        cid = opts.container_id
        if counts[cid] > 1:
            results[cid] = IpamError(f"IPAM error: container {cid} appears {counts[cid]} times in the batch")
            continue
        undo[cid] = []
        out[cid] = {}

    def fail(cid: str, exc: IpamError) -> None:
        for step in reversed(undo.pop(cid)):
            step()
        del out[cid]
        results[cid] = exc

    for static_pass in (True, False):
        for opts in containers:
            cid = opts.container_id
            if cid not in out:
                continue
            try:
                for name, per in sorted(opts.networks.items()):
                    net = opts.network_info[name]
                    if net.ipam_driver != "host-local" or (per.static_ips is not None) != static_pass:
                        out[cid].setdefault(name, [])
                        continue
                    out[cid][name] = _one_network(net, per.static_ips, cid, pool_for, undo[cid])
            except IpamError as exc:
                fail(cid, exc)
    for cid, nets in out.items():
        results[cid] = {name: tuple(addrs) for name, addrs in nets.items()}
    return results


def _one_network(net: Network, static_ips: tuple[IPAddress, ...] | None, cid: str, pool_for: PoolSource,
                 undo: list[Callable[[], None]]) -> list[IPInterface]:
    addrs: list[IPInterface] = []
    if static_ips is not None:
        if len(static_ips) > len(net.subnets):
            raise IpamError(f"IPAM error: {len(static_ips)} static IPs given for container {cid} but network "
                            f"{net.name} has {len(net.subnets)} subnet(s)")
        for ip, sub in zip(static_ips, net.subnets, strict=False):
            pool = pool_for(net, sub)
            pool.claim(ip, cid, undo)
            addrs.append(pool.interface(ip))
        return addrs
    for sub in net.subnets:
        pool = pool_for(net, sub)
        addrs.append(pool.interface(pool.allocate(cid, undo)))
    return addrs
