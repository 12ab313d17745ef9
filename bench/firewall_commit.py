#!/usr/bin/env python3
"""Time one firewall commit of N containers x P ports (netavark's layout) in a throwaway namespace.

Why: the issue's target is one atomic transaction for 1000 containers x 2 ports in <= 150 ms, and a
cost per container that does not grow with the table the way netavark's read-per-call does. Each round
runs in a fresh sandbox "host" namespace (nothing touches the machine's real ruleset) and reports:

* ``commit``: the big batch (state files, table read, plan, render, apply, handle records);
* ``commit_prepared``: the same batch, in another fresh namespace, as the engine commits it: each
  container's port rules encoded and its port file rendered beforehand (``prepare``: what the engine
  spreads over its kernel phase, container by container);
* ``floor``: the same rendered batch applied by a bare libnftables call in another fresh namespace,
  i.e. what ``nft -f`` costs (parser + kernel);
* ``kernel``: the same batch as netlink bytes (:mod:`asyncnet.firewall.wire`, encoded beforehand)
  sent on a bare socket in a third fresh namespace: the kernel's own share, which no user-space
  implementation can avoid — our overhead is ``commit - kernel``;
* ``one_more``: one more container on top of the big table (the incremental case);
* ``one_less``: one container of the big batch torn down alone (podman's per-container teardown);
  with handle records on, this first one also locates every other container of the network;
* ``one_less_again``: a second one (deletes by recorded handle: reads no chain);
* ``teardown_all``: every container and the network in one commit.

    .venv/bin/python bench/firewall_commit.py                 # cheap default (N=200)
    .venv/bin/python bench/firewall_commit.py -n 1000 -r 5    # the target case
    .venv/bin/python bench/firewall_commit.py --backend cli   # nft -j -f - instead of libnftables

Prints one JSON document on stdout (times in ms: median, min, max over the rounds).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from asyncnet.firewall import wire
from asyncnet.firewall.nftables import NftablesFirewall
from asyncnet.firewall.ruleset import NetworkFw, PortFw, build_plan, render_text
from asyncnet.netns import Netns, run_in_netns_sync
from asyncnet.sandbox import Sandbox
from asyncnet.types import Isolation, PortMapping

NET = NetworkFw("be7c4a1d" + "0" * 56, "benchnet", "bench0", (ipaddress.ip_network("10.88.0.0/16"),),
                (ipaddress.ip_address("10.88.0.1"),), Isolation.NEVER)


def containers(n: int, ports: int, *, offset: int = 0, dns_port: int = 53) -> list[PortFw]:
    out = []
    for i in range(offset, offset + n):
        mappings = tuple(PortMapping("", 80 + k, 10000 + i * ports + k, 1, "tcp") for k in range(ports))
        out.append(PortFw(NET, f"{i:064x}", f"c{i}", ipaddress.IPv4Interface(f"{NET.subnets[0][2 + i]}/16"),
                          None, mappings, dns_port))
    return out


def rule_count(sb: Sandbox) -> int:
    out = sb.run(["nft", "-a", "list", "table", "inet", "netavark"]).stdout
    return sum(1 for line in out.splitlines()
               if "# handle" in line and not line.strip().startswith(("chain", "table")))


def floor_ms(sb: Sandbox, text: bytes) -> float:
    """The rendered batch through a bare libnftables context, in a fresh namespace."""
    import nftables

    ns = sb.netns(f"floor{time.monotonic_ns()}")
    fd = Netns(ns).open()
    try:
        def body() -> float:
            ctx = nftables.Nftables()
            t0 = time.perf_counter()
            rc, _out, err = ctx.cmd(text)
            took = time.perf_counter() - t0
            if rc != 0:
                raise RuntimeError(err)
            return took
        return run_in_netns_sync(fd, body)
    finally:
        os.close(fd)
        sb.remove_netns(ns)


def kernel_ms(sb: Sandbox, batch: bytes) -> float:
    """One pre-encoded batch through a bare netfilter netlink socket, in a fresh namespace."""
    import socket

    ns = sb.netns(f"kernel{time.monotonic_ns()}")
    fd = Netns(ns).open()
    try:
        def body() -> float:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)  # NETLINK_NETFILTER
            try:
                sock.setsockopt(socket.SOL_SOCKET, 32, len(batch) + 4096)  # SO_SNDBUFFORCE
                sock.bind((0, 0))
                sock.setblocking(False)
                t0 = time.perf_counter()
                sock.send(batch)
                took = time.perf_counter() - t0
                try:
                    reply = sock.recv(65536)
                except BlockingIOError:
                    reply = b""
                if reply:
                    raise RuntimeError(f"kernel answered the batch: {reply[:64].hex()}")
                return took
            finally:
                sock.close()
        return run_in_netns_sync(fd, body)
    finally:
        os.close(fd)
        sb.remove_netns(ns)


async def timed(fw: NftablesFirewall, **kwargs: Any) -> dict[str, float]:
    t0 = time.perf_counter()
    await fw.commit(**kwargs)
    st = fw.last_stats
    return {"wall": time.perf_counter() - t0, "read": st.read_s, "plan": st.plan_s, "apply": st.apply_s,
            "rules_read": st.rules_before, "commands": st.commands}


async def prepared_commit(sb: Sandbox, ctrs: list[PortFw], backend: str | None, rootless: bool,
                          handles: bool, config_base: str | None) -> tuple[dict[str, float], dict[str, float]]:
    ns = sb.netns(f"prepared{time.monotonic_ns()}")
    try:
        with tempfile.TemporaryDirectory(dir=config_base) as config:
            fw = NftablesFirewall(Netns(ns), Path(config), backend=backend, rootless=rootless,
                                  record_handles=handles)
            fw.backend_name  # noqa: B018 - load libnftables before the clock, as an engine has by then
            t0 = time.perf_counter()
            prepared = fw.preparer()
            for pf in ctrs:
                if prepared is not None:
                    prepared.add(pf)
            prepare = {"wall": time.perf_counter() - t0}
            return prepare, await timed(fw, setup_networks=[NET], setup_ports=ctrs, prepared=prepared)
    finally:
        sb.remove_netns(ns)


async def one_round(n: int, ports: int, backend: str | None, rootless: bool, dns_port: int,
                    handles: bool, config_base: str | None) -> dict[str, Any]:
    with Sandbox() as sb, tempfile.TemporaryDirectory(dir=config_base) as config:
        fw = NftablesFirewall(Netns(sb.host), Path(config), backend=backend, rootless=rootless,
                              record_handles=handles)
        ctrs = containers(n, ports, dns_port=dns_port)
        out: dict[str, Any] = {"backend": fw.backend_name}
        out["commit"] = await timed(fw, setup_networks=[NET], setup_ports=ctrs)
        out["rules"] = rule_count(sb)
        out["prepare"], out["commit_prepared"] = await prepared_commit(sb, ctrs, backend, rootless, handles,
                                                                       config_base)
        plan = build_plan(None, setup_networks=[NET], setup_ports=ctrs)
        out["floor"] = {"wall": floor_ms(sb, render_text(plan.commands).encode())}
        out["kernel"] = {"wall": kernel_ms(sb, wire.encode(plan.items).framed())}
        out["one_more"] = await timed(fw, setup_networks=[NET],
                                      setup_ports=containers(1, ports, offset=n, dns_port=dns_port))
        out["one_less"] = await timed(fw, teardown_ports=[ctrs[n // 2]])
        out["one_less_again"] = await timed(fw, teardown_ports=[ctrs[n // 3]])
        rest = [c for i, c in enumerate(ctrs) if i not in (n // 2, n // 3)] + containers(
            1, ports, offset=n, dns_port=dns_port)
        out["teardown_all"] = await timed(fw, teardown_ports=rest, teardown_networks=[NET])
        out["transactions"] = fw.transactions
        return out


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for op in ("commit", "prepare", "commit_prepared", "floor", "kernel", "one_more", "one_less", "one_less_again",
               "teardown_all"):
        out[op] = {}
        for key in rounds[0][op]:
            vals = [r[op][key] for r in rounds]
            if key in ("rules_read", "commands"):
                out[op][key] = int(statistics.median(vals))
            else:
                out[op][f"{key}_ms"] = {"median": round(statistics.median(vals) * 1000, 1),
                                        "min": round(min(vals) * 1000, 1), "max": round(max(vals) * 1000, 1)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", "--containers", type=int, default=200)
    ap.add_argument("-p", "--ports", type=int, default=2)
    ap.add_argument("-r", "--rounds", type=int, default=3)
    ap.add_argument("--backend", choices=["auto", "library", "cli"], default="auto")
    ap.add_argument("--rootless", action="store_true", help="no state files and no handle records")
    ap.add_argument("--no-handles", action="store_true", help="do not record rule handles")
    ap.add_argument("--dns-port", type=int, default=53, help="!= 53 adds netavark's DNS redirects")
    ap.add_argument("--config-base", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                    help="where the config dir (state files) lives; default tmpfs, like /run on a host")
    ap.add_argument("--target-ms", type=float, default=150.0)
    args = ap.parse_args()
    backend = None if args.backend == "auto" else args.backend
    rounds = [asyncio.run(one_round(args.containers, args.ports, backend, args.rootless, args.dns_port,
                                    not args.no_handles, args.config_base))
              for _ in range(args.rounds)]
    summary = summarize(rounds)
    nft = subprocess.run(["nft", "--version"], capture_output=True, text=True).stdout.strip()
    commit = summary["commit"]["wall_ms"]["median"]
    result = {
        "bench": "firewall_commit",
        "containers": args.containers, "ports_per_container": args.ports, "rounds": args.rounds,
        "backend": rounds[0]["backend"], "rootless": args.rootless, "dns_port": args.dns_port,
        "record_handles": not args.no_handles and not args.rootless, "config_base": args.config_base,
        "rules": rounds[0]["rules"], "transactions_per_round": rounds[0]["transactions"],
        "summary": summary,
        "target_ms": args.target_ms,
        "meets_target": commit <= args.target_ms,
        "overhead_over_kernel_ms": round(commit - summary["kernel"]["wall_ms"]["median"], 1),
        "commit_vs_nft_floor": round(commit / summary["floor"]["wall_ms"]["median"], 2),
        "per_container_us": round(commit * 1000 / max(args.containers, 1), 1),
        "env": {"python": platform.python_version(), "kernel": platform.release(), "nft": nft,
                "cpus": os.cpu_count(), "loadavg_1m": round(os.getloadavg()[0], 2)},
        "netavark_baseline": "not measured: the installed netavark (1.4.0) has no nftables driver",
    }
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
