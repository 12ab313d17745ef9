"""Unit tests (no kernel) of the configuration layer: parsing, validation, StatusBlock output, error texts.

The invalid-input table mirrors issue 2 §2: every bad input must be a ``ConfigError`` whose message names
the offending field, raised by the parser alone (so nothing can have been touched in the kernel).
"""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from asyncnet.errors import (
    AsyncnetError,
    ConfigError,
    MultipleErrors,
    NetlinkOpError,
    combine,
)
from asyncnet.types import (
    DEFAULT_METRIC,
    BridgeOptions,
    Isolation,
    NetAddress,
    NetInterface,
    NetworkOptions,
    PortMapping,
    StatusBlock,
    loads_network_options,
    parse_network_options,
)

ip = ipaddress.ip_address
net = ipaddress.ip_network

NET_ID = "2f259bab93aaaaa2542ba43ef33eb990d0999ee1b9924b557b7be53c0b7a1bb9"


def full_config() -> dict[str, Any]:
    """What podman sends for a dual-stack container with everything set (plus keys netavark ignores)."""
    return {
        "container_id": "f31bc3fa3a5e1f3b6e9f0d1b4e2c7a8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b",
        "container_name": "web",
        "container_hostname": "web-host",  # known to netavark, unused here
        "some_future_key": {"nested": [1, 2, 3]},  # unknown: ignored
        "port_mappings": [
            {"host_ip": "", "container_port": 80, "host_port": 8080, "range": 1, "protocol": "tcp"},
            {"host_ip": "127.0.0.1", "container_port": 6000, "host_port": 5000, "range": 3,
             "protocol": "udp"},
            {"host_ip": "::1", "container_port": 9000, "host_port": 9000, "range": 0, "protocol": "sctp"},
        ],
        "dns_servers": ["1.1.1.1", "2606:4700:4700::1111"],
        "networks": {
            "podman1": {
                "static_ips": ["10.88.0.2", "fd10:88:a::2"],
                "static_mac": "AA:BB:CC:DD:EE:01",
                "aliases": ["web", "f31bc3fa3a5e"],
                "interface_name": "eth0",
                "options": {"future": "x"},  # per-network driver options: ignored
            },
        },
        "network_info": {
            "podman1": {
                "name": "podman1",
                "id": NET_ID,
                "driver": "bridge",
                "network_interface": "podman1",
                "created": "2024-05-01T10:00:00.000000000Z",  # podman sends this; ignored
                "labels": {"com.example": "yes"},  # ignored
                "subnets": [
                    {
                        "subnet": "10.88.0.0/16",
                        "gateway": "10.88.0.1",
                        "lease_range": {"start_ip": "10.88.0.10", "end_ip": "10.88.0.200"},
                    },
                    {"subnet": "fd10:88:a::/64", "gateway": "fd10:88:a::1"},
                ],
                "routes": [
                    {"destination": "10.99.0.0/24", "gateway": "10.88.0.254", "metric": 50},
                    {"destination": "fd99::/64", "gateway": "fd10:88:a::fe"},
                ],
                "ipv6_enabled": True,
                "internal": False,
                "dns_enabled": True,
                "network_dns_servers": ["8.8.8.8"],
                "options": {"mtu": "1400", "isolate": "strict", "metric": "200", "no_default_route": "false"},
                "ipam_options": {"driver": "host-local"},
            },
        },
    }


def minimal_config() -> dict[str, Any]:
    return {
        "container_id": "abc",
        "container_name": "c1",
        "networks": {"podman": {"interface_name": "eth0"}},
        "network_info": {
            "podman": {
                "name": "podman",
                "id": NET_ID,
                "driver": "bridge",
                "network_interface": "podman0",
                "ipv6_enabled": False,
                "internal": False,
                "dns_enabled": False,
            },
        },
    }


# --------------------------------------------------------------------------------------------------
# valid input


def test_full_example_parses_into_the_right_values() -> None:
    opts = loads_network_options(orjson.dumps(full_config()))
    assert isinstance(opts, NetworkOptions)
    assert opts.container_id.startswith("f31bc3fa")
    assert opts.container_name == "web"
    assert opts.dns_servers == (ip("1.1.1.1"), ip("2606:4700:4700::1111"))
    assert set(opts.networks) == set(opts.network_info) == {"podman1"}

    n = opts.network_info["podman1"]
    assert (n.name, n.id, n.driver, n.network_interface) == ("podman1", NET_ID, "bridge", "podman1")
    assert (n.ipv6_enabled, n.internal, n.dns_enabled) == (True, False, True)
    assert [s.subnet for s in n.subnets] == [net("10.88.0.0/16"), net("fd10:88:a::/64")]
    assert isinstance(n.subnets[0].subnet, ipaddress.IPv4Network)
    assert isinstance(n.subnets[1].subnet, ipaddress.IPv6Network)
    assert n.gateways == (ip("10.88.0.1"), ip("fd10:88:a::1"))
    assert n.subnets[0].gateway_interface == ipaddress.ip_interface("10.88.0.1/16")
    assert n.subnets[1].gateway_interface == ipaddress.ip_interface("fd10:88:a::1/64")
    lease = n.subnets[0].lease_range
    assert lease is not None and (lease.start_ip, lease.end_ip) == (ip("10.88.0.10"), ip("10.88.0.200"))
    assert n.subnets[1].lease_range is None
    assert n.has_ipv6
    assert [(r.destination, r.gateway, r.metric) for r in n.routes] == [
        (net("10.99.0.0/24"), ip("10.88.0.254"), 50),
        (net("fd99::/64"), ip("fd10:88:a::fe"), None),
    ]
    assert n.network_dns_servers == (ip("8.8.8.8"),)
    assert dict(n.options) == full_config()["network_info"]["podman1"]["options"]
    assert n.bridge == BridgeOptions(mtu=1400, isolate=Isolation.STRICT, metric=200, no_default_route=False)
    assert n.bridge.vrf is None
    assert n.ipam_driver == "host-local"

    per = opts.networks["podman1"]
    assert per.interface_name == "eth0"
    assert per.static_ips == (ip("10.88.0.2"), ip("fd10:88:a::2"))
    assert per.static_mac == "aa:bb:cc:dd:ee:01"  # normalised like the kernel prints it
    assert per.aliases == ("web", "f31bc3fa3a5e")

    assert opts.port_mappings == (
        PortMapping(host_ip="", container_port=80, host_port=8080, range=1, protocol="tcp"),
        PortMapping(host_ip="127.0.0.1", container_port=6000, host_port=5000, range=3, protocol="udp"),
        PortMapping(host_ip="::1", container_port=9000, host_port=9000, range=0, protocol="sctp"),
    )
    assert [p.count for p in opts.port_mappings] == [1, 3, 1]  # range 0 means one port
    assert opts.port_mappings[1].to_json() == full_config()["port_mappings"][1]

    assert opts.attachments() == [(n, per)]


def test_str_bytes_and_dict_inputs_agree() -> None:
    cfg = full_config()
    text = orjson.dumps(cfg).decode()
    assert loads_network_options(text) == loads_network_options(text.encode()) == parse_network_options(cfg)


def test_parsed_objects_are_immutable() -> None:
    opts = parse_network_options(full_config())
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.container_id = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.network_info["podman1"].subnets[0].gateway = None  # type: ignore[misc]
    assert isinstance(opts.network_info["podman1"].subnets, tuple)


def test_minimal_config_defaults() -> None:
    opts = parse_network_options(minimal_config())
    n = opts.network_info["podman"]
    assert n.subnets == () and n.routes == () and n.network_dns_servers == ()
    assert n.ipam_driver == "host-local"
    assert n.bridge == BridgeOptions()
    assert n.bridge.metric == DEFAULT_METRIC == 100
    assert n.bridge.mtu == 0 and n.bridge.isolate is Isolation.NEVER and not n.bridge.no_default_route
    assert not n.has_ipv6 and n.gateways == ()
    per = opts.networks["podman"]
    assert per.static_ips is None and per.static_mac is None and per.aliases == ()
    assert opts.port_mappings is None
    assert opts.dns_servers == ()


def test_nulls_for_optional_fields_are_absent() -> None:
    cfg = minimal_config()
    cfg["dns_servers"] = None
    cfg["networks"]["podman"].update(static_ips=None, static_mac=None, aliases=None)
    cfg["network_info"]["podman"].update(subnets=None, routes=None, options=None, ipam_options=None,
                                         network_dns_servers=None)
    assert parse_network_options(cfg) == parse_network_options(minimal_config())


@pytest.mark.parametrize(
    ("value", "expected"),
    [("absent", None), (None, None), ([], ())],
    ids=["absent", "null", "empty-list"],
)
def test_port_mappings_absent_vs_empty(value: Any, expected: tuple[()] | None) -> None:
    cfg = minimal_config()
    if value != "absent":
        cfg["port_mappings"] = value
    assert parse_network_options(cfg).port_mappings == expected


@pytest.mark.parametrize(
    ("isolate", "expected"),
    [("true", Isolation.NORMAL), ("strict", Isolation.STRICT), ("false", Isolation.NEVER)],
)
def test_isolate_option(isolate: str, expected: Isolation) -> None:
    cfg = minimal_config()
    cfg["network_info"]["podman"]["options"] = {"isolate": isolate}
    assert parse_network_options(cfg).network_info["podman"].bridge.isolate is expected


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"mtu": "9000"}, BridgeOptions(mtu=9000)),
        ({"mtu": "0"}, BridgeOptions(mtu=0)),
        ({"metric": "0"}, BridgeOptions(metric=0)),
        ({"metric": "4294967295"}, BridgeOptions(metric=4294967295)),
        ({"no_default_route": "true"}, BridgeOptions(no_default_route=True)),
        ({"vrf": "vrf-blue"}, BridgeOptions(vrf="vrf-blue")),
        ({"vrf": ""}, BridgeOptions()),
    ],
)
def test_bridge_options(options: dict[str, str], expected: BridgeOptions) -> None:
    cfg = minimal_config()
    cfg["network_info"]["podman"]["options"] = options
    assert parse_network_options(cfg).network_info["podman"].bridge == expected


def test_interface_names_of_exactly_15_bytes_are_fine() -> None:
    cfg = minimal_config()
    cfg["networks"]["podman"]["interface_name"] = "e" * 15
    cfg["network_info"]["podman"]["network_interface"] = "b" * 13 + "é"  # 13 + 2 bytes
    opts = parse_network_options(cfg)
    assert opts.networks["podman"].interface_name == "e" * 15
    assert opts.network_info["podman"].network_interface == "b" * 13 + "é"


def test_ipam_none_is_accepted() -> None:
    cfg = minimal_config()
    cfg["network_info"]["podman"].update(subnets=[], ipam_options={"driver": "none"})
    assert parse_network_options(cfg).network_info["podman"].ipam_driver == "none"


def test_fewer_static_ips_than_subnets_pair_in_order() -> None:
    cfg = full_config()
    cfg["networks"]["podman1"]["static_ips"] = ["10.88.0.7"]
    assert parse_network_options(cfg).networks["podman1"].static_ips == (ip("10.88.0.7"),)


def test_network_info_entries_not_used_by_the_container_are_not_parsed() -> None:
    cfg = minimal_config()
    cfg["network_info"]["unused"] = {"driver": "macvlan"}  # would be invalid, but nobody asks for it
    assert set(parse_network_options(cfg).network_info) == {"podman"}


def test_two_networks_sorted_attachments() -> None:
    cfg = minimal_config()
    other = copy.deepcopy(cfg["network_info"]["podman"])
    other.update(name="alpha", network_interface="podman9")
    cfg["network_info"]["alpha"] = other
    cfg["networks"]["alpha"] = {"interface_name": "eth1"}
    opts = parse_network_options(cfg)
    pairs = [(n.name, p.interface_name) for n, p in opts.attachments()]
    assert pairs == [("alpha", "eth1"), ("podman", "eth0")]


# --------------------------------------------------------------------------------------------------
# invalid input: the table of issue 2 §2


Mutation = Callable[[dict[str, Any]], None]
NI = "network_info.podman1"
PN = "networks.podman1"


def _set(*path: str | int, value: Any) -> Mutation:
    def apply(cfg: dict[str, Any]) -> None:
        obj: Any = cfg
        for key in path[:-1]:
            obj = obj[key]
        obj[path[-1]] = value

    return apply


def _del(*path: str | int) -> Mutation:
    def apply(cfg: dict[str, Any]) -> None:
        obj: Any = cfg
        for key in path[:-1]:
            obj = obj[key]
        del obj[path[-1]]

    return apply


def _net(key: str, value: Any) -> Mutation:
    return _set("network_info", "podman1", key, value=value)


def _per(key: str, value: Any) -> Mutation:
    return _set("networks", "podman1", key, value=value)


def _opt(key: str, value: str) -> Mutation:
    return _set("network_info", "podman1", "options", key, value=value)


def _port(key: str, value: Any, index: int = 0) -> Mutation:
    return _set("port_mappings", index, key, value=value)


def _sub(index: int, *key: str, value: Any) -> Mutation:
    return _set("network_info", "podman1", "subnets", index, *key, value=value)


def _route(index: int, key: str, value: Any) -> Mutation:
    return _set("network_info", "podman1", "routes", index, key, value=value)


def _port_full(**kw: Any) -> Mutation:
    mapping = {"host_ip": "", "container_port": 80, "host_port": 8080, "range": 1, "protocol": "tcp"} | kw
    return _set("port_mappings", 0, value=mapping)


# (id, mutation of full_config(), substrings every one of which the message must contain)
BAD_CASES: list[tuple[str, Mutation, tuple[str, ...]]] = [
    # missing required keys
    ("missing-container_id", _del("container_id"), ("container_id",)),
    ("missing-container_name", _del("container_name"), ("container_name",)),
    ("missing-networks", _del("networks"), ("networks",)),
    ("missing-network_info", _del("network_info"), ("network_info",)),
    ("null-container_id", _set("container_id", value=None), ("container_id",)),
    ("empty-container_id", _set("container_id", value=""), ("container_id",)),
    ("missing-network-name", _del("network_info", "podman1", "name"), (NI, "name")),
    ("missing-network-id", _del("network_info", "podman1", "id"), (NI, "id")),
    ("empty-network-id", _net("id", ""), (f"{NI}.id",)),
    ("missing-driver", _del("network_info", "podman1", "driver"), (NI, "driver")),
    ("missing-network_interface", _del("network_info", "podman1", "network_interface"),
     (NI, "network_interface")),
    ("missing-interface_name", _del("networks", "podman1", "interface_name"), (PN, "interface_name")),
    ("missing-subnet", _del("network_info", "podman1", "subnets", 0, "subnet"),
     (f"{NI}.subnets[0]", "subnet")),
    ("missing-route-destination", _del("network_info", "podman1", "routes", 0, "destination"),
     (f"{NI}.routes[0]", "destination")),
    ("missing-route-gateway", _del("network_info", "podman1", "routes", 1, "gateway"),
     (f"{NI}.routes[1]", "gateway")),
    ("missing-host_port", _del("port_mappings", 0, "host_port"), ("port_mappings[0]", "host_port")),
    ("missing-container_port", _del("port_mappings", 1, "container_port"),
     ("port_mappings[1]", "container_port")),
    ("missing-protocol", _del("port_mappings", 2, "protocol"), ("port_mappings[2]", "protocol")),
    # wrong types
    ("type-container_id", _set("container_id", value=5), ("container_id", "string")),
    ("type-container_name", _set("container_name", value=["x"]), ("container_name", "string")),
    ("type-networks", _set("networks", value=[]), ("networks", "object")),
    ("type-network_info", _set("network_info", value="podman1"), ("network_info", "object")),
    ("type-network-entry", _set("network_info", "podman1", value=[]), (NI, "object")),
    ("type-per-network-entry", _set("networks", "podman1", value="eth0"), (PN, "object")),
    ("type-name", _net("name", 1), (f"{NI}.name", "string")),
    ("type-driver", _net("driver", True), (f"{NI}.driver", "string")),
    ("type-network_interface", _net("network_interface", 7), (f"{NI}.network_interface", "string")),
    ("type-subnets", _net("subnets", {"subnet": "10.88.0.0/16"}), (f"{NI}.subnets", "array")),
    ("type-subnet-entry", _set("network_info", "podman1", "subnets", 0, value="10.88.0.0/16"),
     (f"{NI}.subnets[0]", "object")),
    ("type-subnet-value", _sub(0, "subnet", value=168296448),
     (f"{NI}.subnets[0].subnet", "string")),
    ("type-lease_range", _sub(0, "lease_range", value="x"),
     (f"{NI}.subnets[0].lease_range", "object")),
    ("type-routes", _net("routes", "10.99.0.0/24"), (f"{NI}.routes", "array")),
    ("type-route-metric", _route(0, "metric", value="50"),
     (f"{NI}.routes[0].metric", "integer")),
    ("type-route-metric-negative", _route(0, "metric", value=-1),
     (f"{NI}.routes[0].metric",)),
    ("type-ipv6_enabled", _net("ipv6_enabled", "yes"), (f"{NI}.ipv6_enabled", "boolean")),
    ("type-internal", _net("internal", 0), (f"{NI}.internal", "boolean")),
    ("type-dns_enabled", _net("dns_enabled", "true"), (f"{NI}.dns_enabled", "boolean")),
    ("type-options", _net("options", ["mtu=1500"]), (f"{NI}.options", "object")),
    ("type-option-value", _opt("mtu", 1500), (f"{NI}.options.mtu", "string")),  # type: ignore[arg-type]
    ("type-ipam_options", _net("ipam_options", "host-local"), (f"{NI}.ipam_options", "object")),
    ("type-ipam-driver", _net("ipam_options", {"driver": 1}), (f"{NI}.ipam_options.driver", "string")),
    ("type-network_dns_servers", _net("network_dns_servers", "8.8.8.8"),
     (f"{NI}.network_dns_servers", "array")),
    ("type-interface_name", _per("interface_name", 0), (f"{PN}.interface_name", "string")),
    ("type-static_ips", _per("static_ips", "10.88.0.2"), (f"{PN}.static_ips", "array")),
    ("type-static_ip-entry", _per("static_ips", [167772162]), (f"{PN}.static_ips[0]", "string")),
    ("type-static_mac", _per("static_mac", 5), (f"{PN}.static_mac", "string")),
    ("type-aliases", _per("aliases", "web"), (f"{PN}.aliases", "array")),
    ("type-alias-entry", _per("aliases", ["web", 1]), (f"{PN}.aliases[1]", "string")),
    ("type-port_mappings", _set("port_mappings", value={"host_port": 1}), ("port_mappings", "array")),
    ("type-port-entry", _set("port_mappings", 0, value=8080), ("port_mappings[0]", "object")),
    ("type-host_port-string", _port("host_port", "8080"), ("port_mappings[0].host_port", "integer")),
    ("type-host_port-bool", _port("host_port", True), ("port_mappings[0].host_port", "integer")),
    ("type-container_port-float", _port("container_port", 80.5),
     ("port_mappings[0].container_port", "integer")),
    ("type-range", _port("range", "3", 1), ("port_mappings[1].range", "integer")),
    ("type-protocol", _port("protocol", 6), ("port_mappings[0].protocol", "string")),
    ("type-host_ip", _port("host_ip", 1), ("port_mappings[0].host_ip", "string")),
    ("type-dns_servers", _set("dns_servers", value="1.1.1.1"), ("dns_servers", "array")),
    # unparsable subnet / IP / MAC
    ("bad-subnet-prefix", _sub(0, "subnet", value="10.88.0.0/33"),
     (f"{NI}.subnets[0].subnet", "10.88.0.0/33")),
    ("bad-subnet-text", _sub(1, "subnet", value="fd10:88:a::/sixty"),
     (f"{NI}.subnets[1].subnet",)),
    ("bad-subnet-gateway", _sub(0, "gateway", value="10.88.0.256"),
     (f"{NI}.subnets[0].gateway", "10.88.0.256")),
    ("gateway-outside-subnet", _sub(0, "gateway", value="10.89.0.1"),
     (f"{NI}.subnets[0].gateway", "not in subnet")),
    ("gateway-wrong-family", _sub(0, "gateway", value="fd10:88:a::1"),
     (f"{NI}.subnets[0].gateway",)),
    ("gateway-is-network-address", _sub(0, "gateway", value="10.88.0.0"),
     (f"{NI}.subnets[0].gateway", "network")),
    ("bad-lease-start", _sub(0, "lease_range", "start_ip", value="x"),
     (f"{NI}.subnets[0].lease_range.start_ip",)),
    ("lease-end-outside", _set("network_info", "podman1", "subnets", 0, "lease_range", "end_ip",
                               value="10.90.0.1"), (f"{NI}.subnets[0].lease_range.end_ip", "not in subnet")),
    ("bad-static-ip", _per("static_ips", ["10.88.0", "fd10:88:a::2"]), (f"{PN}.static_ips[0]", "10.88.0")),
    ("bad-static-ip-v6", _per("static_ips", ["10.88.0.2", "fd10:88:a::g"]), (f"{PN}.static_ips[1]",)),
    ("bad-route-destination", _route(0, "destination", value="10.99/abc"),
     (f"{NI}.routes[0].destination",)),
    ("bad-route-gateway", _route(0, "gateway", value="gw"),
     (f"{NI}.routes[0].gateway", "gw")),
    ("route-gateway-wrong-family", _route(0, "gateway", value="fd10:88:a::fe"),
     (f"{NI}.routes[0].gateway",)),
    ("bad-network_dns_server", _net("network_dns_servers", ["8.8.8.8", "dns.google"]),
     (f"{NI}.network_dns_servers[1]", "dns.google")),
    ("bad-dns_server", _set("dns_servers", value=["1.1.1.1", "1.1.1.1.1"]), ("dns_servers[1]", "1.1.1.1.1")),
    ("bad-mac-hex", _per("static_mac", "zz:bb:cc:dd:ee:ff"), (f"{PN}.static_mac", "zz:bb:cc:dd:ee:ff")),
    ("bad-mac-short", _per("static_mac", "aa:bb:cc:dd:ee"), (f"{PN}.static_mac",)),
    ("bad-mac-long", _per("static_mac", "aa:bb:cc:dd:ee:ff:00"), (f"{PN}.static_mac",)),
    ("bad-mac-octet-width", _per("static_mac", "a:bb:cc:dd:ee:fff"), (f"{PN}.static_mac",)),
    ("bad-mac-sign", _per("static_mac", "+2:00:00:00:00:01"), (f"{PN}.static_mac",)),
    ("bad-mac-space", _per("static_mac", " 2:00:00:00:00:01"), (f"{PN}.static_mac",)),
    ("bad-mac-empty", _per("static_mac", ""), (f"{PN}.static_mac",)),
    ("mac-multicast", _per("static_mac", "01:00:5e:00:00:01"), (f"{PN}.static_mac", "multicast")),
    ("mac-zero", _per("static_mac", "00:00:00:00:00:00"), (f"{PN}.static_mac",)),
    # static IPs vs their subnets
    ("static-ip-outside-subnet", _per("static_ips", ["10.89.0.5", "fd10:88:a::2"]),
     (f"{PN}.static_ips[0]", "10.89.0.5", "not in subnet 10.88.0.0/16")),
    ("static-ip-v6-outside-subnet", _per("static_ips", ["10.88.0.2", "fd10:99::2"]),
     (f"{PN}.static_ips[1]", "not in subnet fd10:88:a::/64")),
    ("static-ips-swapped-families", _per("static_ips", ["fd10:88:a::2", "10.88.0.2"]),
     (f"{PN}.static_ips[0]", "not in subnet")),
    ("static-ip-is-gateway", _per("static_ips", ["10.88.0.1", "fd10:88:a::2"]),
     (f"{PN}.static_ips[0]", "10.88.0.1", "gateway")),
    ("static-ip-v6-is-gateway", _per("static_ips", ["10.88.0.2", "fd10:88:a::1"]),
     (f"{PN}.static_ips[1]", "gateway")),
    ("static-ip-is-network-address", _per("static_ips", ["10.88.0.0", "fd10:88:a::2"]),
     (f"{PN}.static_ips[0]", "10.88.0.0", "network")),
    ("static-ip-v6-is-network-address", _per("static_ips", ["10.88.0.2", "fd10:88:a::"]),
     (f"{PN}.static_ips[1]", "network")),
    ("static-ip-is-broadcast", _per("static_ips", ["10.88.255.255", "fd10:88:a::2"]),
     (f"{PN}.static_ips[0]", "broadcast")),
    ("more-static-ips-than-subnets", _per("static_ips", ["10.88.0.2", "fd10:88:a::2", "10.88.0.3"]),
     (f"{PN}.static_ips", "3 static IPs", "2 subnet")),
    # interface and bridge names
    ("ifname-empty", _per("interface_name", ""), (f"{PN}.interface_name", "empty")),
    ("ifname-16-bytes", _per("interface_name", "e" * 16), (f"{PN}.interface_name", "15 bytes")),
    ("ifname-16-bytes-multibyte", _per("interface_name", "é" * 8), (f"{PN}.interface_name", "15 bytes")),
    ("ifname-slash", _per("interface_name", "eth/0"), (f"{PN}.interface_name", "'/'")),
    ("ifname-space", _per("interface_name", "eth 0"), (f"{PN}.interface_name", "' '")),
    ("ifname-tab", _per("interface_name", "eth\t0"), (f"{PN}.interface_name",)),
    ("ifname-newline", _per("interface_name", "eth0\n"), (f"{PN}.interface_name",)),
    ("ifname-nbsp", _per("interface_name", "eth\u00a00"), (f"{PN}.interface_name",)),
    ("ifname-nul", _per("interface_name", "eth\x000"), (f"{PN}.interface_name", "\\x00")),
    ("bridge-empty", _net("network_interface", ""), (f"{NI}.network_interface", "empty")),
    ("bridge-null", _net("network_interface", None), (NI, "network_interface")),
    ("bridge-16-bytes", _net("network_interface", "podman" + "1" * 10),
     (f"{NI}.network_interface", "15 bytes")),
    ("bridge-slash", _net("network_interface", "pod/man"), (f"{NI}.network_interface", "'/'")),
    ("bridge-space", _net("network_interface", "pod man"), (f"{NI}.network_interface", "' '")),
    ("bridge-nul", _net("network_interface", "podman\x00"), (f"{NI}.network_interface", "\\x00")),
    ("bridge-dotdot", _net("network_interface", ".."), (f"{NI}.network_interface",)),
    # cross references
    ("network-missing-from-network_info", _set("networks", "other", value={"interface_name": "eth1"}),
     ("networks.other", "network_info")),
    ("same-interface-twice", lambda cfg: _two_networks(cfg, ifname="eth0", bridge="podman2"),
     ("interface_name", "eth0")),
    ("same-bridge-twice", lambda cfg: _two_networks(cfg, ifname="eth1", bridge="podman1"),
     ("network_interface", "podman1")),
    # driver, options, ipam
    ("driver-macvlan", _net("driver", "macvlan"), (f"{NI}.driver", "macvlan")),
    ("driver-empty", _net("driver", ""), (f"{NI}.driver",)),
    ("mtu-abc", _opt("mtu", "abc"), (f"{NI}.options.mtu", "abc")),
    ("mtu-negative", _opt("mtu", "-1"), (f"{NI}.options.mtu", "-1")),
    ("mtu-empty", _opt("mtu", ""), (f"{NI}.options.mtu",)),
    ("mtu-too-big", _opt("mtu", "65536"), (f"{NI}.options.mtu", "65536")),
    ("mtu-too-small", _opt("mtu", "67"), (f"{NI}.options.mtu", "67")),
    ("mtu-unicode-digit", _opt("mtu", "\u00b2"), (f"{NI}.options.mtu",)),
    ("mtu-whitespace", _opt("mtu", " 1500"), (f"{NI}.options.mtu",)),
    ("metric-negative", _opt("metric", "-1"), (f"{NI}.options.metric", "-1")),
    ("metric-abc", _opt("metric", "abc"), (f"{NI}.options.metric", "abc")),
    ("metric-too-big", _opt("metric", "4294967296"), (f"{NI}.options.metric",)),
    ("metric-unicode-digit", _opt("metric", "\u00b9\u2070\u2070"), (f"{NI}.options.metric",)),
    ("no_default_route-bad", _opt("no_default_route", "maybe"), (f"{NI}.options.no_default_route", "maybe")),
    ("vrf-bad-name", _opt("vrf", "vrf/blue"), (f"{NI}.options.vrf",)),
    ("unknown-bridge-option", _opt("hairpin", "true"), (f"{NI}.options.hairpin", "hairpin")),
    ("ipam-dhcp", _net("ipam_options", {"driver": "dhcp"}), ("unsupported ipam driver dhcp",)),
    # port mappings
    ("host_port-0", _port("host_port", 0), ("port_mappings[0].host_port", "0")),
    ("container_port-0", _port("container_port", 0, 1), ("port_mappings[1].container_port", "0")),
    ("host_port-65536", _port("host_port", 65536), ("port_mappings[0].host_port", "65536")),
    ("container_port-70000", _port("container_port", 70000), ("port_mappings[0].container_port", "70000")),
    ("host_port-negative", _port("host_port", -1), ("port_mappings[0].host_port", "-1")),
    ("range-negative", _port("range", -3, 1), ("port_mappings[1].range",)),
    ("range-overflows-host", _port_full(host_port=65534, container_port=80, range=3),
     ("port_mappings[0].range", "65534", "65535")),
    ("range-overflows-container", _port_full(host_port=8000, container_port=65000, range=1000),
     ("port_mappings[0].range", "container_port", "65535")),
    ("protocol-icmp", _port("protocol", "icmp"), ("port_mappings[0].protocol", "icmp")),
    ("protocol-combined", _port("protocol", "tcp,udp"), ("port_mappings[0].protocol", "tcp,udp")),
    ("protocol-empty", _port("protocol", ""), ("port_mappings[0].protocol",)),
]


def _two_networks(cfg: dict[str, Any], *, ifname: str, bridge: str) -> None:
    other = copy.deepcopy(cfg["network_info"]["podman1"])
    other.update(name="podman2", id="b" * 64, network_interface=bridge, subnets=[], routes=[])
    cfg["network_info"]["podman2"] = other
    cfg["networks"]["podman2"] = {"interface_name": ifname}


def _check_bad(cfg: dict[str, Any], needles: tuple[str, ...]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_network_options(cfg)
    # the JSON text path (what the CLI reads) must give the very same error
    with pytest.raises(ConfigError) as info_json:
        loads_network_options(orjson.dumps(cfg))
    assert str(info_json.value) == str(info.value)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return info.value


@pytest.mark.parametrize(("mutate", "needles"), [c[1:] for c in BAD_CASES], ids=[c[0] for c in BAD_CASES])
def test_invalid_input(mutate: Mutation, needles: tuple[str, ...]) -> None:
    cfg = full_config()
    parse_network_options(cfg)  # the baseline is valid: the mutation alone is at fault
    mutate(cfg)
    _check_bad(cfg, needles)


def test_bad_case_ids_are_unique() -> None:
    ids = [c[0] for c in BAD_CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize(
    "data",
    [b"", b"{", b"not json", b'{"container_id": "c",}', b"\xff\xfe", b'{"a": 1} trailing', "{'a': 1}"],
    ids=["empty", "unterminated", "garbage", "trailing-comma", "bad-utf8", "trailing-data", "single-quotes"],
)
def test_malformed_json(data: bytes | str) -> None:
    with pytest.raises(ConfigError) as info:
        loads_network_options(data)
    assert str(info.value).startswith("invalid network options JSON: ")


@pytest.mark.parametrize("doc", [[], "str", 1, None, True], ids=["array", "string", "number", "null", "bool"])
def test_top_level_must_be_an_object(doc: Any) -> None:
    with pytest.raises(ConfigError, match="expected an object"):
        loads_network_options(orjson.dumps(doc))


def test_missing_required_key_names_the_key() -> None:
    cfg = minimal_config()
    del cfg["container_name"]
    with pytest.raises(ConfigError) as info:
        parse_network_options(cfg)
    assert str(info.value) == "missing required field `container_name`"


def test_invalid_host_ip_exact_text() -> None:
    cfg = full_config()
    cfg["port_mappings"] = [{"host_ip": "abcd", "container_port": 80, "host_port": 8080, "range": 1,
                             "protocol": "tcp"}]
    with pytest.raises(ConfigError) as info:
        loads_network_options(orjson.dumps(cfg))
    assert str(info.value) == 'invalid host ip "abcd" provided for port 8080'


@pytest.mark.parametrize("host_ip", ["10.0.0.256", "1.2.3", "fd00::g", "localhost", " 127.0.0.1"])
def test_other_invalid_host_ips(host_ip: str) -> None:
    cfg = full_config()
    cfg["port_mappings"][1]["host_ip"] = host_ip
    with pytest.raises(ConfigError) as info:
        parse_network_options(cfg)
    assert str(info.value) == f'invalid host ip "{host_ip}" provided for port 5000'


@pytest.mark.parametrize("host_ip", ["", "0.0.0.0", "::", "192.168.1.10", "fd65:8371:648b:c06::1"])
def test_valid_host_ips(host_ip: str) -> None:
    cfg = full_config()
    cfg["port_mappings"][0]["host_ip"] = host_ip
    assert parse_network_options(cfg).port_mappings[0].host_ip == host_ip  # type: ignore[index]


def test_range_reaching_exactly_65535_is_fine() -> None:
    cfg = full_config()
    cfg["port_mappings"] = [{"host_ip": "", "container_port": 65533, "host_port": 65533, "range": 3,
                             "protocol": "tcp"}]
    assert parse_network_options(cfg).port_mappings[0].count == 3  # type: ignore[index]


def test_unsupported_ipam_driver_exact_text() -> None:
    """netavark's own test ("bridge unknown ipam driver") uses this very config."""
    cfg = {
        "container_id": "someID",
        "container_name": "someName",
        "networks": {"podman": {"interface_name": "eth0"}},
        "network_info": {
            "podman": {
                "name": "podman",
                "id": NET_ID,
                "driver": "bridge",
                "network_interface": "dummy0",
                "subnets": [],
                "ipv6_enabled": False,
                "internal": False,
                "dns_enabled": False,
                "ipam_options": {"driver": "someDriver"},
            },
        },
    }
    with pytest.raises(ConfigError) as info:
        loads_network_options(orjson.dumps(cfg))
    assert str(info.value) == "IO error: unsupported ipam driver someDriver"


# --------------------------------------------------------------------------------------------------
# output: StatusBlock


def test_status_block_to_json_dual_stack() -> None:
    block = StatusBlock(
        dns_search_domains=("dns.podman",),
        dns_server_ips=(ip("10.88.0.1"), ip("fd10:88:a::1")),
        interfaces={
            "eth0": NetInterface(
                mac_address="aa:bb:cc:dd:ee:01",
                subnets=(
                    NetAddress(ipaddress.ip_interface("10.88.0.2/16"), ip("10.88.0.1")),
                    NetAddress(ipaddress.ip_interface("fd10:88:a::2/64"), ip("fd10:88:a::1")),
                ),
            ),
        },
    )
    expected = {
        "dns_search_domains": ["dns.podman"],
        "dns_server_ips": ["10.88.0.1", "fd10:88:a::1"],
        "interfaces": {
            "eth0": {
                "mac_address": "aa:bb:cc:dd:ee:01",
                "subnets": [
                    {"ipnet": "10.88.0.2/16", "gateway": "10.88.0.1"},
                    {"ipnet": "fd10:88:a::2/64", "gateway": "fd10:88:a::1"},
                ],
            },
        },
    }
    assert block.to_json() == expected
    # serialisable as is, and keys come out in netavark's (serde declaration) order
    text = orjson.dumps({"podman1": block.to_json()})
    assert orjson.loads(text) == {"podman1": expected}
    assert list(block.to_json()) == ["dns_search_domains", "dns_server_ips", "interfaces"]
    assert list(block.to_json()["interfaces"]["eth0"]) == ["mac_address", "subnets"]
    assert list(block.to_json()["interfaces"]["eth0"]["subnets"][0]) == ["gateway", "ipnet"]


def test_status_block_to_json_empty_fields_are_present() -> None:
    """netavark always fills these Options: no DNS → empty lists; ipam none → `subnets: []`;
    a subnet without gateway → `gateway: null`."""
    block = StatusBlock(
        dns_search_domains=(),
        dns_server_ips=(),
        interfaces={
            "eth0": NetInterface("02:00:00:00:00:01"),
            "eth1": NetInterface("02:00:00:00:00:02",
                                 (NetAddress(ipaddress.ip_interface("10.89.0.2/24"), None),)),
        },
    )
    assert block.to_json() == {
        "dns_search_domains": [],
        "dns_server_ips": [],
        "interfaces": {
            "eth0": {"mac_address": "02:00:00:00:00:01", "subnets": []},
            "eth1": {"mac_address": "02:00:00:00:00:02",
                     "subnets": [{"gateway": None, "ipnet": "10.89.0.2/24"}]},
        },
    }


# --------------------------------------------------------------------------------------------------
# errors


def test_multiple_errors_text() -> None:
    enodev = "Netlink error: No such device (os error 19)"
    errs = [NetlinkOpError(f"failed to delete container veth eth{i}: {enodev}", code=19) for i in (0, 1)]
    multi = MultipleErrors(errs)
    assert str(multi) == (
        "netavark encountered multiple errors:"
        "\n\t- failed to delete container veth eth0: Netlink error: No such device (os error 19)"
        "\n\t- failed to delete container veth eth1: Netlink error: No such device (os error 19)"
    )
    assert multi.errors == errs
    assert isinstance(multi, AsyncnetError)


def test_combine() -> None:
    a, b, c = AsyncnetError("a"), ConfigError("b"), NetlinkOpError("c", code=17)
    assert combine([]) is None
    assert combine([a]) is a
    both = combine([a, b, c])
    assert isinstance(both, MultipleErrors)
    assert str(both) == "netavark encountered multiple errors:\n\t- a\n\t- b\n\t- c"
    assert both.errors == [a, b, c]


def test_wrap_keeps_class_and_code() -> None:
    err = NetlinkOpError("Netlink error: File exists (os error 17)", code=17)
    wrapped = err.wrap("create veth pair: interface eth0 already exists on container namespace")
    assert type(wrapped) is NetlinkOpError
    assert wrapped.code == 17 and wrapped.exists
    assert str(wrapped) == ("create veth pair: interface eth0 already exists on container namespace: "
                            "Netlink error: File exists (os error 17)")
    assert str(err) == "Netlink error: File exists (os error 17)"  # the original is untouched
