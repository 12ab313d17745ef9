"""Pure planning: one validated attachment (container × network) → everything that must exist.

Keeping this free of I/O means the driver only executes decisions made here, and the decisions
(names, addresses, routes, sysctls, status output, firewall intents) get fast unit tests.
"""

from __future__ import annotations

import hashlib
import ipaddress
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError
from .firewall.ruleset import NetworkFw, PortFw
from .types import (
    IPAddress,
    IPInterface,
    IPNetwork,
    NetAddress,
    NetInterface,
    Network,
    NetworkOptions,
    PerNetworkOptions,
    StatusBlock,
)

DNS_SEARCH_DOMAIN = "dns.podman"
DEFAULT_ROUTE_METRIC = 100
# The kernel numbers bridge ports in 10 bits (BR_MAX_PORTS = 1024) and reserves number 0: a bridge holds at
# most 1023 ports, the 1024th gets EXFULL (measured on 6.18). Checked before a batch touches anything.
MAX_BRIDGE_PORTS = 1023


@dataclass(frozen=True)
class RouteSpec:
    destination: IPNetwork
    gateway: IPAddress
    metric: int
    static: bool = False  # a network `routes` entry: device chosen by the kernel, deleted on teardown


@dataclass(frozen=True)
class Attachment:
    """One container's membership in one network, fully decided."""

    container_id: str
    container_name: str
    network: Network
    options: PerNetworkOptions
    host_veth: str
    mac: str
    addresses: tuple[IPInterface, ...]
    routes: tuple[RouteSpec, ...]

    @property
    def ifname(self) -> str:
        return self.options.interface_name

    @property
    def bridge(self) -> str:
        return self.network.network_interface

    @property
    def ipv6(self) -> bool:
        return self.network.has_ipv6 or any(a.version == 6 for a in self.addresses)


def host_veth_name(container_id: str, network_id: str) -> str:
    """Deterministic host-side name (15 bytes): teardown and recovery find the host end without asking
    the container namespace (which may be gone) or any state, and a second setup of the same attachment
    collides loudly instead of creating a twin."""
    digest = hashlib.blake2b(f"{container_id}\0{network_id}".encode(), digest_size=8).hexdigest()
    return "veth" + digest[:11]


def random_mac() -> str:
    """Locally administered unicast, like the kernel's own random veth addresses."""
    octets = bytearray(secrets.token_bytes(6))
    octets[0] = (octets[0] & 0xFE) | 0x02
    return ":".join(f"{b:02x}" for b in octets)


def container_addresses(network: Network, opts: PerNetworkOptions) -> tuple[IPInterface, ...]:
    """host-local with static IPs: paired with subnets in order (netavark's rule)."""
    if network.ipam_driver == "none" or not network.subnets:
        return ()
    ips = list(opts.static_ips or ())
    if len(ips) < len(network.subnets):
        raise ConfigError(f"no static ips provided for network {network.name}: "
                          f"{len(network.subnets)} subnet(s), {len(ips)} address(es)")
    return tuple(ipaddress.ip_interface(f"{ip}/{sub.subnet.prefixlen}")
                 for ip, sub in zip(ips, network.subnets, strict=False))


def needs_allocation(opts: NetworkOptions) -> bool:
    """Whether any host-local network of the container lacks static IPs for its subnets."""
    return any(net.ipam_driver == "host-local" and len(per.static_ips or ()) < len(net.subnets)
               for net, per in opts.attachments())


def routes_for(network: Network, addresses: Sequence[IPInterface]) -> tuple[RouteSpec, ...]:
    routes: list[RouteSpec] = []
    if not network.internal and not network.bridge.no_default_route:
        families = {a.version for a in addresses}
        seen: set[int] = set()
        for sub in network.subnets:
            v = sub.subnet.version
            if sub.gateway is None or v in seen or v not in families:
                continue
            seen.add(v)
            default = ipaddress.ip_network("0.0.0.0/0" if v == 4 else "::/0")
            routes.append(RouteSpec(default, sub.gateway, network.bridge.metric))
    for r in network.routes:
        routes.append(RouteSpec(r.destination, r.gateway,
                                r.metric if r.metric is not None else DEFAULT_ROUTE_METRIC, static=True))
    return tuple(routes)


def plan_attachment(opts: NetworkOptions, network: Network, per: PerNetworkOptions,
                    addresses: Sequence[IPInterface] | None = None) -> Attachment:
    """``addresses``: what IPAM gave this attachment (static and allocated); None = static IPs only."""
    addrs = tuple(addresses) if addresses is not None else container_addresses(network, per)
    return Attachment(
        container_id=opts.container_id,
        container_name=opts.container_name,
        network=network,
        options=per,
        host_veth=host_veth_name(opts.container_id, network.id),
        mac=per.static_mac or random_mac(),
        addresses=addrs,
        routes=routes_for(network, addrs),
    )


def plan_container(opts: NetworkOptions,
                   addresses: Mapping[str, Sequence[IPInterface]] | None = None) -> list[Attachment]:
    addresses = addresses or {}
    return [plan_attachment(opts, net, per, addresses.get(net.name)) for net, per in opts.attachments()]


def container_sysctls(att: Attachment) -> list[tuple[str, str, bool]]:
    """(path under /proc/sys, value, tolerate ENOENT/EROFS) inside the container namespace."""
    ifn = att.ifname
    out = [(f"net/ipv6/conf/{ifn}/autoconf", "0", True)]
    if att.ipv6:
        out.append((f"net/ipv6/conf/{ifn}/accept_dad", "0", False))
    out += [(f"net/ipv4/conf/{ifn}/arp_notify", "1", False), (f"net/ipv4/conf/{ifn}/rp_filter", "2", False)]
    return out


def bridge_sysctls(network: Network) -> list[tuple[str, str, bool]]:
    br = network.network_interface
    out: list[tuple[str, str, bool]] = []
    if network.has_ipv6:
        out += [(f"net/ipv6/conf/{br}/accept_dad", "0", False), (f"net/ipv6/conf/{br}/accept_ra", "0", False)]
    out.append((f"net/ipv4/conf/{br}/rp_filter", "2", False))
    if network.internal:
        out.append((f"net/ipv4/conf/{br}/forwarding", "0", False))
        if network.has_ipv6:
            out.append((f"net/ipv6/conf/{br}/forwarding", "0", False))
    return out


def host_sysctls(networks: Sequence[Network]) -> list[tuple[str, str, bool]]:
    """Host-wide forwarding, once per batch: only non-internal networks need it."""
    out: list[tuple[str, str, bool]] = []
    external = [n for n in networks if not n.internal]
    if external:
        out.append(("net/ipv4/ip_forward", "1", False))
    if any(n.has_ipv6 for n in external):
        out.append(("net/ipv6/conf/all/forwarding", "1", False))
    return out


def status_block(att: Attachment, dns_servers: Sequence[IPAddress]) -> StatusBlock:
    net = att.network
    subnets = []
    for addr in att.addresses:
        gw = next((s.gateway for s in net.subnets if addr.ip in s.subnet), None)
        subnets.append(NetAddress(addr, gw))
    if net.dns_enabled:
        search: tuple[str, ...] = (DNS_SEARCH_DOMAIN,)
        servers: tuple[IPAddress, ...] = net.gateways
    else:
        search, servers = (), tuple(dns_servers)
    return StatusBlock(search, servers, {att.ifname: NetInterface(att.mac, tuple(subnets))})


def network_fw(network: Network) -> NetworkFw:
    return NetworkFw(
        network_id=network.id,
        network_name=network.name,
        bridge=network.network_interface,
        subnets=tuple(s.subnet for s in network.subnets),
        gateways=network.gateways,
        isolation=network.bridge.isolate,
    )


def port_fw(opts: NetworkOptions, att: Attachment, dns_port: int) -> PortFw:
    v4 = next((a for a in att.addresses if isinstance(a, ipaddress.IPv4Interface)), None)
    v6 = next((a for a in att.addresses if isinstance(a, ipaddress.IPv6Interface)), None)
    return PortFw(
        network=network_fw(att.network),
        container_id=opts.container_id,
        container_name=opts.container_name,
        ipv4=v4,
        ipv6=v6,
        port_mappings=opts.port_mappings,
        dns_port=dns_port,
    )


# --------------------------------------------------------------------------------------------------
# what the journal keeps so that teardown and gc can undo an attachment without the original input


def journal_record(opts: NetworkOptions, att: Attachment, dns_port: int) -> dict[str, Any]:
    net = att.network
    return {
        "network": {
            "id": net.id, "name": net.name, "bridge": net.network_interface,
            "subnets": [str(s.subnet) for s in net.subnets], "gateways": [str(g) for g in net.gateways],
            "isolation": net.bridge.isolate.value, "internal": net.internal, "dns_enabled": net.dns_enabled,
        },
        "port_mappings": None if opts.port_mappings is None else [m.to_json() for m in opts.port_mappings],
        "dns_port": dns_port,
        "container_name": opts.container_name,
    }


@dataclass(frozen=True)
class RecordedIntents:
    """The firewall and DNS side of one journalled attachment, rebuilt for teardown or gc."""

    network: NetworkFw | None  # None for internal networks (no firewall)
    port: PortFw | None
    dns_network: str | None  # network name when it had DNS entries


def intents_from_record(container_id: str, addresses: Sequence[IPInterface],
                        record: Mapping[str, Any]) -> RecordedIntents:
    from .types import Isolation, parse_port_mapping

    n = record["network"]
    nf = NetworkFw(
        network_id=n["id"], network_name=n["name"], bridge=n["bridge"],
        subnets=tuple(ipaddress.ip_network(s) for s in n["subnets"]),
        gateways=tuple(ipaddress.ip_address(g) for g in n["gateways"]),
        isolation=Isolation(n["isolation"]),
    )
    raw = record.get("port_mappings")
    mappings = None if raw is None else tuple(parse_port_mapping(m, "journal") for m in raw)
    v4 = next((a for a in addresses if isinstance(a, ipaddress.IPv4Interface)), None)
    v6 = next((a for a in addresses if isinstance(a, ipaddress.IPv6Interface)), None)
    pf = PortFw(network=nf, container_id=container_id, container_name=record.get("container_name", ""),
                ipv4=v4, ipv6=v6, port_mappings=mappings, dns_port=int(record.get("dns_port", 53)))
    internal = bool(n.get("internal"))
    return RecordedIntents(None if internal else nf, None if internal else pf,
                           n["name"] if n.get("dns_enabled") else None)
