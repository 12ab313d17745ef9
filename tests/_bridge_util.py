"""Shared helpers of the bridge-driver integration tests (library and CLI): config builders and probes.

Probes read the kernel through ``ip -j`` / ``/proc/sys`` run with nsenter inside the sandbox, so they see
exactly what a container or the host would see, independently of the code under test.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from asyncnet.sandbox import Sandbox

NET_ID = "2f259bab93aaaaa2542ba43ef33eb990d0999ee1b9924b557b7be53c0b7a1bb9"
NET_ID2 = "b1a4ef9e0c55de0d2bd0e1f64a8a8b2a18e7c8b3c9d3b2b1e5d8c4f3a2b1c0d9"
NETAVARK = str(Path(sys.executable).parent / "asyncnet-netavark")


def cid(n: int) -> str:
    """A podman-like 64-hex container id."""
    return f"{n:08x}" + "c0ffee" * 9 + "ab"


def network(name: str = "podman", bridge: str = "podman0", *,
            subnets: list[tuple[str, str | None]] | None = None, net_id: str = NET_ID,
            **extra: Any) -> dict[str, Any]:
    subs = [("10.88.0.0/16", "10.88.0.1")] if subnets is None else subnets
    net: dict[str, Any] = {
        "name": name,
        "id": net_id,
        "driver": "bridge",
        "network_interface": bridge,
        "subnets": [{"subnet": s, **({"gateway": g} if g else {})} for s, g in subs],
        "ipv6_enabled": any(":" in s for s, _ in subs),
        "internal": False,
        "dns_enabled": False,
    }
    net.update(extra)
    return net


def options(container: int, attachments: list[tuple[dict[str, Any], dict[str, Any]]],
            **extra: Any) -> dict[str, Any]:
    """NetworkOptions for one container: [(network dict, per-network dict)]."""
    doc: dict[str, Any] = {
        "container_id": cid(container),
        "container_name": f"ctr{container}",
        "networks": {net["name"]: per for net, per in attachments},
        "network_info": {net["name"]: net for net, _ in attachments},
    }
    doc.update(extra)
    return doc


def simple(container: int = 1, ip: str = "10.88.0.2", **per: Any) -> dict[str, Any]:
    return options(container, [(network(), {"interface_name": "eth0", "static_ips": [ip], **per})])


# --------------------------------------------------------------------------------------------------
# probes


def ip_json(sb: Sandbox, args: list[str], ns: str | None = None) -> list[dict[str, Any]]:
    out = sb.run(["ip", "-j", *args], ns).stdout.strip()
    return json.loads(out) if out else []


def link(sb: Sandbox, name: str, ns: str | None = None) -> dict[str, Any]:
    [info] = ip_json(sb, ["-d", "link", "show", "dev", name], ns)
    return info


def link_names(sb: Sandbox, ns: str | None = None) -> list[str]:
    return sorted(sb.links(ns))


def ports(sb: Sandbox, bridge: str) -> list[str]:
    return sorted(i["ifname"] for i in ip_json(sb, ["link", "show", "master", bridge]))


def addrs(sb: Sandbox, name: str, ns: str | None = None) -> list[str]:
    """Global addresses of one interface as "ip/prefix", in kernel order (link-local left out)."""
    [info] = ip_json(sb, ["addr", "show", "dev", name], ns)
    return [f"{a['local']}/{a['prefixlen']}" for a in info.get("addr_info", []) if a.get("scope") != "link"]


def addr_info(sb: Sandbox, name: str, address: str, ns: str | None = None) -> dict[str, Any]:
    [info] = ip_json(sb, ["addr", "show", "dev", name], ns)
    return next(a for a in info["addr_info"] if a["local"] == address)


def routes(sb: Sandbox, ns: str, family: int = 4) -> list[str]:
    """`ip route` lines reduced to "dst via gw dev X metric N" (kernel-made routes left out)."""
    out = []
    for r in ip_json(sb, [f"-{family}", "route", "show"], ns):
        if r.get("protocol") == "kernel" or r["dst"].startswith("fe80::") or r["dst"].startswith("ff00::"):
            continue
        text = r["dst"]
        if "gateway" in r:
            text += f" via {r['gateway']}"
        text += f" dev {r['dev']}"
        if "metric" in r:
            text += f" metric {r['metric']}"
        out.append(text)
    return sorted(out)


def sysctls(sb: Sandbox, keys: list[str], ns: str | None = None) -> dict[str, str]:
    """Read several /proc/sys values inside one namespace with a single nsenter (missing → "-")."""
    script = 'for k; do printf "%s=" "$k"; cat "/proc/sys/$k" 2>/dev/null || echo -; done'
    out = sb.run(["sh", "-c", script, "sh", *keys], ns).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


def ping(sb: Sandbox, ns: str, address: str) -> bool:
    """One ICMP echo from ``ns`` to an address the test assigned inside the sandbox."""
    res = sb.run(["ping", "-c", "1", "-W", "2", "-q", address], ns, check=False)
    return res.returncode == 0


def add_veth(sb: Sandbox, name: str, peer: str, ns: str | None = None) -> None:
    """A non-bridge link (this kernel has no `dummy`): a veth pair with both ends in ``ns``."""
    sb.run(["ip", "link", "add", name, "type", "veth", "peer", "name", peer], ns)


def assert_only_lo(sb: Sandbox, *namespaces: str | None) -> None:
    for ns in namespaces:
        assert link_names(sb, ns) == ["lo"], f"{ns or 'host'}: {link_names(sb, ns)}"


# --------------------------------------------------------------------------------------------------
# the CLI, run the way netavark's own test-suite runs netavark


def netavark(sb: Sandbox, *args: str | bytes, stdin: dict[str, Any] | str | bytes | None = None,
             config: str | bytes | None = None, firewall: str | None = "none",
             env: dict[str, str] | None = None, wrap: list[str] | None = None,
             timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    """``nsenter --net=<sandbox host> asyncnet-netavark --config DIR --firewall-driver none ARGS``.

    ``wrap`` goes between nsenter and the binary (e.g. ``unshare -m sh -c …``).
    """
    cmd: list[str | bytes] = ["nsenter", f"--net={sb.host}", *(wrap or []), NETAVARK,
                              "--config", config if config is not None else str(sb.config_dir)]
    if firewall is not None:
        cmd += ["--firewall-driver", firewall]
    cmd += list(args)
    data: bytes | None
    if isinstance(stdin, dict):
        data = json.dumps(stdin).encode()
    elif isinstance(stdin, str):
        data = stdin.encode()
    else:
        data = stdin
    return subprocess.run(cmd, input=data if data is not None else b"", capture_output=True, timeout=timeout,
                          env=env)


def error_of(res: subprocess.CompletedProcess[bytes]) -> str:
    """The `.error` of a failed call; asserts netavark's error contract (exit 1, one JSON object)."""
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    doc = json.loads(res.stdout)
    assert list(doc) == ["error"], doc
    return doc["error"]


def ok_json(res: subprocess.CompletedProcess[bytes]) -> Any:
    assert res.returncode == 0, (res.returncode, res.stdout, res.stderr)
    return json.loads(res.stdout)


def shell(*parts: str) -> str:
    return " ".join(shlex.quote(p) for p in parts)
