#!/usr/bin/env python3
"""asyncnet benchmark harness: asyncnet beside a raw floor and netavark, same kernel, same run.

Run it as root from the repository, with the project's virtual environment (``pip install -e '.[bench]'``
for matplotlib; netavark needs Debian's ``iptables`` package, see below)::

    .venv/bin/python bench/run.py                    # small default: N=20, one bridge, no ports (~30 s)
    .venv/bin/python bench/run.py --n 200 --repeat 3 # issue 4: N=200, one bridge, no ports
    .venv/bin/python bench/run.py --n 100,1000 --networks 4 --ports-per-container 2 --repeat 3 \\
        --systems asyncnet,asyncnet+nft,floor,floor+nft            # issue 4: 4 bridges, 2 ports each
    .venv/bin/python bench/run.py --n 50,100,200 --systems asyncnet,floor --out /tmp/b   # a curve over N
    .venv/bin/python bench/run.py --n 200 --systems asyncnet --profile              # + cProfile dumps

Options: ``--n`` (comma list), ``--networks`` M bridges (containers spread round-robin),
``--networks-per-container`` (each container joins that many of them), ``--ports-per-container``
(tcp mappings, host ports from 20000), ``--repeat`` R, ``--stat median|min`` (how rounds are combined),
``--systems`` (comma list or ``all``; default: every available one but ``asyncnet-netavark+nft``),
``--netavark PATH`` (default /usr/lib/podman/netavark if present; ``''`` skips it), ``--netavark-fw``
(its ``NETAVARK_FW``), ``--parallel K`` (netavark-par), ``--concurrency`` (``Engine(concurrency=)``),
``--floor-parallel`` (floor's per-namespace ``ip`` processes at once, default: CPUs), ``--out DIR``
(default bench/out), ``--quiet-wait S``, ``--host-sysctl KEY=VALUE`` (experiments), ``--profile``.

Systems (each system × N × round runs in a fresh worker process on a fresh set of namespaces):

``asyncnet`` / ``asyncnet+nft``
    The library: one ``Engine.setup(batch)`` of all N containers and one ``Engine.teardown(batch)``,
    ``firewall="none"`` / ``"nftables"``, defaults otherwise (state journal on). Peak RSS is the
    worker's VmHWM (the worker imports only asyncnet). The firewall commit time is the firewall's own
    ``last_stats`` (read + plan + apply of the one transaction).
``floor`` / ``floor+nft``
    The same kernel objects made the cheapest way the tools allow: one ``ip -batch`` for the host side
    (bridges, gateway addresses, every veth created up, on its bridge, in one link group, with its peer
    directly in the container namespace and the same MAC; hairpin when there are ports), then one
    ``ip -batch`` per container namespace (lo and interfaces up, addresses, default routes;
    ``--floor-parallel`` processes at once), plus for ``+nft`` one ``nft -f`` of exactly the ruleset
    asyncnet commits (rendered to nft text beforehand in a scratch namespace, untimed). Teardown: one
    ``ip -batch`` with ``link del group G`` and the bridge deletes (and one ``nft delete table``).
    The floor writes no sysctls (asyncnet writes 4 per container) and pays a process per container.
``netavark`` / ``netavark-par``
    The binary, one process per container as podman calls it (``nsenter --net=HOST netavark --config
    DIR setup|teardown NETNS``, JSON on stdin), sequentially and ``--parallel`` at once (in parallel
    the first setup and the last teardown on each network run alone: netavark cannot create or remove
    a network's chains concurrently, and podman serialises it anyway). netavark 1.4.0 (Debian 12) has
    no ``none`` or nftables driver: it uses iptables (iptables-nft), so ``iptables`` must be installed,
    and it is compared with ``floor+nft`` when that ran. The driver it used is printed.
``asyncnet-netavark`` / ``asyncnet-netavark+nft``
    asyncnet's netavark-compatible CLI, one process per container, sequentially: the per-process cost.

Table: setup and teardown ms per container and total; p50/p95 of per-container setup latencies: where
each container has its own timing, its own (the process-per-container systems; the floor's per-namespace
batches), and for asyncnet's batch the time from the batch's start until the container's progress
callback (its own kernel work done; the batch's firewall commit follows the last one);
the firewall commit; the ratio to the floor with the same firewall from the same run (the headline);
peak RSS (in-process: the worker's VmHWM; process systems: the largest child); CPU ms per container
(user+sys of the worker and its children — far less sensitive to other load on the machine than wall
time, but blind to waiting and to deferred kernel work). Then the issue-4 targets, checked. With
``--repeat R`` the median (or ``--stat min``) of the rounds; every round is in the JSON. Each round
first waits (``--quiet-wait``) for idle CPUs and records how idle they were; rounds that start busy are
flagged, as the numbers are then noisy.

Verification, before teardown is timed: every host veth is there; on a sample (``--verify-sample``) the
addresses are on the container interfaces and each gateway answers a ping (a lost first ping is retried
twice and reported as ``first_ping_lost``: right after a big batch, the flood of IPv6 router
solicitations/MLD reports from the new interfaces can overflow the per-CPU backlog and drop a packet);
with ports and a firewall, the DNAT rules are there. After teardown no veth and no bridge may remain.
Any failure is printed loudly and the exit status is 1 (130 when interrupted).

Isolation and cleanup: a worker runs under ``unshare -m --propagation private`` and mounts a tmpfs on its
scratch directory and on ``/run`` (iptables' lock file and every namespace bind mount live and die with
it). Namespaces are files (``asyncnet.sandbox.Sandbox``), never ``/run/netns`` names (``ip link …
netns PATH`` takes a path), so nothing shows in the machine's ``ip netns list``, ``ip link`` or ruleset;
the sandbox is closed in ``finally``, SIGINT/SIGTERM/SIGHUP are forwarded to the worker, and even a
SIGKILL leaves nothing, since the mount namespace holding the namespace files goes with the worker.
The only traffic is pings to the sandboxes' own gateways.

Output: the table on stdout; ``--out DIR`` gets ``bench-<stamp>.json`` (parameters, environment, the
summary and every round) and ``bench-<stamp>.png`` (setup and teardown ms per container against N per
system; bars for a single N). ``--profile`` writes cProfile dumps of the asyncnet rounds (``.prof`` and
a text summary) next to them; profiled timings are inflated and flagged in the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_NETAVARK = "/usr/lib/podman/netavark"
DEFAULT_OUT = HERE / "out"
ALL_SYSTEMS = ("asyncnet", "asyncnet+nft", "floor", "floor+nft", "netavark", "netavark-par",
               "asyncnet-netavark", "asyncnet-netavark+nft")
DEFAULT_SYSTEMS = tuple(s for s in ALL_SYSTEMS if s != "asyncnet-netavark+nft")  # keeps the default run short
WORKER_TIMEOUT_S = 3600.0


class BenchError(Exception):
    """A round did not produce what it should have (setup errors, verification, leftovers)."""


# ================================================================================================
# the workload: N containers over M bridge networks, netavark JSON, deterministic


@dataclasses.dataclass(frozen=True)
class Net:
    index: int
    metric: int | None  # an explicit metric when containers join several networks (distinct defaults)

    @property
    def name(self) -> str:
        return f"bench{self.index}"

    @property
    def id(self) -> str:
        return hashlib.sha256(f"asyncnet-bench-net-{self.index}".encode()).hexdigest()

    @property
    def bridge(self) -> str:
        return f"abench{self.index}"

    @property
    def prefix(self) -> str:
        return f"10.{100 + self.index}"

    @property
    def gateway(self) -> str:
        return f"{self.prefix}.0.1"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "id": self.id, "driver": "bridge", "network_interface": self.bridge,
            "created": "2026-01-01T00:00:00Z",
            "subnets": [{"subnet": f"{self.prefix}.0.0/16", "gateway": self.gateway}],
            "ipv6_enabled": False, "internal": False, "dns_enabled": False,
            "options": {"metric": str(self.metric)} if self.metric is not None else {},
            "ipam_options": {"driver": "host-local"},
        }


@dataclasses.dataclass(frozen=True)
class Att:
    net: Net
    ifname: str
    ip: str
    mac: str
    floor_veth: str  # the floor's host-side name (asyncnet/netavark choose their own)


@dataclasses.dataclass(frozen=True)
class Ctr:
    index: int
    atts: tuple[Att, ...]
    ports: tuple[tuple[int, int], ...]  # (host_port, container_port), tcp

    @property
    def id(self) -> str:
        return hashlib.sha256(f"asyncnet-bench-ctr-{self.index}".encode()).hexdigest()

    @property
    def ns_name(self) -> str:
        return f"c{self.index}"

    def options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {
            "container_id": self.id, "container_name": f"bench-{self.index}",
            "networks": {a.net.name: {"interface_name": a.ifname, "static_ips": [a.ip], "static_mac": a.mac}
                         for a in self.atts},
            "network_info": {a.net.name: a.net.to_json() for a in self.atts},
        }
        if self.ports:
            opts["port_mappings"] = [{"host_ip": "", "container_port": cp, "host_port": hp, "range": 1,
                                      "protocol": "tcp"} for hp, cp in self.ports]
        return opts


def workload(n: int, networks: int, per_ctr: int, ports: int) -> tuple[list[Net], list[Ctr]]:
    if not 1 <= per_ctr <= networks:
        raise SystemExit("--networks-per-container must be between 1 and --networks")
    if networks > 150:
        raise SystemExit("--networks: at most 150")
    if 20000 + n * ports > 65535:
        raise SystemExit("too many host ports: N x ports-per-container must stay below 45536")
    nets = [Net(i, 100 + i if per_ctr > 1 else None) for i in range(networks)]
    used = [0] * networks
    ctrs: list[Ctr] = []
    for g in range(n):
        atts = []
        for k in range(per_ctr):
            net = nets[(g + k) % networks]
            used[net.index] += 1
            host = used[net.index] + 1
            if host > 65533:
                raise SystemExit("more than 65533 containers on one /16 network")
            atts.append(Att(net, f"eth{k}", f"{net.prefix}.{host >> 8}.{host & 255}",
                            f"02:42:{net.index:02x}:{(g >> 16) & 255:02x}:{(g >> 8) & 255:02x}:{g & 255:02x}",
                            f"vf{g:06d}x{k}"))
        ctrs.append(Ctr(g, tuple(atts), tuple((20000 + g * ports + p, 8000 + p) for p in range(ports))))
    return nets, ctrs


# ================================================================================================
# small helpers shared by the workers


def vmhwm_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def children_maxrss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss


def pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


class Clock:
    """Wall time and CPU time (this process, all threads, plus children reaped meanwhile) of a block.

    The CPU time includes the kernel work done in the calling context (a netlink request runs its
    handler in the sender's syscall), so it is much less sensitive to other load than the wall time —
    but it does not see deferred kernel work (RCU callbacks, workqueues) nor time spent waiting.
    """

    wall: float = 0.0
    cpu: float = 0.0

    @staticmethod
    def _cpu() -> float:
        me = resource.getrusage(resource.RUSAGE_SELF)
        ch = resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + ch.ru_utime + ch.ru_stime

    def __enter__(self) -> Clock:
        self._w, self._c = time.perf_counter(), self._cpu()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._w
        self.cpu = self._cpu() - self._c


_children: set[subprocess.Popen[bytes]] = set()


def run(cmd: Sequence[str], *, input: bytes | None = None, check: bool = True, timeout: float = 120,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """subprocess.run that the worker can kill on a signal (it tracks what is in flight)."""
    proc = subprocess.Popen(list(cmd), stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, **env} if env else None)
    _children.add(proc)
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        _children.discard(proc)
    res = subprocess.CompletedProcess(list(cmd), proc.returncode, out, err)
    if check and proc.returncode != 0:
        raise BenchError(f"{' '.join(cmd[:6])}… exited {proc.returncode}: "
                         f"{(err or out).decode(errors='replace').strip()[:500]}")
    return res


def ns_run(ns: str, cmd: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[bytes]:
    return run(["nsenter", f"--net={ns}", *cmd], **kw)


def timed_map(fn: Callable[[int], None], items: Sequence[int], parallel: int, *, solo_first: int = 0,
              solo_last: int = 0) -> tuple[float, list[float]]:
    """Run fn over items (at most ``parallel`` at once); return (wall seconds, per-item seconds).

    ``solo_first``/``solo_last``: run that many first/last items one by one, before/after the parallel part.
    """
    lat = [0.0] * len(items)

    def one(i: int) -> None:
        t = time.perf_counter()
        fn(items[i])
        lat[i] = time.perf_counter() - t

    n = len(items)
    head = range(min(solo_first, n))
    tail = range(max(len(head), n - solo_last), n)
    middle = range(len(head), tail.start)
    t0 = time.perf_counter()
    for i in head:
        one(i)
    if parallel <= 1:
        for i in middle:
            one(i)
    else:
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            futures = [pool.submit(one, i) for i in middle]
            try:
                for f in futures:
                    f.result()
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)  # fail fast: start nothing more
                raise
    for i in tail:
        one(i)
    return time.perf_counter() - t0, lat


# ================================================================================================
# verification (before teardown is timed) and leftovers (after)


def host_links(host: str, kind: str) -> list[str]:
    out = ns_run(host, ["ip", "-o", "link", "show", "type", kind]).stdout.decode()
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if line.strip()]


_DNAT = re.compile(r"\bdnat (ip6? )?to\b|xt target \"?DNAT")


def dnat_rules(host: str) -> int:
    """DNAT statements in the host ruleset (nftables native, or iptables-nft's translation)."""
    out = ns_run(host, ["nft", "list", "ruleset"]).stdout.decode()
    return sum(1 for line in out.splitlines() if _DNAT.search(line))


def diagnose(host: str, ns: str, a: Att) -> str:
    """What the kernel says about a container interface, its host peer and the bridge (for failures)."""
    parts = []
    try:
        link = json.loads(ns_run(ns, ["ip", "-j", "-d", "link", "show", a.ifname]).stdout)[0]
        parts.append(f"ctr {a.ifname}: flags={link.get('flags')} state={link.get('operstate')} "
                     f"qdisc={link.get('qdisc')} "
                     f"mac={link.get('address')} peer_ifindex={link.get('link_index')}")
        parts.append("ctr routes: " + ns_run(ns, ["ip", "-4", "route"]).stdout.decode().strip().replace("\n", " | "))
        parts.append("ctr neigh: " + ns_run(ns, ["ip", "neigh"]).stdout.decode().strip().replace("\n", " | "))
        peer = json.loads(ns_run(host, ["ip", "-j", "-d", "link", "show"]).stdout)
        mine = [p for p in peer if p.get("ifindex") == link.get("link_index")]
        for p in mine:
            info = p.get("linkinfo", {}).get("info_slave_data", {})
            parts.append(f"host peer {p.get('ifname')}: flags={p.get('flags')} state={p.get('operstate')} "
                         f"qdisc={p.get('qdisc')} "
                         f"master={p.get('master')} brport_state={info.get('state')} "
                         f"group={p.get('group')}")
        br = [p for p in peer if p.get("ifname") == a.net.bridge]
        parts.append(f"bridge {a.net.bridge}: " + (f"flags={br[0].get('flags')} state={br[0].get('operstate')}"
                                                   if br else "MISSING"))
    except (BenchError, ValueError, IndexError, KeyError) as exc:
        parts.append(f"(diagnosis failed: {exc})")
    return "; ".join(parts)


def verify_setup(host: str, ctrs: list[Ctr], paths: list[str], *, sample: int, seed: int,
                 expect_ports: bool) -> dict[str, Any]:
    veths = host_links(host, "veth")
    want = sum(len(c.atts) for c in ctrs)
    if len(veths) != want:
        raise BenchError(f"verify: {len(veths)} host veths, expected {want}")
    rng = random.Random(seed)
    picks = sorted({0, len(ctrs) // 2, len(ctrs) - 1} | set(rng.sample(range(len(ctrs)), min(sample, len(ctrs)))))
    pinged = 0
    first_lost: list[str] = []  # answered only on a retry
    first_ping_s: list[float] = []
    for g in picks:
        c = ctrs[g]
        addrs = json.loads(ns_run(paths[g], ["ip", "-j", "-4", "addr", "show"]).stdout or b"[]")
        have = {(i["ifname"], f"{a['local']}/{a['prefixlen']}") for i in addrs for a in i.get("addr_info", [])}
        for a in c.atts:
            if (a.ifname, f"{a.ip}/16") not in have:
                raise BenchError(f"verify: container {g}: {a.ip}/16 not on {a.ifname} (has {sorted(have)})")
            qdisc = json.loads(ns_run(paths[g], ["ip", "-j", "link", "show", a.ifname]).stdout)[0].get("qdisc")
            ping = ["ping", "-n", "-q", "-c", "1", "-W", "2", "-I", a.ifname, a.net.gateway]
            for attempt in range(3):
                t = time.perf_counter()
                ok = ns_run(paths[g], ping, check=False).returncode == 0
                if attempt == 0:
                    first_ping_s.append(time.perf_counter() - t)
                if ok:
                    break
                if attempt == 0:
                    first_lost.append(f"container {g} {a.ifname} (qdisc {qdisc} before the ping; after: "
                                      f"{diagnose(host, paths[g], a)})")
            else:
                raise BenchError(f"verify: container {g} cannot ping its gateway {a.net.gateway} on {a.ifname} "
                                 f"(3 tries); {diagnose(host, paths[g], a)}")
            pinged += 1
    out: dict[str, Any] = {"host_veths": len(veths), "sampled": picks, "pings_ok": pinged,
                           "first_ping_lost": first_lost, "first_ping_max_s": max(first_ping_s, default=0.0)}
    if expect_ports:
        want_dnat = sum(len(c.ports) * len(c.atts) for c in ctrs)
        got = dnat_rules(host)
        if got < want_dnat:
            raise BenchError(f"verify: {got} DNAT rules in the host ruleset, expected at least {want_dnat}")
        out["dnat_rules"] = got
    return out


def verify_clean(host: str) -> None:
    left = host_links(host, "veth") + host_links(host, "bridge")
    if left:
        raise BenchError(f"teardown left {len(left)} links in the host namespace: {left[:5]}…")


# ================================================================================================
# the systems (each runs inside a worker process)


@dataclasses.dataclass
class Ctx:
    spec: dict[str, Any]
    host: str
    config_dir: str
    nets: list[Net]
    ctrs: list[Ctr]
    paths: list[str]
    scratch: Callable[[str], str]  # make another namespace in the sandbox (untimed helpers)

    @property
    def expect_ports(self) -> bool:
        return self.spec["fw"] != "none" and self.spec["ports"] > 0

    def verify(self) -> dict[str, Any]:
        return verify_setup(self.host, self.ctrs, self.paths, sample=self.spec["verify_sample"],
                            seed=self.spec["seed"], expect_ports=self.expect_ports)


def _profile_path(ctx: Ctx, phase: str) -> Path | None:
    d = ctx.spec.get("profile_dir")
    if not d:
        return None
    return Path(d) / f"profile-{ctx.spec['system']}-n{ctx.spec['n']}-r{ctx.spec['round']}-{phase}"


def system_asyncnet(ctx: Ctx) -> dict[str, Any]:
    import anyio

    from asyncnet.engine import Container, Engine
    from asyncnet.types import parse_network_options

    fw = ctx.spec["fw"]
    out: dict[str, Any] = {}

    async def main() -> None:
        t0 = time.perf_counter()
        batch = [Container.of(p, parse_network_options(c.options())) for c, p in zip(ctx.ctrs, ctx.paths,
                                                                                      strict=True)]
        out["parse_s"] = time.perf_counter() - t0
        async with Engine(config_dir=ctx.config_dir, host_netns=ctx.host, firewall=fw,
                          concurrency=ctx.spec["concurrency"]) as engine:
            out["rss_before_setup_kb"] = vmhwm_kb()
            done_at: list[float] = []
            with _maybe_profile(_profile_path(ctx, "setup")), Clock() as clock:
                t0 = time.perf_counter()
                results = await engine.setup(batch, progress=lambda _r: done_at.append(time.perf_counter()))
            out["setup_s"], out["setup_cpu_s"] = clock.wall, clock.cpu
            # a batch's per-container latency: when each container was done, from the batch's start
            out["setup_lat_s"] = [t - t0 for t in done_at]
            out["host_requests_setup"] = engine.host.requests
            errors = [f"{r.container_id[:12]}: {r.error}" for r in results if r.error is not None]
            if errors:
                raise BenchError(f"asyncnet setup: {len(errors)} containers failed, e.g. {errors[:3]}")
            if fw != "none":
                out["fw_setup"] = dataclasses.asdict(engine.firewall.last_stats)
                out["fw_commit_s"] = engine.firewall.last_stats.total_s
                out["fw_backend"] = getattr(engine.firewall, "backend_name", None)
            out["verify"] = ctx.verify()
            requests = engine.host.requests
            with _maybe_profile(_profile_path(ctx, "teardown")), Clock() as clock:
                down = await engine.teardown(batch)
            out["teardown_s"], out["teardown_cpu_s"] = clock.wall, clock.cpu
            out["host_requests_teardown"] = engine.host.requests - requests
            errors = [f"{r.container_id[:12]}: {r.error}" for r in down if r.error is not None]
            if errors:
                raise BenchError(f"asyncnet teardown: {len(errors)} containers failed, e.g. {errors[:3]}")
            if fw != "none":
                out["fw_teardown"] = dataclasses.asdict(engine.firewall.last_stats)
        out["rss_kb"] = vmhwm_kb()
        out["rss_kind"] = "worker VmHWM (the asyncnet process)"

    anyio.run(main, backend="asyncio")
    verify_clean(ctx.host)
    return out


@contextlib.contextmanager
def _maybe_profile(path: Path | None) -> Iterator[None]:
    if path is None:
        yield
        return
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    try:
        yield
    finally:
        prof.disable()
        prof.dump_stats(str(path) + ".prof")
        buf = io.StringIO()
        st = pstats.Stats(prof, stream=buf)
        st.sort_stats("tottime").print_stats(40)
        st.sort_stats("cumulative").print_stats(60)
        path.with_name(path.name + ".txt").write_text(buf.getvalue())


def _floor_ruleset(ctx: Ctx) -> str:
    """The ruleset asyncnet commits for this workload, as nft text (made in a scratch namespace)."""
    import anyio

    from asyncnet.firewall.nftables import NftablesFirewall
    from asyncnet.netns import Netns
    from asyncnet.plan import network_fw, plan_container, port_fw
    from asyncnet.types import parse_network_options

    scratch = ctx.scratch("fwscratch")
    nets: dict[str, Any] = {}
    ports = []
    for c in ctx.ctrs:
        opts = parse_network_options(c.options())
        for a in plan_container(opts):
            nets.setdefault(a.network.id, network_fw(a.network))
            ports.append(port_fw(opts, a, 53))
    cfg = Path(ctx.config_dir) / "fwscratch"
    cfg.mkdir()
    fw = NftablesFirewall(Netns(scratch), cfg, rootless=True)
    anyio.run(lambda: fw.commit(setup_networks=list(nets.values()), setup_ports=ports), backend="asyncio")
    return ns_run(scratch, ["nft", "list", "table", "inet", "netavark"]).stdout.decode()


def system_floor(ctx: Ctx) -> dict[str, Any]:
    fw = ctx.spec["fw"] != "none"
    d = Path(ctx.config_dir)
    group = 4242
    host_lines: list[str] = []
    for net in ctx.nets:
        host_lines += [f"link add {net.bridge} type bridge", f"link set {net.bridge} up",
                       f"addr add {net.gateway}/16 dev {net.bridge}"]
    for c, path in zip(ctx.ctrs, ctx.paths, strict=True):
        for a in c.atts:
            host_lines.append(f"link add {a.floor_veth} group {group} up master {a.net.bridge} type veth "
                              f"peer name {a.ifname} address {a.mac} netns {path}")
            if c.ports:
                host_lines.append(f"link set dev {a.floor_veth} type bridge_slave hairpin on")
    (d / "host.batch").write_text("\n".join(host_lines) + "\n")
    for c in ctx.ctrs:
        lines = ["link set lo up"]
        for a in c.atts:
            lines += [f"link set {a.ifname} up", f"addr add {a.ip}/16 dev {a.ifname}",
                      f"route add default via {a.net.gateway} dev {a.ifname} metric {a.net.metric or 100}"]
        (d / f"{c.ns_name}.batch").write_text("\n".join(lines) + "\n")
    down = [f"link del group {group}"] + [f"link del {net.bridge}" for net in ctx.nets]
    (d / "down.batch").write_text("\n".join(down) + "\n")
    out: dict[str, Any] = {}
    if fw:
        t = time.perf_counter()
        (d / "rules.nft").write_text(_floor_ruleset(ctx))
        out["ruleset_prepare_s"] = time.perf_counter() - t

    def ctr_batch(g: int) -> None:
        ns_run(ctx.paths[g], ["ip", "-batch", str(d / f"{ctx.ctrs[g].ns_name}.batch")])

    with Clock() as clock:
        t0 = time.perf_counter()
        ns_run(ctx.host, ["ip", "-batch", str(d / "host.batch")])
        t_host = time.perf_counter()
        _, lat = timed_map(ctr_batch, range(len(ctx.ctrs)), ctx.spec["floor_parallel"])
        t_ctr = time.perf_counter()
        if fw:
            ns_run(ctx.host, ["nft", "-f", str(d / "rules.nft")])
        t1 = time.perf_counter()
    out.update(setup_s=clock.wall, setup_cpu_s=clock.cpu, setup_host_batch_s=t_host - t0,
               setup_ctr_batches_s=t_ctr - t_host, setup_lat_s=lat)
    if fw:
        out["fw_commit_s"] = t1 - t_ctr
    out["verify"] = ctx.verify()
    with Clock() as clock:
        ns_run(ctx.host, ["ip", "-batch", str(d / "down.batch")])
        if fw:
            ns_run(ctx.host, ["nft", "delete", "table", "inet", "netavark"])
    out["teardown_s"], out["teardown_cpu_s"] = clock.wall, clock.cpu
    verify_clean(ctx.host)
    out["rss_kb"] = children_maxrss_kb()
    out["rss_kind"] = "largest child (ip/nft)"
    return out


def _proc_system(ctx: Ctx, cmd: list[str], env: dict[str, str], parallel: int) -> dict[str, Any]:
    """One process per container. In parallel, the first setup and the last teardown on each network run
    alone: they create/remove the bridge and the network's firewall chains, which netavark cannot do
    concurrently ("Chain already exists") — podman serialises every call under one lock anyway."""
    payloads = [json.dumps(c.options()).encode() for c in ctx.ctrs]
    out: dict[str, Any] = {}

    def call(action: str, g: int) -> bytes:
        full = ["nsenter", f"--net={ctx.host}", *cmd, "--config", ctx.config_dir, action, ctx.paths[g]]
        r = run(full, input=payloads[g], check=False, env=env)
        if r.returncode != 0:
            raise BenchError(f"{cmd[0]} {action} container {g} exited {r.returncode}: "
                             f"{(r.stdout + r.stderr).decode(errors='replace').strip()[:400]}")
        return r.stderr

    def setup(g: int) -> None:
        call("setup", g)

    def teardown(g: int) -> None:
        call("teardown", g)

    solo = len(ctx.nets) if parallel > 1 else 0  # containers 0..M-1 are the first on each network
    with Clock() as clock:
        _, lat = timed_map(setup, range(len(ctx.ctrs)), parallel, solo_first=solo)
    out.update(setup_s=clock.wall, setup_cpu_s=clock.cpu, setup_lat_s=lat)
    out["verify"] = ctx.verify()
    with Clock() as clock:
        _, lat = timed_map(teardown, range(len(ctx.ctrs)), parallel, solo_last=solo)
    out.update(teardown_s=clock.wall, teardown_cpu_s=clock.cpu, teardown_lat_s=lat)
    verify_clean(ctx.host)
    out["rss_kb"] = children_maxrss_kb()
    out["rss_kind"] = "largest child process"
    # which firewall driver did it use? One more untimed call with info logging, on a scratch namespace
    probe_ns = ctx.scratch("probe")
    for action in ("setup", "teardown"):
        r = run(["nsenter", f"--net={ctx.host}", *cmd, "--config", ctx.config_dir, action, probe_ns],
                input=payloads[0], check=False, env={**env, "RUST_LOG": "info"})
        if action == "setup":
            log = r.stderr.decode(errors="replace")
            out["firewall_driver_log"] = next(
                (line.strip() for line in log.splitlines() if "firewall" in line.lower()), log.strip()[:200] or None)
    return out


def system_netavark(ctx: Ctx) -> dict[str, Any]:
    binary = ctx.spec["netavark"]
    env = {"NETAVARK_FW": ctx.spec["netavark_fw"]} if ctx.spec.get("netavark_fw") else {}
    parallel = ctx.spec["parallel"] if ctx.spec["system"] == "netavark-par" else 1
    out = _proc_system(ctx, [binary], env, parallel)
    out["parallel"] = parallel
    return out


def system_asyncnet_netavark(ctx: Ctx) -> dict[str, Any]:
    exe = Path(sys.executable).parent / "asyncnet-netavark"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "asyncnet.cli.netavark"]
    cmd += ["--firewall-driver", ctx.spec["fw"]]
    return _proc_system(ctx, cmd, {}, 1)


def system_kind(system: str) -> tuple[Callable[[Ctx], dict[str, Any]], str]:
    """(runner, firewall) for a system name."""
    fw = "nftables" if system.endswith("+nft") else "none"
    base = system.removesuffix("+nft")
    runners: dict[str, Callable[[Ctx], dict[str, Any]]] = {
        "asyncnet": system_asyncnet, "floor": system_floor, "netavark": system_netavark,
        "netavark-par": system_netavark, "asyncnet-netavark": system_asyncnet_netavark,
    }
    if base not in runners:
        raise SystemExit(f"unknown system {system!r} (known: {', '.join(ALL_SYSTEMS)})")
    return runners[base], ("netavark" if base.startswith("netavark") else fw)


# ================================================================================================
# the worker process: unshare -m --propagation private python bench/run.py --worker SPEC RESULT


def mount_ns() -> str:
    return os.readlink("/proc/self/ns/mnt")


def _raise_exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def worker_main(spec_path: str, result_path: str) -> int:
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _raise_exit)
    spec = json.loads(Path(spec_path).read_text())
    result: dict[str, Any] = {"spec": spec}
    if mount_ns() == spec["parent_mount_ns"]:  # never mount anything in the caller's mount namespace
        result.update(ok=False, error="worker must run in a private mount namespace (unshare -m)")
        Path(result_path).write_text(json.dumps(result))
        return 1
    root = Path(spec["root"])
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0700", "asyncnet-bench", str(root)], check=True)
    # /run private too: iptables' xtables.lock and anything else a tool drops there dies with us
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "asyncnet-bench-run", "/run"], check=True)
    for sub in ("lock", "netns"):
        os.makedirs(f"/run/{sub}", exist_ok=True)

    from asyncnet.sandbox import Sandbox

    sb: Sandbox | None = None
    try:
        sb = Sandbox(root / "sb")
        box = sb
        for kv in spec.get("host_sysctls", []):  # experiments only (--host-sysctl)
            key, _, value = kv.partition("=")
            box.run(["sysctl", "-q", "-w", f"{key.strip()}={value.strip()}"])
        nets, ctrs = workload(spec["n"], spec["networks"], spec["per_ctr"], spec["ports"])
        t0 = time.perf_counter()
        paths = [box.netns(c.ns_name) for c in ctrs]
        result["netns_create_s"] = time.perf_counter() - t0
        runner, _ = system_kind(spec["system"])
        ctx = Ctx(spec, box.host, str(box.config_dir), nets, ctrs, paths, box.netns)
        result.update(runner(ctx))
        result["ok"] = True
    except BaseException as exc:  # noqa: BLE001 - reported to the orchestrator, which fails loudly
        result["ok"] = False
        result["error"] = f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, BenchError | SystemExit | KeyboardInterrupt):
            result["traceback"] = traceback.format_exc()
    finally:
        for proc in list(_children):
            with contextlib.suppress(OSError):
                proc.kill()
        if sb is not None:
            t0 = time.perf_counter()
            sb.close()
            result["sandbox_close_s"] = time.perf_counter() - t0
        result.setdefault("worker_vmhwm_kb", vmhwm_kb())
        Path(result_path).write_text(json.dumps(result))
    return 0 if result.get("ok") else 1


# ================================================================================================
# the orchestrator


_current: subprocess.Popen[bytes] | None = None


def _forward(signum: int, _frame: object) -> None:
    if _current is not None and _current.poll() is None:
        with contextlib.suppress(OSError):
            _current.send_signal(signal.SIGTERM)
    raise KeyboardInterrupt


def wait_quiet(max_s: float, idle: float = 0.85) -> tuple[float, float]:
    """Namespaces die asynchronously in the kernel (cleanup_net): wait until the CPUs are idle again so
    one round's teardown does not bill the next one."""

    def snap() -> tuple[int, int]:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        return vals[3] + vals[4], sum(vals)

    t0 = time.monotonic()
    frac = 0.0
    while time.monotonic() - t0 < max_s:
        i0, s0 = snap()
        time.sleep(0.25)
        i1, s1 = snap()
        frac = (i1 - i0) / (s1 - s0) if s1 > s0 else 1.0
        if frac >= idle:
            break
    return time.monotonic() - t0, frac


def run_worker(spec: dict[str, Any], keep: Path) -> dict[str, Any]:
    global _current
    root = Path(tempfile.mkdtemp(prefix="asyncnet-bench-"))
    spec = {**spec, "root": str(root), "parent_mount_ns": mount_ns()}
    spec_file = keep / "spec.json"
    result_file = keep / "result.json"
    result_file.unlink(missing_ok=True)
    spec_file.write_text(json.dumps(spec))
    cmd = ["unshare", "-m", "--propagation", "private", sys.executable, str(Path(__file__).resolve()),
           "--worker", str(spec_file), str(result_file)]
    try:
        _current = subprocess.Popen(cmd, start_new_session=True)
        try:
            _current.wait(timeout=WORKER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _current.terminate()
            try:
                _current.wait(timeout=30)
            except subprocess.TimeoutExpired:
                _current.kill()
                _current.wait()
    except BaseException:
        if _current is not None and _current.poll() is None:
            _current.terminate()
            try:
                _current.wait(timeout=60)
            except subprocess.TimeoutExpired:
                _current.kill()
                _current.wait()
        raise
    finally:
        _current = None
        with contextlib.suppress(OSError):
            root.rmdir()  # the tmpfs was the worker's own; what is left here is the empty mount point
    if not result_file.exists():
        return {"spec": spec, "ok": False, "error": "worker died without a result"}
    return json.loads(result_file.read_text())


def available_systems(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The systems to run, and why any asked-for one is skipped."""
    skipped: dict[str, str] = {}
    if args.systems == "all":
        wanted = list(ALL_SYSTEMS)
    else:
        wanted = [s.strip() for s in args.systems.split(",")] if args.systems else list(DEFAULT_SYSTEMS)
    for s in wanted:
        system_kind(s)  # validates the name
    fw_ok, why = nftables_usable()
    out = []
    for s in wanted:
        if s.endswith("+nft") and not fw_ok:
            skipped[s] = f"nftables firewall not usable: {why}"
        elif s.startswith("netavark") and not args.netavark:
            skipped[s] = "no netavark binary (--netavark)"
        elif s.startswith("netavark") and not args.netavark_fw and netavark_default_fw(args.netavark) == "iptables" \
                and shutil.which("iptables") is None:
            skipped[s] = "netavark's firewall is iptables here and `iptables` is not installed"
        elif s.startswith("netavark") and not os.access(args.netavark, os.X_OK):
            skipped[s] = f"{args.netavark} is not executable"
        else:
            out.append(s)
    return out, skipped


def nftables_usable() -> tuple[bool, str]:
    if shutil.which("nft") is None:
        return False, "no nft binary"
    try:
        from asyncnet.engine import Engine  # noqa: F401
        from asyncnet.firewall.nftables import NftablesFirewall  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


def netavark_default_fw(binary: str) -> str:
    """netavark < 1.9 has no nftables driver and no `none`: its default is iptables (or firewalld)."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
        major, minor = (int(x) for x in out.split()[1].split(".")[:2])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return "unknown"
    return "iptables" if (major, minor) < (1, 9) else "nftables"


def floor_of(system: str, present: Sequence[str] = ()) -> str | None:
    """The floor a system is compared with: same firewall (netavark always has one: floor+nft if run)."""
    if system.startswith("floor"):
        return None
    if system.startswith("netavark"):
        return "floor+nft" if "floor+nft" in present else "floor"
    return "floor+nft" if system.endswith("+nft") else "floor"


def summarize(rounds: list[dict[str, Any]], systems: list[str], ns: list[int],
              stat: str = "median") -> list[dict[str, Any]]:
    rows = []
    for n in ns:
        by_sys: dict[str, dict[str, Any]] = {}
        for s in systems:
            rs = [r for r in rounds if r["spec"]["system"] == s and r["spec"]["n"] == n]
            ok = [r for r in rs if r.get("ok")]
            row: dict[str, Any] = {"system": s, "n": n, "rounds": len(rs), "failed": len(rs) - len(ok)}
            if ok:
                med = min if stat == "min" else statistics.median
                row["setup_ms"] = med(r["setup_s"] for r in ok) * 1000
                row["teardown_ms"] = med(r["teardown_s"] for r in ok) * 1000
                row["setup_ms_per_ctr"] = row["setup_ms"] / n
                row["teardown_ms_per_ctr"] = row["teardown_ms"] / n
                row["setup_cpu_ms_per_ctr"] = med(r["setup_cpu_s"] for r in ok) * 1000 / n
                row["teardown_cpu_ms_per_ctr"] = med(r["teardown_cpu_s"] for r in ok) * 1000 / n
                row["cpu_idle_before"] = min(r.get("cpu_idle_before", 1.0) for r in ok)
                lats = [x for r in ok for x in r.get("setup_lat_s", [])]
                row["setup_p50_ms"] = (pct(lats, 0.5) or 0) * 1000 if lats else None
                row["setup_p95_ms"] = (pct(lats, 0.95) or 0) * 1000 if lats else None
                tl = [x for r in ok for x in r.get("teardown_lat_s", [])]
                row["teardown_p50_ms"] = (pct(tl, 0.5) or 0) * 1000 if tl else None
                row["teardown_p95_ms"] = (pct(tl, 0.95) or 0) * 1000 if tl else None
                row["rss_mb"] = max(r.get("rss_kb", 0) for r in ok) / 1024
                fwc = [r["fw_commit_s"] for r in ok if "fw_commit_s" in r]
                row["fw_commit_ms"] = med(fwc) * 1000 if fwc else None
                fwd = [r["fw_teardown"]["total_s"] for r in ok if "fw_teardown" in r]
                row["fw_teardown_ms"] = med(fwd) * 1000 if fwd else None
                drv = next((r.get("firewall_driver_log") for r in ok if r.get("firewall_driver_log")), None)
                if drv:
                    row["firewall_driver"] = drv
            else:
                row["error"] = next((r.get("error") for r in rs if r.get("error")), "no rounds")
            by_sys[s] = row
        for s, row in by_sys.items():
            f = floor_of(s, list(by_sys))
            base = by_sys.get(f) if f else None
            if base and "setup_ms" in row and "setup_ms" in base:
                row["setup_vs_floor"] = row["setup_ms"] / base["setup_ms"]
                row["teardown_vs_floor"] = row["teardown_ms"] / base["teardown_ms"]
                row["setup_cpu_vs_floor"] = row["setup_cpu_ms_per_ctr"] / base["setup_cpu_ms_per_ctr"]
                row["floor"] = f
            if s.startswith("netavark") and "setup_ms" in row:
                for name in ("asyncnet", "asyncnet+nft"):
                    ref = by_sys.get(name)
                    if ref and "setup_ms" in ref:
                        row[f"setup_x_{name}"] = row["setup_ms"] / ref["setup_ms"]
            rows.append(row)
    return rows


def print_headline(rows: list[dict[str, Any]]) -> None:
    """The issue-4 targets, checked against this run's numbers (they are targets, not assertions)."""
    ok = {(r["system"], r["n"]): r for r in rows if "setup_ms" in r}
    lines: list[str] = []

    def check(label: str, value: float, target: float, unit: str, *, le: bool = True) -> None:
        good = value <= target if le else value >= target
        lines.append(f"  {'ok  ' if good else 'MISS'} {label}: {value:.2f}{unit} (target {'≤' if le else '≥'}"
                     f" {target:g}{unit})")

    for (s, n), r in sorted(ok.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        if not s.startswith("asyncnet") or s.startswith("asyncnet-netavark") or n < 100:
            continue  # the targets are stated for N=200 and N=100..1000
        if "setup_vs_floor" in r:
            check(f"{s} N={n} setup vs {r['floor']}", r["setup_vs_floor"], 1.25, "x")
        check(f"{s} N={n} teardown per container", r["teardown_ms_per_ctr"], 1.5, " ms")
        check(f"{s} N={n} peak RSS", r["rss_mb"], 150, " MB")
        if r.get("fw_commit_ms") is not None:
            check(f"{s} N={n} firewall commit", r["fw_commit_ms"], 150, " ms")
        nv = ok.get(("netavark", n))
        if nv is not None:
            check(f"netavark sequential / {s} N={n} (setup)", nv["setup_ms"] / r["setup_ms"], 7, "x", le=False)
    by_sys: dict[str, list[dict[str, Any]]] = {}
    for (s, _), r in ok.items():
        by_sys.setdefault(s, []).append(r)
    for s, rs in by_sys.items():
        if s.startswith("asyncnet") and not s.startswith("asyncnet-netavark") and len(rs) > 1:
            lo, hi = min(rs, key=lambda r: r["n"]), max(rs, key=lambda r: r["n"])
            check(f"{s} per-container setup N={hi['n']} vs N={lo['n']}",
                  hi["setup_ms_per_ctr"] / lo["setup_ms_per_ctr"], 1.2, "x")
    if lines:
        print("\nissue-4 targets (wall-clock, this run):")
        print("\n".join(lines))


def _f(v: Any, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


BATCH_SYSTEMS = ("asyncnet", "asyncnet+nft")


def print_table(rows: list[dict[str, Any]]) -> None:
    head = ("system", "N", "setup ms/ctr", "setup total", "p50/p95 ms", "teardown ms/ctr", "teardown total",
            "fw commit ms", "vs floor (setup/teardown)", "peak RSS MB", "cpu ms/ctr (setup/teardown)",
            "cpu vs floor")
    table = [head]
    for r in rows:
        if "setup_ms" not in r:
            table.append((r["system"], str(r["n"]), "FAILED", str(r.get("error", ""))[:40], "", "", "", "", "",
                          "", "", ""))
            continue
        p = f"{_f(r['setup_p50_ms'], '.1f')}/{_f(r['setup_p95_ms'], '.1f')}" if r["setup_p50_ms"] is not None else "-"
        if r["setup_p50_ms"] is not None and r["system"] in BATCH_SYSTEMS:
            p += " *"
        vs = (f"{r['setup_vs_floor']:.2f}x / {r['teardown_vs_floor']:.2f}x" if "setup_vs_floor" in r else "")
        table.append((r["system"] + (f" ({r['failed']} failed)" if r["failed"] else ""), str(r["n"]),
                      _f(r["setup_ms_per_ctr"]), f"{r['setup_ms']:.0f} ms", p, _f(r["teardown_ms_per_ctr"]),
                      f"{r['teardown_ms']:.0f} ms", _f(r["fw_commit_ms"], ".1f"), vs, _f(r["rss_mb"], ".1f"),
                      f"{r['setup_cpu_ms_per_ctr']:.2f} / {r['teardown_cpu_ms_per_ctr']:.2f}",
                      f"{r['setup_cpu_vs_floor']:.2f}x" if "setup_cpu_vs_floor" in r else ""))
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for i, row in enumerate(table):
        print("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths,
                                                                                           strict=True))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    if any(r["system"] in BATCH_SYSTEMS and r.get("setup_p50_ms") is not None for r in rows):
        print("* one batch: from the batch's start until the container's own kernel work was done (the others:"
              " each container's own process or batch)")


_COLOURS = {"asyncnet": "tab:blue", "asyncnet+nft": "tab:cyan", "floor": "dimgray", "floor+nft": "darkgray",
            "netavark": "tab:red", "netavark-par": "tab:orange", "asyncnet-netavark": "tab:purple",
            "asyncnet-netavark+nft": "tab:pink"}


def _colour(system: str) -> str:
    return _COLOURS.get(system, "tab:green")


def plot(rows: list[dict[str, Any]], ns: list[int], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    systems = list(dict.fromkeys(r["system"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, key, label in ((axes[0], "setup_ms_per_ctr", "setup"), (axes[1], "teardown_ms_per_ctr", "teardown")):
        if len(ns) > 1:
            for s in systems:
                pts = [(r["n"], r[key]) for r in rows if r["system"] == s and key in r]
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=s, color=_colour(s),
                            linestyle="--" if s.endswith(("+nft", "-par")) else "-")
            ax.set_xscale("log")
            ax.set_xticks(ns)
            ax.set_xticklabels([str(n) for n in ns])
            ax.set_xlabel("containers per batch (N)")
        else:
            vals = [(r["system"], r.get(key)) for r in rows]
            ax.bar([v[0] for v in vals], [v[1] or 0 for v in vals], color=[_colour(v[0]) for v in vals])
            for i, (_, v) in enumerate(vals):
                if v is not None:
                    ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
            ax.tick_params(axis="x", rotation=30)
            ax.set_xlabel(f"N = {ns[0]}")
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_ylabel(f"{label}: ms per container (log scale)")
        ax.set_title(label)
        ax.grid(True, which="both", alpha=0.3)
    if len(ns) > 1:
        axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def environment(args: argparse.Namespace) -> dict[str, Any]:
    def ver(cmd: list[str]) -> str | None:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return None

    import pyroute2

    return {"python": platform.python_version(), "kernel": platform.release(), "cpus": os.cpu_count(),
            "pyroute2": getattr(pyroute2, "__version__", None), "nft": ver(["nft", "--version"]),
            "ip": ver(["ip", "-V"]), "iptables": ver(["iptables", "-V"]) if shutil.which("iptables") else None,
            "netavark": ver([args.netavark, "--version"]) if args.netavark else None}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", default="20", help="containers per batch; a comma list runs several (default 20)")
    p.add_argument("--networks", type=int, default=1, help="bridge networks; containers are spread over them")
    p.add_argument("--networks-per-container", type=int, default=1, help="networks each container joins")
    p.add_argument("--ports-per-container", type=int, default=0, help="tcp port mappings per container")
    p.add_argument("--repeat", type=int, default=1, help="rounds per system and N (median reported)")
    p.add_argument("--stat", choices=["median", "min"], default="median",
                   help="how rounds are combined in the table (min = best of R, for a noisy machine)")
    p.add_argument("--systems", default="",
                   help=f"comma list of {', '.join(ALL_SYSTEMS)}, or 'all' (default: all available but "
                        f"asyncnet-netavark+nft)")
    p.add_argument("--netavark", default=DEFAULT_NETAVARK if os.path.exists(DEFAULT_NETAVARK) else "",
                   help="netavark binary (default: /usr/lib/podman/netavark if present; '' to skip)")
    p.add_argument("--netavark-fw", default="", help="NETAVARK_FW for netavark (default: its own default)")
    p.add_argument("--parallel", type=int, default=4, help="processes at once for netavark-par (default 4)")
    p.add_argument("--concurrency", type=int, default=64, help="asyncnet Engine(concurrency=…) (default 64)")
    p.add_argument("--floor-parallel", type=int, default=os.cpu_count() or 1,
                   help="per-container ip -batch processes at once for the floor (default: CPUs)")
    p.add_argument("--verify-sample", type=int, default=5, help="containers checked (addresses, ping)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default=str(DEFAULT_OUT), help="directory for JSON and PNG (default bench/out)")
    p.add_argument("--profile", action="store_true", help="cProfile the asyncnet rounds (timings flagged)")
    p.add_argument("--host-sysctl", action="append", default=[], metavar="KEY=VALUE",
                   help="set a sysctl in every round's private host namespace before the system runs (an "
                        "experiment knob, e.g. net.ipv6.conf.default.disable_ipv6=1; repeatable)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--quiet-wait", type=float, default=5.0,
                   help="before each round wait up to this many seconds for idle CPUs (default 5)")
    p.add_argument("--worker", nargs=2, metavar=("SPEC", "RESULT"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(*args.worker)
    if os.geteuid() != 0:
        raise SystemExit("run as root (namespaces, veths, nftables)")
    ns = sorted({int(x) for x in args.n.split(",") if x.strip()})
    if not ns or min(ns) < 1:
        raise SystemExit("--n: positive integers")
    for n in ns:
        workload(n, args.networks, args.networks_per_container, args.ports_per_container)
    systems, skipped = available_systems(args)
    for s, why in skipped.items():
        print(f"skipping {s}: {why}", file=sys.stderr)
    if not systems:
        raise SystemExit("nothing to run")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    profile_dir = out_dir / f"profile-{stamp}" if args.profile else None
    if profile_dir:
        profile_dir.mkdir()
    signal.signal(signal.SIGTERM, _forward)
    signal.signal(signal.SIGINT, _forward)
    signal.signal(signal.SIGHUP, _forward)
    rounds: list[dict[str, Any]] = []
    interrupted = False
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="asyncnet-bench-io-") as keep:
        try:
            for n in ns:
                for rnd in range(args.repeat):
                    for s in systems:
                        _, fw = system_kind(s)
                        spec = {"system": s, "n": n, "networks": args.networks,
                                "per_ctr": args.networks_per_container, "ports": args.ports_per_container,
                                "fw": fw, "round": rnd, "concurrency": args.concurrency,
                                "floor_parallel": args.floor_parallel, "parallel": args.parallel,
                                "netavark": args.netavark, "netavark_fw": args.netavark_fw,
                                "verify_sample": args.verify_sample, "seed": args.seed + rnd,
                                "host_sysctls": args.host_sysctl,
                                "profile_dir": str(profile_dir) if profile_dir else None}
                        quiet, idle = wait_quiet(args.quiet_wait)
                        print(f"[{time.monotonic() - t_start:6.1f}s] {s} N={n} round {rnd + 1}/{args.repeat} …",
                              file=sys.stderr, flush=True)
                        res = run_worker(spec, Path(keep))
                        res["quiet_wait_s"] = quiet
                        res["cpu_idle_before"] = idle
                        if idle < 0.85:
                            print(f"    note: CPUs only {idle:.0%} idle before this round (other load)",
                                  file=sys.stderr)
                        if not res.get("ok"):
                            print(f"!!! {s} N={n} round {rnd + 1} FAILED: {res.get('error')}\n"
                                  f"{res.get('traceback', '')}", file=sys.stderr, flush=True)
                        rounds.append(res)
        except KeyboardInterrupt:
            interrupted = True
            print("interrupted: partial results follow", file=sys.stderr)
            partial = Path(keep) / "result.json"
            if partial.exists():  # the interrupted round, as the worker reported it while cleaning up
                res = json.loads(partial.read_text())
                if res not in rounds:
                    rounds.append({**res, "ok": False, "error": res.get("error") or "interrupted"})
    rows = summarize(rounds, systems, ns, args.stat)
    params = (f"networks={args.networks} per-ctr={args.networks_per_container} "
              f"ports={args.ports_per_container} repeat={args.repeat} ({args.stat})")
    busy = [r["cpu_idle_before"] for r in rounds if r.get("cpu_idle_before", 1.0) < 0.85]
    print(f"\nasyncnet bench: {params}; ratios against the floor with the same firewall, same run")
    if busy:
        print(f"  NOTE: {len(busy)}/{len(rounds)} rounds started with the CPUs less than 85% idle (other load "
              f"on the machine, min {min(busy):.0%} idle): timings are noisy")
    print_table(rows)
    print_headline(rows)
    for s, why in skipped.items():
        print(f"  skipped {s}: {why}")
    for r in rows:
        if r.get("firewall_driver"):
            print(f"  {r['system']} N={r['n']}: {r['firewall_driver']}")
    lost = [(r["spec"]["system"], r["spec"]["n"], x) for r in rounds
            for x in r.get("verify", {}).get("first_ping_lost", [])]
    if lost:
        print(f"  NOTE: {len(lost)} sampled container(s) lost their first ping to the gateway and answered a retry "
              f"(e.g. {lost[0][0]} N={lost[0][1]}: {lost[0][2][:160]}…) — see verify.first_ping_lost in the JSON")
    doc = {"params": {k: v for k, v in vars(args).items() if k != "worker"}, "ns": ns, "systems": systems,
           "skipped": skipped, "env": environment(args), "profiled": bool(profile_dir), "summary": rows,
           "rounds": rounds}
    json_path = out_dir / f"bench-{stamp}.json"
    json_path.write_text(json.dumps(doc, indent=1))
    print(f"\nJSON: {json_path}")
    if not args.no_plot and any("setup_ms" in r for r in rows):
        png = out_dir / f"bench-{stamp}.png"
        plot([r for r in rows if "setup_ms" in r], ns, png, f"asyncnet bench — {params}")
        print(f"plot: {png}")
    if profile_dir:
        print(f"profiles: {profile_dir}")
    failed = [r for r in rounds if not r.get("ok")]
    if failed:
        print(f"\n!!! {len(failed)} round(s) FAILED — see above and the JSON", file=sys.stderr)
        return 1
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
