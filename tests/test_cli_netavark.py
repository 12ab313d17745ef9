"""``asyncnet-netavark`` run the way netavark's own test-suite runs netavark:
``nsenter --net=<private host netns> asyncnet-netavark --config DIR --firewall-driver none setup <netns>``
with the NetworkOptions JSON on stdin or ``-f``. Checks the output contract (StatusBlock JSON, ``{"error"}``
+ exit 1, netavark's exact error texts) and that failed calls leave both namespaces untouched.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
from collections.abc import Callable
from typing import Any

import pytest
from _bridge_util import (
    NET_ID2,
    NETAVARK,
    add_veth,
    addrs,
    assert_only_lo,
    error_of,
    link,
    link_names,
    netavark,
    network,
    ok_json,
    options,
    ping,
    ports,
    routes,
    simple,
    sysctls,
)

from asyncnet.sandbox import Sandbox


def dual_doc(container: int = 1, **extra: Any) -> dict[str, Any]:
    net = network(subnets=[("10.88.0.0/16", "10.88.0.1"), ("fd10:88:a::/64", "fd10:88:a::1")])
    return options(container, [(net, {"interface_name": "eth0", "static_ips": ["10.88.0.2", "fd10:88:a::2"],
                                      "static_mac": "02:42:0a:58:00:02"})], **extra)


# --------------------------------------------------------------------------------------------------
# setup / teardown


def test_setup_teardown_stdin(sandbox: Sandbox) -> None:
    c = sandbox.netns("c1")
    doc = simple()
    raw = _setup(sandbox, c, doc)
    res = ok_json(raw)
    assert raw.stderr == b""
    mac = link(sandbox, "eth0", c)["address"]
    assert res == {"podman": {"dns_search_domains": [], "dns_server_ips": [],
                              "interfaces": {"eth0": {"mac_address": mac, "subnets": [
                                  {"gateway": "10.88.0.1", "ipnet": "10.88.0.2/16"}]}}}}
    assert addrs(sandbox, "podman0") == ["10.88.0.1/16"]
    assert routes(sandbox, c) == ["default via 10.88.0.1 dev eth0 metric 100"]
    assert sysctls(sandbox, ["net/ipv4/ip_forward", "net/ipv4/conf/podman0/rp_filter"]) == {
        "net/ipv4/ip_forward": "1", "net/ipv4/conf/podman0/rp_filter": "2"}
    assert sysctls(sandbox, ["net/ipv4/conf/eth0/rp_filter", "net/ipv4/conf/eth0/arp_notify"], c) == {
        "net/ipv4/conf/eth0/rp_filter": "2", "net/ipv4/conf/eth0/arp_notify": "1"}
    assert ping(sandbox, c, "10.88.0.1")

    down = _teardown(sandbox, c, doc)
    assert (down.returncode, down.stdout) == (0, b""), down
    assert_only_lo(sandbox, None, c)


def test_status_block_output_shape(sandbox: Sandbox, tmp_path) -> None:
    """Dual stack with `-f`, a static MAC and container DNS servers (dns_enabled false): the exact output,
    keys in netavark's (serde declaration) order."""
    c = sandbox.netns("c1")
    doc = dual_doc(dns_servers=["1.1.1.1", "2606:4700:4700::1111"])
    path = tmp_path / "opts.json"
    path.write_text(json.dumps(doc))
    res = _netavark(sandbox, "-f", str(path), "setup", c)
    out = ok_json(res)
    assert out == {"podman": {
        "dns_search_domains": [],
        "dns_server_ips": ["1.1.1.1", "2606:4700:4700::1111"],
        "interfaces": {"eth0": {"mac_address": "02:42:0a:58:00:02", "subnets": [
            {"gateway": "10.88.0.1", "ipnet": "10.88.0.2/16"},
            {"gateway": "fd10:88:a::1", "ipnet": "fd10:88:a::2/64"},
        ]}},
    }}
    text = res.stdout.decode()
    order = [text.index(f'"{k}"') for k in ("dns_search_domains", "dns_server_ips", "interfaces",
                                            "mac_address", "subnets", "gateway", "ipnet")]
    assert order == sorted(order), text
    assert sysctls(sandbox, ["net/ipv6/conf/all/forwarding", "net/ipv6/conf/podman0/accept_dad",
                             "net/ipv6/conf/podman0/accept_ra"]) == {
        "net/ipv6/conf/all/forwarding": "1", "net/ipv6/conf/podman0/accept_dad": "0",
        "net/ipv6/conf/podman0/accept_ra": "0"}
    assert sysctls(sandbox, ["net/ipv6/conf/eth0/accept_dad", "net/ipv6/conf/eth0/autoconf"], c) == {
        "net/ipv6/conf/eth0/accept_dad": "0", "net/ipv6/conf/eth0/autoconf": "0"}
    assert ping(sandbox, c, "fd10:88:a::1")

    down = _netavark(sandbox, "-f", str(path), "teardown", c)
    assert down.returncode == 0, down
    assert_only_lo(sandbox, None, c)


def test_two_networks_and_teardown_error_accumulation(sandbox: Sandbox) -> None:
    c = sandbox.netns("c1")
    doc = options(1, [
        (network("net1", "podman0"), {"interface_name": "eth0", "static_ips": ["10.88.0.2"]}),
        (network("net2", "podman1", subnets=[("10.89.0.0/24", "10.89.0.1")], net_id=NET_ID2),
         {"interface_name": "eth1", "static_ips": ["10.89.0.2"]}),
    ])
    out = ok_json(_setup(sandbox, c, doc))
    assert sorted(out) == ["net1", "net2"]
    assert routes(sandbox, c) == ["default via 10.88.0.1 dev eth0 metric 100",
                                  "default via 10.89.0.1 dev eth1 metric 100"]
    sandbox.run(["ip", "link", "del", "eth0"], c)
    sandbox.run(["ip", "link", "del", "eth1"], c)
    assert error_of(_teardown(sandbox, c, doc)) == (
        "netavark encountered multiple errors:"
        "\n\t- failed to delete container veth eth0: Netlink error: No such device (os error 19)"
        "\n\t- failed to delete container veth eth1: Netlink error: No such device (os error 19)")
    assert_only_lo(sandbox, None, c)


def test_netavark_fw_env_and_log_line(sandbox: Sandbox) -> None:
    c = sandbox.netns("c1")
    env = {**os.environ, "NETAVARK_FW": "none", "RUST_LOG": "netavark=info"}
    res = _netavark(sandbox, "setup", c, stdin=simple(), firewall=None, env=env)
    ok_json(res)
    assert res.stderr.decode().splitlines()[0] == "[INFO  netavark::firewall] Not using firewall"
    assert _netavark(sandbox, "teardown", c, stdin=simple(), firewall=None, env=env).returncode == 0
    assert_only_lo(sandbox, None, c)


def test_twenty_concurrent_processes_one_new_bridge(sandbox: Sandbox) -> None:
    n = 20
    nss = [sandbox.netns(f"c{i}") for i in range(n)]
    docs = [simple(i, f"10.88.0.{i + 2}") for i in range(n)]

    def run_all(command: str) -> list[subprocess.CompletedProcess[bytes]]:
        procs = [subprocess.Popen(["nsenter", f"--net={sandbox.host}", NETAVARK, "--config",
                                   str(sandbox.config_dir), "--firewall-driver", "none", command, ns],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for ns in nss]
        results = []
        for p, doc in zip(procs, docs, strict=True):
            out, err = p.communicate(json.dumps(doc).encode(), timeout=60)
            results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
        return results

    results = run_all("setup")
    assert [(r.returncode, r.stderr) for r in results] == [(0, b"")] * n, [r.stdout for r in results]
    assert all(list(json.loads(r.stdout)) == ["podman"] for r in results)
    assert len(ports(sandbox, "podman0")) == n
    assert ping(sandbox, nss[0], f"10.88.0.{n + 1}")
    results = run_all("teardown")
    assert [(r.returncode, r.stdout) for r in results] == [(0, b"")] * n, [r.stdout for r in results]
    assert_only_lo(sandbox, None, *nss)


# --------------------------------------------------------------------------------------------------
# errors: exact netavark texts, and nothing touched


def test_missing_namespace(sandbox: Sandbox) -> None:
    res = _netavark(sandbox, "setup", str(sandbox.root / "ns" / "missing"), stdin=simple())
    assert error_of(res) == "invalid namespace path: IO error: No such file or directory (os error 2)"
    assert_only_lo(sandbox, None)


def test_missing_options_file(sandbox: Sandbox) -> None:
    c = sandbox.netns("c1")
    res = _netavark(sandbox, "-f", str(sandbox.root / "nope.json"), "setup", c)
    assert error_of(res) == "failed to load network options: IO error: No such file or directory (os error 2)"
    assert_only_lo(sandbox, None, c)


def test_unsupported_ipam_driver(sandbox: Sandbox) -> None:
    c = sandbox.netns("c1")
    doc = options(1, [(network(subnets=[], network_interface="dummy0", ipam_options={"driver": "someDriver"}),
                       {"interface_name": "eth0"})])
    assert error_of(_setup(sandbox, c, doc)) == "IO error: unsupported ipam driver someDriver"
    assert_only_lo(sandbox, None, c)


def test_container_interface_exists(sandbox: Sandbox) -> None:
    c = sandbox.netns("c1")
    add_veth(sandbox, "eth0", "eth0p", c)
    assert error_of(_setup(sandbox, c, simple())) == (
        "create veth pair: interface eth0 already exists on container namespace: "
        "Netlink error: File exists (os error 17)")
    assert_only_lo(sandbox, None)
    assert link_names(sandbox, c) == ["eth0", "eth0p", "lo"]
    sandbox.run(["ip", "link", "del", "eth0"], c)


def test_bridge_name_taken_by_non_bridge(sandbox: Sandbox) -> None:
    add_veth(sandbox, "podman0", "podman0p")
    c = sandbox.netns("c1")
    assert error_of(_setup(sandbox, c, simple())) == (
        "bridge interface podman0 already exists but is a veth interface")
    assert link_names(sandbox) == ["lo", "podman0", "podman0p"]
    assert_only_lo(sandbox, c)
    sandbox.run(["ip", "link", "del", "podman0"])


def test_invalid_firewall_driver(sandbox: Sandbox) -> None:
    c = sandbox.netns("c1")
    res = _netavark(sandbox, "setup", c, stdin=simple(), firewall="bogus")
    assert error_of(res) == "Must provide a valid firewall backend, got bogus"
    assert_only_lo(sandbox, None, c)


def _set(path: list[Any], value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        target = doc
        for key in path[:-1]:
            target = target[key]
        if value is _DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value
    return mutate


_DELETE = object()
NI = ["network_info", "podman"]
PN = ["networks", "podman"]

# (id, mutation of a valid document or raw stdin text, substrings the error must contain)
BAD_INPUTS: list[tuple[str, Callable[[dict[str, Any]], None] | str, tuple[str, ...]]] = [
    ("malformed-json", '{"container_id": "abc", ', ("JSON",)),
    ("missing-network-info", _set(["network_info"], _DELETE), ("network_info",)),
    ("network-not-in-info", _set(["networks", "other"], {"interface_name": "eth1"}), ("other", "network_info")),
    ("wrong-type", _set([*NI, "internal"], "yes"), ("internal", "boolean")),
    ("bad-subnet", _set([*NI, "subnets"], [{"subnet": "10.88.0.0/33", "gateway": "10.88.0.1"}]), ("subnet",)),
    ("static-ip-outside", _set([*PN, "static_ips"], ["10.99.0.2"]), ("static_ips[0]", "10.99.0.2")),
    ("static-ip-is-gateway", _set([*PN, "static_ips"], ["10.88.0.1"]), ("static_ips[0]", "gateway")),
    ("ifname-too-long", _set([*PN, "interface_name"], "eth0123456789abc"), ("interface_name", "15")),
    ("bridge-name-slash", _set([*NI, "network_interface"], "pod/man0"), ("network_interface", "/")),
    ("macvlan-driver", _set([*NI, "driver"], "macvlan"), ("driver", "macvlan")),
    ("mtu-abc", _set([*NI, "options"], {"mtu": "abc"}), ("mtu", "abc")),
    ("metric-negative", _set([*NI, "options"], {"metric": "-1"}), ("metric", "-1")),
    ("bad-mac", _set([*PN, "static_mac"], "02:42:zz:00:00:01"), ("static_mac",)),
    ("host-port-0", _set(["port_mappings"], [{"host_ip": "", "container_port": 80, "host_port": 0,
                                             "range": 1, "protocol": "tcp"}]), ("host_port",)),
    ("bad-host-ip", _set(["port_mappings"], [{"host_ip": "abcd", "container_port": 80, "host_port": 8080,
                                             "range": 1, "protocol": "tcp"}]),
     ('invalid host ip "abcd" provided for port 8080',)),
]


@pytest.mark.parametrize(("mutate", "needles"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_invalid_input_touches_nothing(sandbox: Sandbox, mutate: Callable[[dict[str, Any]], None] | str,
                                       needles: tuple[str, ...]) -> None:
    c = sandbox.netns("c1")
    if isinstance(mutate, str):
        stdin: dict[str, Any] | str = mutate
    else:
        stdin = copy.deepcopy(simple())
        mutate(stdin)
    message = error_of(_netavark(sandbox, "setup", c, stdin=stdin))
    for needle in needles:
        assert needle in message, message
    # nothing touched: no link on either side, lo still down in the container, forwarding not enabled
    assert_only_lo(sandbox, None, c)
    assert "UP" not in link(sandbox, "lo", c)["flags"]
    assert sysctls(sandbox, ["net/ipv4/ip_forward"]) == {"net/ipv4/ip_forward": "0"}


# --------------------------------------------------------------------------------------------------
# read-only /proc (hermetic: a private mount namespace for the one command)

RO_PROC = ["unshare", "-m", "sh", "-c",
           'mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && exec "$0" "$@"']
EROFS = "Sysctl error: IO Error: Read-only file system (os error 30)"


def test_read_only_proc_sysctl_error(sandbox: Sandbox) -> None:
    c = sandbox.netns("c1")
    res = _netavark(sandbox, "setup", c, stdin=simple(), wrap=RO_PROC)
    assert error_of(res) == EROFS
    assert_only_lo(sandbox, None, c)
    assert sysctls(sandbox, ["net/ipv4/ip_forward"]) == {"net/ipv4/ip_forward": "0"}


def test_read_only_proc_after_bridge_creation_rolls_back(sandbox: Sandbox) -> None:
    """ip_forward is already 1 (no write needed); the first write that must happen is the new bridge's
    rp_filter: the half-made bridge must not stay behind."""
    sandbox.run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
    c = sandbox.netns("c1")
    res = _netavark(sandbox, "setup", c, stdin=simple(), wrap=RO_PROC)
    assert error_of(res) == EROFS
    assert_only_lo(sandbox, None, c)


def test_read_only_proc_in_container_rolls_back(sandbox: Sandbox) -> None:
    """Host side already right (bridge exists from a first container): the container's own sysctls fail."""
    c1, c2 = sandbox.netns("c1"), sandbox.netns("c2")
    ok_json(_setup(sandbox, c1, simple(1, "10.88.0.2")))
    res = _netavark(sandbox, "setup", c2, stdin=simple(2, "10.88.0.3"), wrap=RO_PROC)
    assert error_of(res) == EROFS
    assert_only_lo(sandbox, c2)
    assert len(ports(sandbox, "podman0")) == 1
    assert _teardown(sandbox, c1, simple(1, "10.88.0.2")).returncode == 0
    assert_only_lo(sandbox, None, c1)


# --------------------------------------------------------------------------------------------------
# version


def test_version_json(sandbox: Sandbox) -> None:
    info = ok_json(_netavark(sandbox, "version", firewall=None))
    assert set(info) >= {"version", "commit", "build_time", "target", "asyncnet"}
    assert info["version"] == "1.14.0"
    assert re.fullmatch(r"[0-9a-f]{40}", info["commit"])
    assert re.match(r"20\d\d-\d\d-\d\dT", info["build_time"])
    assert info["target"].endswith("-unknown-linux-gnu")
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", info["asyncnet"])


def test_dash_dash_version(sandbox: Sandbox) -> None:
    res = _netavark(sandbox, "--version", firewall=None)
    assert res.returncode == 0
    assert re.fullmatch(r"netavark 1\.14\.0 \(asyncnet \d+\.\d+\.\d+[^)]*\)\n", res.stdout.decode())


def test_non_utf8_config_path(sandbox: Sandbox) -> None:
    config = os.fsencode(str(sandbox.root)) + b"/config-\xff"
    info = ok_json(_netavark(sandbox, "version", config=config, firewall=None))
    assert info["version"] == "1.14.0"
    # and a real setup/teardown with it
    c = sandbox.netns("c1")
    ok_json(_netavark(sandbox, "setup", c, stdin=simple(), config=config))
    assert _netavark(sandbox, "teardown", c, stdin=simple(), config=config).returncode == 0
    assert_only_lo(sandbox, None, c)


# --------------------------------------------------------------------------------------------------


def _netavark(sb: Sandbox, *args: str, **kw: Any) -> subprocess.CompletedProcess[bytes]:
    return netavark(sb, *args, **kw)


def _setup(sb: Sandbox, ns: str, doc: dict[str, Any]) -> subprocess.CompletedProcess[bytes]:
    return _netavark(sb, "setup", ns, stdin=doc)


def _teardown(sb: Sandbox, ns: str, doc: dict[str, Any]) -> subprocess.CompletedProcess[bytes]:
    return _netavark(sb, "teardown", ns, stdin=doc)


def test_ipv6_disabled_in_kernel(sandbox: Sandbox) -> None:
    """netavark's whole-output check; the bridge this call created must not stay behind."""
    sandbox.run(["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"])
    c = sandbox.netns("c1")
    res = _setup(sandbox, c, dual_doc())
    assert res.returncode == 1
    assert res.stdout == (b'{"error":"add ip addr to bridge: failed to add ipv6 address, is ipv6 enabled in the '
                          b'kernel?: Netlink error: Permission denied (os error 13)"}\n')
    assert_only_lo(sandbox, None, c)
