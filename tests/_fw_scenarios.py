"""The spec's §11 worked examples as firewall inputs, and their expected `nft list` output.

Shared by the pure planner tests and the real-nftables tests so both check the same scenarios.
"""

from __future__ import annotations

import ipaddress
import re

from asyncnet.firewall.ruleset import NetworkFw, PortFw
from asyncnet.types import Isolation, PortMapping

ip = ipaddress.ip_address
net = ipaddress.ip_network
iface = ipaddress.ip_interface

DNS_PORT = 1153

PODMAN1 = NetworkFw("2f259bab" + "1" * 56, "podman1", "podman1",
                    (net("10.88.0.0/16"), net("fd10:88:a::/64")), (ip("10.88.0.1"), ip("fd10:88:a::1")),
                    Isolation.NEVER)
STRICT1 = NetworkFw("5c9a1d0e" + "2" * 56, "strict1", "strict0", (net("10.89.5.0/24"),),
                    (ip("10.89.5.1"),), Isolation.STRICT)
ISO1 = NetworkFw("9e8d7c6b" + "3" * 56, "iso1", "iso1", (net("10.90.0.0/24"), net("fd90::/64")),
                 (ip("10.90.0.1"), ip("fd90::1")), Isolation.NORMAL)
PODMAN = NetworkFw("a1b2c3d4" + "4" * 56, "podman", "podman0", (net("10.91.0.0/24"),), (ip("10.91.0.1"),),
                   Isolation.NEVER)

CTR1 = PortFw(PODMAN1, "c1" * 32, "ctr1", iface("10.88.0.2/16"), iface("fd10:88:a::2/64"),
              (PortMapping("", 80, 8080, 1, "tcp"), PortMapping("", 6000, 5000, 3, "udp")), DNS_PORT)
CTR2 = PortFw(STRICT1, "c2" * 32, "ctr2", iface("10.89.5.2/24"), None, None, DNS_PORT)
CTR3 = PortFw(ISO1, "c3" * 32, "ctr3", iface("10.90.0.2/24"), iface("fd90::2/64"), (
    PortMapping("127.0.0.1", 90, 9090, 1, "tcp"),
    PortMapping("0.0.0.0", 443, 8443, 1, "tcp"),
    PortMapping("::", 444, 8444, 1, "tcp"),
    PortMapping("192.168.1.5", 445, 8445, 1, "tcp"),
    PortMapping("fd00::5", 446, 8446, 2, "tcp"),
    PortMapping("", 7000, 7000, 0, "sctp"),
), DNS_PORT)
CTR4 = PortFw(PODMAN, "c4" * 32, "ctr4", iface("10.91.0.2/24"), None, None, DNS_PORT)


def container(network: NetworkFw, n: int, ports: int = 0, *, dns_port: int = 53,
              base_port: int = 10000) -> PortFw:
    """The n-th container on a v4 (/16 or wider) network, with `ports` tcp mappings."""
    subnet = network.subnets[0]
    addr = subnet.network_address + 2 + n
    mappings = tuple(PortMapping("", 80 + k, base_port + n * ports + k, 1, "tcp") for k in range(ports))
    return PortFw(network, f"{n:064x}", f"ctr{n}", iface(f"{addr}/{subnet.prefixlen}"), None,
                  mappings if ports else None, dns_port)


LISTING_11_1 = """\
table inet netavark {
	chain INPUT {
		type filter hook input priority filter; policy accept;
		ip saddr 10.88.0.0/16 meta l4proto { tcp, udp } th dport 53 accept
		ip6 saddr fd10:88:a::/64 meta l4proto { tcp, udp } th dport 53 accept
		ip saddr 10.89.5.0/24 meta l4proto { tcp, udp } th dport 53 accept
	}

	chain FORWARD {
		type filter hook forward priority filter; policy accept;
		ct state invalid drop
		jump NETAVARK-ISOLATION-1
		ip daddr 10.88.0.0/16 ct state established,related accept
		ip saddr 10.88.0.0/16 accept
		ip6 daddr fd10:88:a::/64 ct state established,related accept
		ip6 saddr fd10:88:a::/64 accept
		ip daddr 10.89.5.0/24 ct state established,related accept
		ip saddr 10.89.5.0/24 accept
	}

	chain POSTROUTING {
		type nat hook postrouting priority srcnat; policy accept;
		meta mark & 0x00002000 == 0x00002000 masquerade
		ip saddr 10.88.0.0/16 jump nv_2f259bab_10_88_0_0_nm16
		ip6 saddr fd10:88:a::/64 jump nv_2f259bab_fd10-88-a--_nm64
		ip saddr 10.89.5.0/24 jump nv_5c9a1d0e_10_89_5_0_nm24
	}

	chain PREROUTING {
		type nat hook prerouting priority dstnat; policy accept;
		fib daddr type local jump NETAVARK-HOSTPORT-DNAT
	}

	chain OUTPUT {
		type nat hook output priority -100; policy accept;
		fib daddr type local jump NETAVARK-HOSTPORT-DNAT
	}

	chain NETAVARK-HOSTPORT-DNAT {
		ip daddr 10.89.5.1 meta l4proto { tcp, udp } th dport 53 dnat ip to 10.89.5.1:1153
		ip6 daddr fd10:88:a::1 meta l4proto { tcp, udp } th dport 53 dnat ip6 to [fd10:88:a::1]:1153
		ip daddr 10.88.0.1 meta l4proto { tcp, udp } th dport 53 dnat ip to 10.88.0.1:1153
		tcp dport 8080 jump nv_2f259bab_10_88_0_0_nm16_dnat
		udp dport 5000-5002 jump nv_2f259bab_10_88_0_0_nm16_dnat
		tcp dport 8080 jump nv_2f259bab_fd10-88-a--_nm64_dnat
		udp dport 5000-5002 jump nv_2f259bab_fd10-88-a--_nm64_dnat
	}

	chain NETAVARK-HOSTPORT-SETMARK {
		meta mark set meta mark | 0x00002000
	}

	chain NETAVARK-ISOLATION-1 {
		iifname "strict0" oifname != "strict0" jump NETAVARK-ISOLATION-3
	}

	chain NETAVARK-ISOLATION-2 {
		oifname "strict0" drop
	}

	chain NETAVARK-ISOLATION-3 {
		oifname "podman1" drop
		jump NETAVARK-ISOLATION-2
	}

	chain nv_2f259bab_10_88_0_0_nm16 {
		ip daddr 10.88.0.0/16 accept
		ip daddr != 224.0.0.0/4 masquerade
	}

	chain nv_2f259bab_fd10-88-a--_nm64 {
		ip6 daddr fd10:88:a::/64 accept
		ip6 daddr != ::/8 masquerade
	}

	chain nv_2f259bab_10_88_0_0_nm16_dnat {
		ip saddr 10.88.0.0/16 tcp dport 8080 jump NETAVARK-HOSTPORT-SETMARK
		ip saddr 127.0.0.1 tcp dport 8080 jump NETAVARK-HOSTPORT-SETMARK
		tcp dport 8080 dnat ip to 10.88.0.2:80
		ip saddr 10.88.0.0/16 udp dport 5000-5002 jump NETAVARK-HOSTPORT-SETMARK
		ip saddr 127.0.0.1 udp dport 5000-5002 jump NETAVARK-HOSTPORT-SETMARK
		udp dport 5000 dnat ip to 10.88.0.2:6000
		udp dport 5001 dnat ip to 10.88.0.2:6001
		udp dport 5002 dnat ip to 10.88.0.2:6002
	}

	chain nv_2f259bab_fd10-88-a--_nm64_dnat {
		ip6 saddr fd10:88:a::/64 tcp dport 8080 jump NETAVARK-HOSTPORT-SETMARK
		tcp dport 8080 dnat ip6 to [fd10:88:a::2]:80
		ip6 saddr fd10:88:a::/64 udp dport 5000-5002 jump NETAVARK-HOSTPORT-SETMARK
		udp dport 5000 dnat ip6 to [fd10:88:a::2]:6000
		udp dport 5001 dnat ip6 to [fd10:88:a::2]:6001
		udp dport 5002 dnat ip6 to [fd10:88:a::2]:6002
	}

	chain nv_5c9a1d0e_10_89_5_0_nm24 {
		ip daddr 10.89.5.0/24 accept
		ip daddr != 224.0.0.0/4 masquerade
	}
}
"""

# §11.2: chain bodies after adding iso1 (ctr3) and podman (ctr4) to the §11.1 state
CHAINS_11_2 = {
    "NETAVARK-HOSTPORT-DNAT:jumps": """\
tcp dport 8080 jump nv_2f259bab_10_88_0_0_nm16_dnat
udp dport 5000-5002 jump nv_2f259bab_10_88_0_0_nm16_dnat
tcp dport 8080 jump nv_2f259bab_fd10-88-a--_nm64_dnat
udp dport 5000-5002 jump nv_2f259bab_fd10-88-a--_nm64_dnat
ip daddr 127.0.0.1 tcp dport 9090 jump nv_9e8d7c6b_10_90_0_0_nm24_dnat
tcp dport 8443 jump nv_9e8d7c6b_10_90_0_0_nm24_dnat
ip daddr 192.168.1.5 tcp dport 8445 jump nv_9e8d7c6b_10_90_0_0_nm24_dnat
sctp dport 7000 jump nv_9e8d7c6b_10_90_0_0_nm24_dnat
tcp dport 8444 jump nv_9e8d7c6b_fd90--_nm64_dnat
ip6 daddr fd00::5 tcp dport 8446-8447 jump nv_9e8d7c6b_fd90--_nm64_dnat
sctp dport 7000 jump nv_9e8d7c6b_fd90--_nm64_dnat""",
    "NETAVARK-HOSTPORT-DNAT:dns": """\
ip daddr 10.91.0.1 meta l4proto { tcp, udp } th dport 53 dnat ip to 10.91.0.1:1153
ip6 daddr fd90::1 meta l4proto { tcp, udp } th dport 53 dnat ip6 to [fd90::1]:1153
ip daddr 10.90.0.1 meta l4proto { tcp, udp } th dport 53 dnat ip to 10.90.0.1:1153
ip daddr 10.89.5.1 meta l4proto { tcp, udp } th dport 53 dnat ip to 10.89.5.1:1153
ip6 daddr fd10:88:a::1 meta l4proto { tcp, udp } th dport 53 dnat ip6 to [fd10:88:a::1]:1153
ip daddr 10.88.0.1 meta l4proto { tcp, udp } th dport 53 dnat ip to 10.88.0.1:1153""",
    "NETAVARK-ISOLATION-1": """\
iifname "strict0" oifname != "strict0" jump NETAVARK-ISOLATION-3
iifname "iso1" oifname != "iso1" jump NETAVARK-ISOLATION-2""",
    "NETAVARK-ISOLATION-2": """\
oifname "strict0" drop
oifname "iso1" drop""",
    "NETAVARK-ISOLATION-3": """\
oifname "podman0" drop
oifname "podman1" drop
jump NETAVARK-ISOLATION-2""",
    "nv_9e8d7c6b_10_90_0_0_nm24_dnat": """\
ip saddr 10.90.0.0/24 ip daddr 127.0.0.1 tcp dport 9090 jump NETAVARK-HOSTPORT-SETMARK
ip saddr 127.0.0.1 ip daddr 127.0.0.1 tcp dport 9090 jump NETAVARK-HOSTPORT-SETMARK
ip daddr 127.0.0.1 tcp dport 9090 dnat ip to 10.90.0.2:90
ip saddr 10.90.0.0/24 tcp dport 8443 jump NETAVARK-HOSTPORT-SETMARK
ip saddr 127.0.0.1 tcp dport 8443 jump NETAVARK-HOSTPORT-SETMARK
tcp dport 8443 dnat ip to 10.90.0.2:443
ip saddr 10.90.0.0/24 ip daddr 192.168.1.5 tcp dport 8445 jump NETAVARK-HOSTPORT-SETMARK
ip saddr 127.0.0.1 ip daddr 192.168.1.5 tcp dport 8445 jump NETAVARK-HOSTPORT-SETMARK
ip daddr 192.168.1.5 tcp dport 8445 dnat ip to 10.90.0.2:445
ip saddr 10.90.0.0/24 sctp dport 7000 jump NETAVARK-HOSTPORT-SETMARK
ip saddr 127.0.0.1 sctp dport 7000 jump NETAVARK-HOSTPORT-SETMARK
sctp dport 7000 dnat ip to 10.90.0.2:7000""",
    "nv_9e8d7c6b_fd90--_nm64_dnat": """\
ip6 saddr fd90::/64 tcp dport 8444 jump NETAVARK-HOSTPORT-SETMARK
tcp dport 8444 dnat ip6 to [fd90::2]:444
ip6 saddr fd90::/64 ip6 daddr fd00::5 tcp dport 8446-8447 jump NETAVARK-HOSTPORT-SETMARK
ip6 daddr fd00::5 tcp dport 8446 dnat ip6 to [fd90::2]:446
ip6 daddr fd00::5 tcp dport 8447 dnat ip6 to [fd90::2]:447
ip6 saddr fd90::/64 sctp dport 7000 jump NETAVARK-HOSTPORT-SETMARK
sctp dport 7000 dnat ip6 to [fd90::2]:7000""",
}

LISTING_11_3 = """\
table inet netavark {
	chain INPUT {
		type filter hook input priority filter; policy accept;
	}

	chain FORWARD {
		type filter hook forward priority filter; policy accept;
		ct state invalid drop
		jump NETAVARK-ISOLATION-1
	}

	chain POSTROUTING {
		type nat hook postrouting priority srcnat; policy accept;
		meta mark & 0x00002000 == 0x00002000 masquerade
	}

	chain PREROUTING {
		type nat hook prerouting priority dstnat; policy accept;
		fib daddr type local jump NETAVARK-HOSTPORT-DNAT
	}

	chain OUTPUT {
		type nat hook output priority -100; policy accept;
		fib daddr type local jump NETAVARK-HOSTPORT-DNAT
	}

	chain NETAVARK-HOSTPORT-DNAT {
	}

	chain NETAVARK-HOSTPORT-SETMARK {
		meta mark set meta mark | 0x00002000
	}

	chain NETAVARK-ISOLATION-1 {
	}

	chain NETAVARK-ISOLATION-2 {
	}

	chain NETAVARK-ISOLATION-3 {
		jump NETAVARK-ISOLATION-2
	}
}
"""


def chain_bodies(listing: str) -> dict[str, list[str]]:
    """`nft list table` text -> chain name -> rule lines (header line of base chains dropped)."""
    chains: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in listing.splitlines():
        s = line.strip()
        m = re.match(r"chain (\S+) \{$", s)
        if m:
            current = chains.setdefault(m.group(1), [])
        elif s == "}":
            current = None
        elif current is not None and s and not s.startswith("type "):
            current.append(s)
    return chains
