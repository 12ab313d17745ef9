#!/usr/bin/env python3
"""Time one firewall commit of N containers x P ports (netavark's layout) in a throwaway namespace.

Why: the issue's target is one atomic transaction for 1000 containers x 2 ports in <= 150 ms, and a
cost that does not grow per container the way netavark's read-per-call does. Each round runs in a
fresh sandbox "host" namespace (nothing touches the machine's real ruleset) and reports the phases of
the commit (table read, planning, apply), the rule count, a single-container commit on top of the big
table (the incremental case) and the teardown of everything in one commit.

    .venv/bin/python bench/firewall_commit.py                 # cheap default (N=200)
    .venv/bin/python bench/firewall_commit.py -n 1000 -r 5    # the target case
    .venv/bin/python bench/firewall_commit.py --backend cli   # nft -j -f - instead of libnftables

Prints one JSON document on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

from asyncnet.firewall.nftables import NftablesFirewall
from asyncnet.firewall.ruleset import NetworkFw, PortFw
from asyncnet.netns import Netns
from asyncnet.sandbox import Sandbox
from asyncnet.types import Isolation, PortMapping

NET = NetworkFw("be7c4a1d" + "0" * 56, "benchnet", "bench0", (ipaddress.ip_network("10.88.0.0/16"),),
                (ipaddress.ip_address("10.88.0.1"),), Isolation.NEVER)


def containers(n: int, ports: int, *, offset: int = 0) -> list[PortFw]:
    out = []
    for i in range(offset, offset + n):
        mappings = tuple(PortMapping("", 80 + k, 10000 + i * ports + k, 1, "tcp") for k in range(ports))
        out.append(PortFw(NET, f"{i:064x}", f"c{i}", ipaddress.IPv4Interface(f"{NET.subnets[0][2 + i]}/16"),
                          None, mappings, 53))
    return out


def rule_count(sb: Sandbox) -> int:
    out = sb.run(["nft", "-a", "list", "table", "inet", "netavark"]).stdout
    return sum(1 for line in out.splitlines() if "# handle" in line and not line.strip().startswith(("chain",
                                                                                                    "table")))


async def one_round(n: int, ports: int, backend: str | None) -> dict[str, Any]:
    with Sandbox() as sb:
        fw = NftablesFirewall(Netns(sb.host), sb.config_dir, backend=backend, rootless=True)
        ctrs = containers(n, ports)
        t0 = time.perf_counter()
        await fw.commit(setup_networks=[NET], setup_ports=ctrs)
        big = time.perf_counter() - t0
        st = fw.last_stats
        rules = rule_count(sb)
        extra = containers(1, ports, offset=n)
        t0 = time.perf_counter()
        await fw.commit(setup_networks=[NET], setup_ports=extra)
        incr = time.perf_counter() - t0
        ist = fw.last_stats
        t0 = time.perf_counter()
        await fw.commit(teardown_ports=[*ctrs, *extra], teardown_networks=[NET])
        down = time.perf_counter() - t0
        dst = fw.last_stats
        return {
            "backend": fw.backend_name,
            "commit_s": big, "read_s": st.read_s, "plan_s": st.plan_s, "apply_s": st.apply_s,
            "commands": st.commands, "rules": rules,
            "incremental_commit_s": incr, "incremental_read_s": ist.read_s, "incremental_plan_s": ist.plan_s,
            "incremental_apply_s": ist.apply_s,
            "teardown_commit_s": down, "teardown_read_s": dst.read_s, "teardown_plan_s": dst.plan_s,
            "teardown_apply_s": dst.apply_s, "teardown_commands": dst.commands,
            "transactions": fw.transactions,
        }


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [k for k, v in rounds[0].items() if isinstance(v, float)]
    out: dict[str, Any] = {}
    for k in keys:
        vals = [r[k] for r in rounds]
        out[k.replace("_s", "_ms")] = {"median": round(statistics.median(vals) * 1000, 1),
                                       "min": round(min(vals) * 1000, 1), "max": round(max(vals) * 1000, 1)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", "--containers", type=int, default=200)
    ap.add_argument("-p", "--ports", type=int, default=2)
    ap.add_argument("-r", "--rounds", type=int, default=3)
    ap.add_argument("--backend", choices=["auto", "library", "cli"], default="auto")
    ap.add_argument("--target-ms", type=float, default=150.0)
    args = ap.parse_args()
    backend = None if args.backend == "auto" else args.backend
    rounds = [asyncio.run(one_round(args.containers, args.ports, backend)) for _ in range(args.rounds)]
    summary = summarize(rounds)
    nft = subprocess.run(["nft", "--version"], capture_output=True, text=True).stdout.strip()
    result = {
        "bench": "firewall_commit",
        "containers": args.containers, "ports_per_container": args.ports, "rounds": args.rounds,
        "backend": rounds[0]["backend"], "rules": rounds[0]["rules"], "commands": rounds[0]["commands"],
        "transactions_per_round": rounds[0]["transactions"],
        "summary": summary,
        "target_ms": args.target_ms,
        "meets_target": summary["commit_ms"]["median"] <= args.target_ms,
        "per_container_us": round(summary["commit_ms"]["median"] * 1000 / max(args.containers, 1), 1),
        "env": {"python": platform.python_version(), "kernel": platform.release(), "nft": nft,
                "cpus": __import__("os").cpu_count()},
        "netavark_baseline": ("not measured: needs a netavark >= 1.9 binary with the nftables driver"),
        "raw_rounds": rounds,
    }
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
