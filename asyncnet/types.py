"""netavark's JSON, parsed into typed immutable objects and validated before any kernel call.

Validation lives here (and not in the driver) because a batch must be rejected container by container
*before* anything is created: a half-validated config is how a driver ends up with a bridge and no veth.
Every message names the field that is wrong. Unknown JSON keys are ignored (podman sends e.g. ``created``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import orjson

from .errors import ConfigError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

IFNAMSIZ = 16  # kernel limit incl. NUL: names are at most 15 bytes
PROTOCOLS = ("tcp", "udp", "sctp")
BRIDGE_OPTIONS = ("mtu", "isolate", "metric", "no_default_route", "vrf")
DEFAULT_METRIC = 100


class Isolation(Enum):
    """``options.isolate``: "true" → NORMAL, "strict" → STRICT, anything else → NEVER (netavark's rule)."""

    NEVER = "Never"
    NORMAL = "Normal"
    STRICT = "Strict"

    @classmethod
    def parse(cls, value: str | None) -> Isolation:
        if value == "true":
            return cls.NORMAL
        if value == "strict":
            return cls.STRICT
        return cls.NEVER


@dataclass(frozen=True)
class LeaseRange:
    start_ip: IPAddress | None = None
    end_ip: IPAddress | None = None


@dataclass(frozen=True)
class Subnet:
    subnet: IPNetwork
    gateway: IPAddress | None = None
    lease_range: LeaseRange | None = None

    @property
    def gateway_interface(self) -> IPInterface | None:
        if self.gateway is None:
            return None
        return ipaddress.ip_interface(f"{self.gateway}/{self.subnet.prefixlen}")


@dataclass(frozen=True)
class Route:
    destination: IPNetwork
    gateway: IPAddress
    metric: int | None = None


@dataclass(frozen=True)
class BridgeOptions:
    mtu: int = 0  # 0: kernel default
    isolate: Isolation = Isolation.NEVER
    metric: int = DEFAULT_METRIC
    no_default_route: bool = False
    vrf: str | None = None


@dataclass(frozen=True)
class Network:
    name: str
    id: str
    driver: str
    network_interface: str
    subnets: tuple[Subnet, ...] = ()
    routes: tuple[Route, ...] = ()
    ipv6_enabled: bool = False
    internal: bool = False
    dns_enabled: bool = False
    network_dns_servers: tuple[IPAddress, ...] = ()
    options: Mapping[str, str] = field(default_factory=dict)
    ipam_driver: str = "host-local"
    bridge: BridgeOptions = field(default_factory=BridgeOptions)

    @property
    def has_ipv6(self) -> bool:
        return any(s.subnet.version == 6 for s in self.subnets)

    @property
    def gateways(self) -> tuple[IPAddress, ...]:
        return tuple(s.gateway for s in self.subnets if s.gateway is not None)


@dataclass(frozen=True)
class PerNetworkOptions:
    interface_name: str
    static_ips: tuple[IPAddress, ...] | None = None
    static_mac: str | None = None
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class PortMapping:
    host_ip: str
    container_port: int
    host_port: int
    range: int
    protocol: str

    @property
    def count(self) -> int:
        return max(self.range, 1)

    def to_json(self) -> dict[str, Any]:
        return {
            "host_ip": self.host_ip,
            "container_port": self.container_port,
            "host_port": self.host_port,
            "range": self.range,
            "protocol": self.protocol,
        }


@dataclass(frozen=True)
class NetworkOptions:
    container_id: str
    container_name: str
    networks: Mapping[str, PerNetworkOptions]
    network_info: Mapping[str, Network]
    port_mappings: tuple[PortMapping, ...] | None = None  # None ≠ (): the key's presence matters
    dns_servers: tuple[IPAddress, ...] = ()

    def attachments(self) -> list[tuple[Network, PerNetworkOptions]]:
        """Networks in a stable order (netavark's hash map order is unspecified; sorted is reproducible)."""
        return [(self.network_info[name], opts) for name, opts in sorted(self.networks.items())]


# --------------------------------------------------------------------------------------------------
# parsing helpers: each takes the JSON path so that messages name the field


def _fail(path: str, msg: str) -> ConfigError:
    return ConfigError(f"{path}: {msg}" if path else msg)


def _obj(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(path, f"expected an object, got {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _req(obj: dict[str, Any], key: str, path: str) -> Any:
    if key not in obj or obj[key] is None:
        raise _fail(path, f"missing required field `{key}`")
    return obj[key]


def _str(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise _fail(path, f"expected a string, got {_kind(value)}")
    return value


def _bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(path, f"expected a boolean, got {_kind(value)}")
    return value


def _uint(value: Any, path: str, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(path, f"expected an integer, got {_kind(value)}")
    if not 0 <= value <= maximum:
        raise _fail(path, f"{value} is out of range 0..{maximum}")
    return value


def _list(value: Any, path: str) -> list[Any]:
    if not isinstance(value, list):
        raise _fail(path, f"expected an array, got {_kind(value)}")
    return value


def _opt_list(obj: dict[str, Any], key: str, path: str) -> list[Any]:
    value = obj.get(key)
    return [] if value is None else _list(value, f"{path}.{key}")


def parse_ip(value: Any, path: str) -> IPAddress:
    text = _str(value, path)
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise _fail(path, f"invalid IP address {text!r}") from None


def parse_cidr(value: Any, path: str) -> IPNetwork:
    text = _str(value, path)
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise _fail(path, f"invalid subnet {text!r}") from None


def validate_ifname(name: str, path: str) -> str:
    """The kernel's rules (dev_valid_name) plus whitespace, which netlink allows but tools choke on."""
    if not name:
        raise _fail(path, "interface name must not be empty")
    if len(name.encode()) >= IFNAMSIZ:
        raise _fail(path, f"interface name {name!r} is longer than {IFNAMSIZ - 1} bytes")
    if name in (".", ".."):
        raise _fail(path, f"interface name {name!r} is not allowed")
    bad = [c for c in name if c == "/" or c == ":" or c == "\0" or c.isspace()]
    if bad:
        raise _fail(path, f"interface name {name!r} contains {bad[0]!r}")
    return name


def parse_mac(value: Any, path: str) -> str:
    text = _str(value, path)
    parts = text.split(":")
    try:
        octets = [int(p, 16) for p in parts if len(p) == 2 and all(c in "0123456789abcdefABCDEF" for c in p)]
    except ValueError:
        octets = []
    if len(parts) != 6 or len(octets) != 6:
        raise _fail(path, f"invalid MAC address {text!r}")
    if octets[0] & 1:
        raise _fail(path, f"MAC address {text!r} is a multicast address")
    if not any(octets):
        raise _fail(path, f"MAC address {text!r} is all zeros")
    return text.lower()


def _parse_subnet(raw: Any, path: str) -> Subnet:
    obj = _obj(raw, path)
    net = parse_cidr(_req(obj, "subnet", path), f"{path}.subnet")
    gateway = None
    if obj.get("gateway") is not None:
        gateway = parse_ip(obj["gateway"], f"{path}.gateway")
        if gateway.version != net.version or gateway not in net:
            raise _fail(f"{path}.gateway", f"gateway {gateway} is not in subnet {net}")
        if _is_reserved(gateway, net):
            raise _fail(f"{path}.gateway", f"gateway {gateway} is the network or broadcast address of {net}")
    lease = None
    if obj.get("lease_range") is not None:
        lr = _obj(obj["lease_range"], f"{path}.lease_range")
        start = end = None
        if lr.get("start_ip") is not None:
            start = parse_ip(lr["start_ip"], f"{path}.lease_range.start_ip")
        if lr.get("end_ip") is not None:
            end = parse_ip(lr["end_ip"], f"{path}.lease_range.end_ip")
        for key, ip in (("start_ip", start), ("end_ip", end)):
            if ip is not None and (ip.version != net.version or ip not in net):
                raise _fail(f"{path}.lease_range.{key}", f"{ip} is not in subnet {net}")
        if start is not None and end is not None and int(start) > int(end):
            raise _fail(f"{path}.lease_range", f"start_ip {start} is after end_ip {end}")
        lease = LeaseRange(start, end)
    return Subnet(net, gateway, lease)


def _is_reserved(ip: IPAddress, net: IPNetwork) -> bool:
    """Network address (and v4 broadcast) cannot be a host, except in /31 and /32 (RFC 3021)."""
    if net.version == 4 and net.prefixlen >= 31:
        return False
    if net.version == 6 and net.prefixlen >= 127:
        return False
    if ip == net.network_address:
        return True
    return net.version == 4 and ip == net.broadcast_address


def _parse_bridge_options(options: Mapping[str, str], path: str) -> BridgeOptions:
    for key in options:
        if key not in BRIDGE_OPTIONS:
            raise _fail(f"{path}.{key}", f"unsupported bridge network option {key}")
    mtu = 0
    if "mtu" in options:
        text = options["mtu"]
        if not (text.isascii() and text.isdigit()) or not 0 <= int(text) <= 65535:
            raise _fail(f"{path}.mtu", f"unable to parse mtu {text!r}: expected an integer 0..65535")
        mtu = int(text)
        if 0 < mtu < 68:
            raise _fail(f"{path}.mtu", f"mtu {mtu} is below the IPv4 minimum of 68")
    metric = DEFAULT_METRIC
    if "metric" in options:
        text = options["metric"]
        if not (text.isascii() and text.isdigit()) or int(text) > 0xFFFFFFFF:
            raise _fail(f"{path}.metric",
                        f"unable to parse metric {text!r}: expected an integer 0..4294967295")
        metric = int(text)
    no_default_route = False
    if "no_default_route" in options:
        text = options["no_default_route"].lower()
        if text not in ("true", "false", "1", "0"):
            raise _fail(f"{path}.no_default_route", f"unable to parse {text!r}: expected true or false")
        no_default_route = text in ("true", "1")
    vrf = None
    if options.get("vrf"):
        vrf = validate_ifname(options["vrf"], f"{path}.vrf")
    return BridgeOptions(mtu, Isolation.parse(options.get("isolate")), metric, no_default_route, vrf)


def parse_network(raw: Any, path: str) -> Network:
    obj = _obj(raw, path)
    name = _str(_req(obj, "name", path), f"{path}.name")
    net_id = _str(_req(obj, "id", path), f"{path}.id")
    if not net_id:
        raise _fail(f"{path}.id", "network id must not be empty")
    driver = _str(_req(obj, "driver", path), f"{path}.driver")
    if driver != "bridge":
        raise _fail(f"{path}.driver", f"unsupported driver {driver}: asyncnet implements the bridge driver")
    if obj.get("network_interface") is None:
        raise _fail(path, "no bridge interface name given (`network_interface`)")
    bridge = validate_ifname(_str(obj["network_interface"], f"{path}.network_interface"),
                             f"{path}.network_interface")
    subnets = tuple(_parse_subnet(s, f"{path}.subnets[{i}]")
                    for i, s in enumerate(_opt_list(obj, "subnets", path)))
    routes = []
    for i, r in enumerate(_opt_list(obj, "routes", path)):
        rpath = f"{path}.routes[{i}]"
        robj = _obj(r, rpath)
        dest = parse_cidr(_req(robj, "destination", rpath), f"{rpath}.destination")
        gw = parse_ip(_req(robj, "gateway", rpath), f"{rpath}.gateway")
        if gw.version != dest.version:
            raise _fail(f"{rpath}.gateway", f"gateway {gw} is not of the family of {dest}")
        metric = None if robj.get("metric") is None else _uint(robj["metric"], f"{rpath}.metric", 0xFFFFFFFF)
        routes.append(Route(dest, gw, metric))
    options_raw = obj.get("options") or {}
    options = {k: _str(v, f"{path}.options.{k}") for k, v in _obj(options_raw, f"{path}.options").items()}
    ipam_raw = obj.get("ipam_options") or {}
    ipam = _obj(ipam_raw, f"{path}.ipam_options")
    ipam_driver = _str(ipam.get("driver") or "host-local", f"{path}.ipam_options.driver")
    if ipam_driver not in ("host-local", "none"):
        raise ConfigError(f"IO error: unsupported ipam driver {ipam_driver}")
    dns_servers = tuple(parse_ip(s, f"{path}.network_dns_servers[{i}]")
                        for i, s in enumerate(_opt_list(obj, "network_dns_servers", path)))
    return Network(
        name=name,
        id=net_id,
        driver=driver,
        network_interface=bridge,
        subnets=subnets,
        routes=tuple(routes),
        ipv6_enabled=_bool(obj.get("ipv6_enabled", False), f"{path}.ipv6_enabled"),
        internal=_bool(obj.get("internal", False), f"{path}.internal"),
        dns_enabled=_bool(obj.get("dns_enabled", False), f"{path}.dns_enabled"),
        network_dns_servers=dns_servers,
        options=options,
        ipam_driver=ipam_driver,
        bridge=_parse_bridge_options(options, f"{path}.options"),
    )


def parse_per_network(raw: Any, path: str, network: Network) -> PerNetworkOptions:
    obj = _obj(raw, path)
    ifname = validate_ifname(_str(_req(obj, "interface_name", path), f"{path}.interface_name"),
                             f"{path}.interface_name")
    static_ips = None
    if obj.get("static_ips") is not None:
        ips = [parse_ip(s, f"{path}.static_ips[{i}]") for i, s in enumerate(_list(obj["static_ips"],
                                                                                 f"{path}.static_ips"))]
        if network.ipam_driver == "host-local":
            if len(ips) > len(network.subnets):
                raise _fail(f"{path}.static_ips",
                            f"{len(ips)} static IPs given but network {network.name} has "
                            f"{len(network.subnets)} subnet(s)")
            for i, (ip, sub) in enumerate(zip(ips, network.subnets, strict=False)):
                _check_static_ip(ip, sub, f"{path}.static_ips[{i}]")
        static_ips = tuple(ips)
    mac = None if obj.get("static_mac") is None else parse_mac(obj["static_mac"], f"{path}.static_mac")
    aliases = tuple(_str(a, f"{path}.aliases[{i}]") for i, a in enumerate(_opt_list(obj, "aliases", path)))
    return PerNetworkOptions(ifname, static_ips, mac, aliases)


def _check_static_ip(ip: IPAddress, sub: Subnet, path: str) -> None:
    if ip.version != sub.subnet.version or ip not in sub.subnet:
        raise _fail(path, f"static IP {ip} is not in subnet {sub.subnet}")
    if _is_reserved(ip, sub.subnet):
        raise _fail(path, f"static IP {ip} is the network or broadcast address of {sub.subnet}")
    if ip == sub.gateway:
        raise _fail(path, f"static IP {ip} is the gateway of {sub.subnet}")


def parse_port_mapping(raw: Any, path: str) -> PortMapping:
    obj = _obj(raw, path)
    host_port = _uint(_req(obj, "host_port", path), f"{path}.host_port", 65535)
    container_port = _uint(_req(obj, "container_port", path), f"{path}.container_port", 65535)
    rng = _uint(obj.get("range", 1) if obj.get("range") is not None else 1, f"{path}.range", 65535)
    protocol = _str(_req(obj, "protocol", path), f"{path}.protocol")
    host_ip = _str(obj.get("host_ip") or "", f"{path}.host_ip")
    if host_port == 0:
        raise _fail(f"{path}.host_port", "port 0 is not a valid host port")
    if container_port == 0:
        raise _fail(f"{path}.container_port", "port 0 is not a valid container port")
    count = max(rng, 1)
    for key, start in (("host_port", host_port), ("container_port", container_port)):
        if start + count - 1 > 65535:
            raise _fail(f"{path}.range", f"{key} {start} with range {rng} goes past 65535")
    if protocol not in PROTOCOLS:
        raise _fail(f"{path}.protocol", f"unknown protocol {protocol!r} (expected tcp, udp or sctp)")
    if host_ip not in ("", "0.0.0.0", "::"):
        try:
            ipaddress.ip_address(host_ip)
        except ValueError:
            raise ConfigError(f'invalid host ip "{host_ip}" provided for port {host_port}') from None
    return PortMapping(host_ip, container_port, host_port, rng, protocol)


def parse_network_options(raw: Any) -> NetworkOptions:
    obj = _obj(raw, "")
    container_id = _str(_req(obj, "container_id", ""), "container_id")
    if not container_id:
        raise _fail("container_id", "container id must not be empty")
    container_name = _str(_req(obj, "container_name", ""), "container_name")
    info_raw = _obj(_req(obj, "network_info", ""), "network_info")
    nets_raw = _obj(_req(obj, "networks", ""), "networks")
    network_info: dict[str, Network] = {}
    networks: dict[str, PerNetworkOptions] = {}
    ifnames: set[str] = set()
    for name, per_raw in nets_raw.items():
        if name not in info_raw:
            raise _fail(f"networks.{name}", f"network {name} is not defined in `network_info`")
        net = parse_network(info_raw[name], f"network_info.{name}")
        per = parse_per_network(per_raw, f"networks.{name}", net)
        if per.interface_name in ifnames:
            raise _fail(f"networks.{name}.interface_name",
                        f"interface name {per.interface_name} is used by two networks")
        ifnames.add(per.interface_name)
        network_info[name] = net
        networks[name] = per
    bridges: dict[str, str] = {}
    for name, net in network_info.items():
        other = bridges.setdefault(net.network_interface, name)
        if other != name:
            raise _fail(f"network_info.{name}.network_interface",
                        f"bridge {net.network_interface} is also used by network {other}")
    port_mappings = None
    if "port_mappings" in obj and obj["port_mappings"] is not None:
        port_mappings = tuple(parse_port_mapping(p, f"port_mappings[{i}]")
                              for i, p in enumerate(_list(obj["port_mappings"], "port_mappings")))
    dns_servers = tuple(parse_ip(s, f"dns_servers[{i}]")
                        for i, s in enumerate(_opt_list(obj, "dns_servers", "")))
    return NetworkOptions(container_id, container_name, networks, network_info, port_mappings, dns_servers)


def loads_network_options(data: bytes | str) -> NetworkOptions:
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"invalid network options JSON: {exc}") from None
    return parse_network_options(raw)


# --------------------------------------------------------------------------------------------------
# output: netavark's StatusBlock


@dataclass(frozen=True)
class NetAddress:
    ipnet: IPInterface
    gateway: IPAddress | None

    def to_json(self) -> dict[str, Any]:
        # serde prints every field in declaration order; a missing gateway is `null`
        return {"gateway": None if self.gateway is None else str(self.gateway), "ipnet": str(self.ipnet)}


@dataclass(frozen=True)
class NetInterface:
    mac_address: str
    subnets: tuple[NetAddress, ...] = ()

    def to_json(self) -> dict[str, Any]:
        # netavark's bridge always fills `subnets` (`[]` with ipam driver none)
        return {"mac_address": self.mac_address, "subnets": [s.to_json() for s in self.subnets]}


@dataclass(frozen=True)
class StatusBlock:
    dns_search_domains: tuple[str, ...]
    dns_server_ips: tuple[IPAddress, ...]
    interfaces: Mapping[str, NetInterface]

    def to_json(self) -> dict[str, Any]:
        return {
            "dns_search_domains": list(self.dns_search_domains),
            "dns_server_ips": [str(ip) for ip in self.dns_server_ips],
            "interfaces": {name: i.to_json() for name, i in self.interfaces.items()},
        }
