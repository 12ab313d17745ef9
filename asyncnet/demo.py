"""`python -m asyncnet.demo`: network a handful of containers in throwaway namespaces and show it works.

Everything happens inside a private "host" namespace (a Sandbox), so the machine's own networking is
never touched; the sandbox is removed at the end whatever happens.
"""

from __future__ import annotations

import argparse
import time

import anyio
import orjson

from .engine import Container, Engine
from .sandbox import Sandbox
from .types import parse_network_options

NETWORK = {
    "name": "demo", "id": "d3m0" + "0" * 60, "driver": "bridge", "network_interface": "demo0",
    "subnets": [{"subnet": "10.77.0.0/24", "gateway": "10.77.0.1"},
                {"subnet": "fd77::/64", "gateway": "fd77::1"}],
    "ipv6_enabled": True, "internal": False, "dns_enabled": False,
}


def _options(i: int) -> dict[str, object]:
    return {
        "container_id": f"demo-{i}", "container_name": f"demo{i}",
        "networks": {"demo": {"interface_name": "eth0", "static_ips": [f"10.77.0.{i + 2}", f"fd77::{i + 2:x}"]}},
        "network_info": {"demo": NETWORK},
        "port_mappings": [{"host_ip": "", "container_port": 80, "host_port": 8080 + i, "range": 1,
                           "protocol": "tcp"}],
    }


async def run(n: int, firewall: str) -> int:
    with Sandbox() as sb:
        batch = [Container.of(sb.netns(f"ctr{i}"), parse_network_options(_options(i))) for i in range(n)]
        async with Engine(config_dir=sb.config_dir, host_netns=sb.host, firewall=firewall) as engine:
            t0 = time.perf_counter()
            results = await engine.setup(batch)
            took = (time.perf_counter() - t0) * 1000
            failed = [r for r in results if r.error]
            print(f"set up {n - len(failed)}/{n} containers in {took:.1f} ms")
            print(orjson.dumps({r.container_id: r.status_json()
                                for r in results[:2]}, option=orjson.OPT_INDENT_2).decode())
            for r in failed:
                print(f"  {r.container_id}: {r.error}")
            ok = not failed
            for i in range(1, n):
                for target in (f"10.77.0.{i + 2}", f"fd77::{i + 2:x}"):
                    proc = sb.run(["ping", "-c", "1", "-W", "1", target], batch[0].netns.path, check=False)
                    print(f"  demo-0 -> {target}: {'ok' if proc.returncode == 0 else 'FAILED'}")
                    ok = ok and proc.returncode == 0
            if firewall == "nftables":
                rules = sb.run(["nft", "list", "table", "inet", "netavark"]).stdout
                print(f"nftables table inet netavark: {len(rules.splitlines())} lines")
            t0 = time.perf_counter()
            down = await engine.teardown(batch)
            print(f"tore down in {(time.perf_counter() - t0) * 1000:.1f} ms; errors: "
                  f"{[str(r.error) for r in down if r.error]}")
        left = [name for name in sb.links() if name != "lo"]
        print(f"links left in the host namespace: {left or 'none'}")
        return 0 if ok and not left and not any(r.error for r in down) else 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("-n", type=int, default=5, help="containers (default 5)")
    p.add_argument("--firewall-driver", default="nftables")
    args = p.parse_args()
    raise SystemExit(anyio.run(run, args.n, args.firewall_driver, backend="asyncio"))


if __name__ == "__main__":
    main()
