"""Durable state, IPAM and crash recovery through the bulk CLI (issue 5), against the real kernel.

Every command is the ``asyncnet`` binary run as a subprocess the way a batch runner runs it, entered into
the sandbox's private host namespace with ``nsenter`` (or, for one of the two concurrent processes, given
it with ``--host-netns``), with the nftables driver and a port mapping per container, so that rules are
part of everything that is checked. Nothing is monkeypatched: crashes are real ``SIGKILL``s at seeded
random moments, interruptions real ``SIGTERM``s.

The central check is :func:`assert_kernel_matches_db`: what ``asyncnet status`` says is set up is exactly
what the kernel has — host veths (name, ifindex, bridge), the bridge, every container namespace's
interfaces and addresses, the ``inet netavark`` rule multiset and chains, netavark's firewall state
files — and nothing else; no allocation without a journal row. The expected ruleset comes from
:class:`RuleModel`, learnt once from a clean two-container run in a sandbox of its own: the skeleton a
fully torn-down table keeps, the rules a network adds, and the rules one container adds (with its host
port and address abstracted), so that any set of set-up containers has one exact expected table.

Seed: ``ASYNCNET_TEST_SEED`` (default below) drives the kill moments.
"""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _bridge_util import cid, network, ping
from hypothesis import HealthCheck, Phase, example, given, seed, settings
from hypothesis import strategies as st

from asyncnet.sandbox import Sandbox

ASYNCNET = str(Path(sys.executable).parent / "asyncnet")
SEED = int(os.environ.get("ASYNCNET_TEST_SEED", "20250505"))
NET_ID = "5eed" * 16
NET = network("rnet", "rbr0", subnets=[("10.96.0.0/16", "10.96.0.1")], net_id=NET_ID)
BRIDGE = "rbr0"
PORT0 = 20000  # container i maps host port PORT0 + i (far from any other number in the ruleset)
SIGTERM_STATUS = 128 + signal.SIGTERM
KERNEL_MAX_PORTS = 1023  # ports one bridge can hold (see test_bridge_port_limit)

Rules = Counter[tuple[str | None, str, str]]  # (owning container id or None, chain, canonical expr) -> count


# --------------------------------------------------------------------------------------------------
# containers, batch files and the command line


@dataclass(frozen=True)
class Ctr:
    index: int
    netns: str

    @property
    def id(self) -> str:
        return cid(self.index)

    @property
    def port(self) -> int:
        return PORT0 + self.index


def make_ctrs(sb: Sandbox, n: int, first: int = 0) -> list[Ctr]:
    return [Ctr(i, sb.netns(f"r{i}")) for i in range(first, first + n)]


def batch_file(sb: Sandbox, name: str, ctrs: Sequence[Ctr], net: dict[str, Any] = NET,
               netns: str | None = None) -> str:
    """A batch: every container on ``net`` as eth0 (IPAM), host port PORT0+i -> 80/tcp."""
    doc = {"networks": {net["name"]: net}, "containers": [
        {"netns": netns or c.netns, "container_id": c.id, "container_name": f"r{c.index}",
         "networks": {net["name"]: {"interface_name": "eth0"}},
         "port_mappings": [{"host_ip": "", "container_port": 80, "host_port": c.port, "range": 1,
                            "protocol": "tcp"}]}
        for c in ctrs]}
    path = sb.root / f"{name}.json"
    path.write_bytes(json.dumps(doc).encode())
    return str(path)


class Proc:
    """A running ``asyncnet`` whose output goes to files (a pipe would fill up and stall it)."""

    def __init__(self, argv: list[str], out: Path) -> None:
        self.out, self.err = out.with_suffix(".out"), out.with_suffix(".err")
        with open(self.out, "wb") as o, open(self.err, "wb") as e:
            self.popen = subprocess.Popen(argv, stdout=o, stderr=e)
        self.started = time.monotonic()

    def signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def wait(self, timeout: float = 180) -> tuple[int, Any]:
        rc = self.popen.wait(timeout)
        raw = self.out.read_bytes()
        try:
            doc = json.loads(raw) if raw.strip() else None
        except ValueError:
            raise AssertionError(f"not JSON: {raw[-2000:]!r}; stderr {self.err.read_bytes()[-2000:]!r}") from None
        return rc, doc


class Cli:
    """``asyncnet`` in the sandbox: ``nsenter --net=<host> asyncnet CMD --config DIR …`` (or
    ``--host-netns <host>`` with the process left in the real namespace)."""

    def __init__(self, sb: Sandbox, *, host_netns_flag: bool = False) -> None:
        self.sb = sb
        self.flag = host_netns_flag
        self._n = 0

    def argv(self, command: str, *rest: str) -> list[str]:
        cmd = [ASYNCNET, command, "--config", str(self.sb.config_dir)]
        if command != "status":
            cmd += ["--firewall-driver", "nftables"]
            if self.flag:
                cmd += ["--host-netns", self.sb.host]
        cmd += rest
        return cmd if self.flag else ["nsenter", f"--net={self.sb.host}", *cmd]

    def start(self, command: str, *rest: str) -> Proc:
        self._n += 1
        return Proc(self.argv(command, *rest), self.sb.root / f"cli-{os.getpid()}-{id(self)}-{self._n}")

    def run(self, command: str, *rest: str, timeout: float = 180) -> tuple[int, Any]:
        return self.start(command, *rest).wait(timeout)

    def ok(self, command: str, *rest: str) -> Any:
        rc, doc = self.run(command, *rest)
        assert rc == 0, (command, doc)
        return doc

    def status(self) -> dict[str, Any]:
        return self.ok("status")

    def gc(self) -> dict[str, Any]:
        return self.ok("gc")


def gc_removed(report: dict[str, Any]) -> int:
    return sum(len(v) for v in report.values())


def statuses(doc: dict[str, Any]) -> dict[str, Any]:
    """container id -> its `status` value (or the error text prefixed with ``error:``)."""
    return {k: v["status"] if "status" in v else f"error: {v['error']}" for k, v in doc.items()}


def address_of(entry: dict[str, Any]) -> str:
    [iface] = entry["status"][NET["name"]]["interfaces"].values()
    [sub] = iface["subnets"]
    return str(sub["ipnet"].split("/")[0])


# --------------------------------------------------------------------------------------------------
# independent probes of the kernel (ip/nft inside the sandbox)


def host_links(sb: Sandbox) -> dict[str, dict[str, Any]]:
    out = sb.run(["ip", "-j", "-d", "addr", "show"]).stdout
    return {link["ifname"]: link for link in json.loads(out)}


def host_snapshot(sb: Sandbox) -> dict[str, tuple[Any, ...]]:
    """What must not change when nothing is touched: each host link's index, kind, master, addresses."""
    return {name: (link["ifindex"], link.get("linkinfo", {}).get("info_kind"), link.get("master"),
                   global_addrs(link)) for name, link in host_links(sb).items()}


def global_addrs(link: dict[str, Any]) -> list[str]:
    return sorted(f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", []) if a.get("scope") != "link")


def container_ifaces(namespaces: Sequence[str]) -> dict[str, dict[str, list[str]]]:
    """ns -> {interface other than lo: its global addresses}, one shell for all namespaces."""
    if not namespaces:
        return {}
    script = 'for ns; do printf "%s\\t" "$ns"; nsenter --net="$ns" ip -j addr show; done'
    out = subprocess.run(["sh", "-c", script, "sh", *namespaces], check=True, capture_output=True, text=True,
                         timeout=120).stdout
    found: dict[str, dict[str, list[str]]] = {}
    for line in out.splitlines():
        ns, _, doc = line.partition("\t")
        found[ns] = {link["ifname"]: global_addrs(link) for link in json.loads(doc) if link["ifname"] != "lo"}
    assert set(found) == set(namespaces)
    return found


def read_rules(sb: Sandbox, port_owner: dict[int, str], ip_owner: dict[str, str]
               ) -> tuple[Rules, frozenset[str]] | None:
    """``nft -j list table inet netavark`` as a rule multiset + chain names, or None without a table.

    A rule naming a container's host port or address is that container's; both are replaced by tokens
    so that rules of different containers compare equal. A rule naming two containers is a bug."""
    res = sb.run(["nft", "-j", "list", "table", "inet", "netavark"], check=False)
    if res.returncode != 0:
        assert "No such file" in res.stderr, res.stderr
        return None
    rules: Rules = Counter()
    chains: set[str] = set()
    for item in json.loads(res.stdout)["nftables"]:
        if "chain" in item:
            chains.add(item["chain"]["name"])
        if "rule" not in item:
            continue
        owners: set[str] = set()
        rule = item["rule"]
        expr = json.dumps(_canon(rule["expr"], port_owner, ip_owner, owners), sort_keys=True)
        assert len(owners) <= 1, f"a rule names several containers: {rule}"
        rules[(owners.pop() if owners else None, rule["chain"], expr)] += 1
    return rules, frozenset(chains)


def _canon(x: Any, port_owner: dict[int, str], ip_owner: dict[str, str], owners: set[str]) -> Any:
    if isinstance(x, dict):
        return {k: _canon(v, port_owner, ip_owner, owners) for k, v in x.items()}
    if isinstance(x, list):
        return [_canon(v, port_owner, ip_owner, owners) for v in x]
    if isinstance(x, int) and not isinstance(x, bool) and x in port_owner:
        owners.add(port_owner[x])
        return "<HOSTPORT>"
    if isinstance(x, str) and x in ip_owner:
        owners.add(ip_owner[x])
        return "<IP>"
    return x


def firewall_files(sb: Sandbox) -> dict[str, list[str]]:
    fw = sb.config_dir / "firewall"
    return {d: sorted(p.name for p in (fw / d).iterdir()) if (fw / d).is_dir() else [] for d in ("networks", "ports")}


def db_phases(sb: Sandbox) -> Counter[str]:
    """Journal phases read straight from the database (read-only; cheap enough to poll)."""
    db = sb.config_dir / "asyncnet.db"
    if not db.exists():
        return Counter()
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return Counter(dict(con.execute("SELECT phase, count(*) FROM attachments GROUP BY phase")))
        finally:
            con.close()
    except sqlite3.Error:
        return Counter()


def rows_written_by(sb: Sandbox, pid: int) -> int:
    """Journal rows whose owner (boot_id:pid:starttime) is process ``pid``: its work has started."""
    db = sb.config_dir / "asyncnet.db"
    if not db.exists():
        return 0
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return int(con.execute("SELECT count(*) FROM attachments WHERE owner LIKE ?",
                                   (f"%:{pid}:%",)).fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def veth_count(sb: Sandbox) -> int:
    return len(sb.run(["ip", "-o", "link", "show", "type", "veth"]).stdout.splitlines())


def wait_for(cond: Callable[[], bool], proc: Proc, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert proc.popen.poll() is None, f"process ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


# --------------------------------------------------------------------------------------------------
# the expected ruleset


@dataclass(frozen=True)
class RuleModel:
    skeleton: Rules  # what a table keeps once every network is torn down
    skeleton_chains: frozenset[str]
    network: Rules  # what NET adds while it has containers
    network_chains: frozenset[str]
    per_container: Counter[tuple[str, str]]  # (chain, canonical expr) one container adds

    def expected(self, done: Sequence[str]) -> tuple[Rules, frozenset[str]]:
        if not done:
            return Counter(self.skeleton), self.skeleton_chains
        rules = self.skeleton + self.network
        for c in done:
            for (chain, expr), n in self.per_container.items():
                rules[(c, chain, expr)] += n
        return rules, self.skeleton_chains | self.network_chains


@pytest.fixture(scope="module")
def rule_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RuleModel]:
    """Learnt from a clean run of two containers in a sandbox of its own, then sanity-checked against
    netavark's layout: one container = a jump in the host-port DNAT chain + 2 set-mark rules and the
    DNAT rule in the network's ``_dnat`` chain."""
    with Sandbox(tmp_path_factory.mktemp("rule-model")) as sb:
        ctrs = make_ctrs(sb, 2)
        cli = Cli(sb)
        path = batch_file(sb, "model", ctrs)
        up = cli.ok("up", path)
        ips = {address_of(up[c.id]): c.id for c in ctrs}
        ports = {c.port: c.id for c in ctrs}
        full = read_rules(sb, ports, ips)
        assert full is not None
        cli.ok("down", path)
        torn = read_rules(sb, ports, ips)
        assert torn is not None
    rules, chains = full
    skeleton, skeleton_chains = torn
    shared = Counter({k: n for k, n in rules.items() if k[0] is None})
    per = [Counter({(ch, ex): n for (o, ch, ex), n in rules.items() if o == c.id}) for c in ctrs]
    assert per[0] == per[1], "two containers of one network differ in more than port and address"
    assert not skeleton - shared and not any(o for o, _, _ in skeleton), skeleton
    dnat_chain = next(ch for ch in chains if ch.startswith("nv_") and ch.endswith("_dnat"))
    assert Counter(ch for ch, _ in per[0].elements()) == {"NETAVARK-HOSTPORT-DNAT": 1, dnat_chain: 3}, per[0]
    assert sum("<IP>" in ex and '"dnat"' in ex for _, ex in per[0].elements()) == 1, per[0]
    assert not [ch for ch in skeleton_chains if ch.startswith("nv_")], skeleton_chains
    yield RuleModel(skeleton, skeleton_chains, shared - skeleton, chains - skeleton_chains, per[0])


# --------------------------------------------------------------------------------------------------
# kernel == database


def assert_kernel_matches_db(sb: Sandbox, cli: Cli, ctrs: Sequence[Ctr], model: RuleModel, *,
                             net: dict[str, Any] = NET, status: dict[str, Any] | None = None
                             ) -> dict[str, dict[str, Any]]:
    """Everything ``asyncnet status`` says is set up exists exactly once in the kernel, and nothing else
    does (host, every container of ``ctrs``, nftables, firewall state files). Returns the done rows.
    Call when no asyncnet process runs (then nothing may be in flight)."""
    st = cli.status() if status is None else status
    rows = st["attachments"]
    assert [(r["container_id"], r["phase"]) for r in rows if r["phase"] != "done"] == [], "in flight after gc"
    assert {r["network"] for r in rows} <= {net["name"]}
    done = {r["container_id"]: r for r in rows}
    assert set(done) <= {c.id for c in ctrs}

    # allocations: exactly the journal's addresses, never one twice
    held: dict[str, list[str]] = defaultdict(list)
    for allocs in st["allocations"].values():
        for a in allocs:
            held[a["container_id"]].append(a["address"])
    assert set(held) == set(done), f"allocations without a journal row: {sorted(set(held) - set(done))[:5]}"
    for c, r in done.items():
        assert sorted(held[c]) == sorted(a.split("/")[0] for a in r["addresses"]), c
    every = [a for addrs in held.values() for a in addrs]
    assert len(every) == len(set(every)), "an address is allocated twice"

    # host: lo, the bridge while it has containers, one veth per done row with the recorded index
    links = host_links(sb)
    bridge = net["network_interface"]
    expected = {"lo"} | {r["host_veth"] for r in done.values()} | ({bridge} if done else set())
    assert set(links) == expected, (f"host links: leaked {sorted(set(links) - expected)[:5]}, "
                                    f"missing {sorted(expected - set(links))[:5]}")
    for r in done.values():
        veth = links[r["host_veth"]]
        assert veth["linkinfo"]["info_kind"] == "veth" and veth.get("master") == bridge, veth
        assert veth["ifindex"] == r["host_ifindex"], (r["container_id"], veth["ifindex"], r["host_ifindex"])
    if done:
        gw = net["subnets"][0]
        assert global_addrs(links[bridge]) == [f"{gw['gateway']}/{gw['subnet'].split('/')[1]}"]

    # containers: eth0 with the journal's addresses when done, nothing but lo otherwise
    seen = container_ifaces([c.netns for c in ctrs if os.path.exists(c.netns)])
    for c in ctrs:
        if c.netns in seen:
            want = {"eth0": sorted(done[c.id]["addresses"])} if c.id in done else {}
            assert seen[c.netns] == want, (c.id, seen[c.netns], want)

    # nftables: exactly the model's table for the done containers; netavark's state files agree
    port_owner = {c.port: c.id for c in ctrs}
    ip_owner = {a.split("/")[0]: c for c, r in done.items() for a in r["addresses"]}
    got = read_rules(sb, port_owner, ip_owner)
    want_rules, want_chains = model.expected(list(done))
    if got is None:
        assert not done, "no nftables table, but containers are set up"
    else:
        rules, chains = got
        assert max(rules.values(), default=1) == 1, f"a rule twice: {[k for k, n in rules.items() if n > 1][:3]}"
        assert chains == want_chains, (sorted(chains - want_chains), sorted(want_chains - chains))
        extra, missing = rules - want_rules, want_rules - rules
        assert not extra and not missing, (f"rules beyond the journal: {list(extra.items())[:4]}; "
                                           f"missing: {list(missing.items())[:4]}")
    assert firewall_files(sb) == {"networks": [net["id"]] if done else [],
                                  "ports": sorted(f"{net['id']}_{c}" for c in done)}
    return done


def assert_clean(sb: Sandbox, cli: Cli, ctrs: Sequence[Ctr], model: RuleModel) -> None:
    st = cli.status()
    assert st == {"attachments": [], "allocations": {}}
    assert assert_kernel_matches_db(sb, cli, ctrs, model, status=st) == {}


# --------------------------------------------------------------------------------------------------
# kill -9


@pytest.mark.slow
def test_kill9_during_up_then_gc(sandbox: Sandbox, rule_model: RuleModel) -> None:
    """300 containers; SIGKILL of `up` at seeded random moments; `gc` must leave either nothing or, where
    the journal says done, exactly the finished containers; a second gc finds nothing; `down` removes
    what is done; finally the same batch comes up from scratch.

    Moments: the first kill is a random fraction of a measured full run from the process start (mostly
    start-up, IPAM, journal); the others are random fractions, stratified, of the measured time from the
    process's first journal row to its exit (interpreter start-up under load varies more than the work,
    and would otherwise swallow kill moments); a last one comes as soon as all 300 veths exist."""
    sb, cli = sandbox, Cli(sandbox)
    ctrs = make_ctrs(sb, 300)
    path = batch_file(sb, "k300", ctrs)
    proc = cli.start("up", path)
    began = None
    while proc.popen.poll() is None:
        if began is None and rows_written_by(sb, proc.popen.pid):
            began = time.monotonic()
        time.sleep(0.002)
    end = time.monotonic()
    full, work = end - proc.started, end - (began or proc.started)
    rc, up = proc.wait()
    assert rc == 0 and set(up) == {c.id for c in ctrs} and all("status" in v for v in up.values())
    assert len(assert_kernel_matches_db(sb, cli, ctrs, rule_model)) == 300
    t0 = time.monotonic()
    down = cli.ok("down", path)
    down_s = time.monotonic() - t0
    assert set(statuses(down).values()) == {"removed"}
    assert_clean(sb, cli, ctrs, rule_model)

    rng = random.Random(SEED)
    moments = [("start", rng.uniform(0.05, 0.35))]
    moments += [("journal", rng.uniform(k * 1.1 / 3, (k + 1) * 1.1 / 3)) for k in range(3)]
    outcomes = []
    for anchor, frac in moments:
        if anchor == "start":
            proc = cli.start("up", path)
            time.sleep(max(0.0, frac * full - (time.monotonic() - proc.started)))
        else:
            proc = cli.start("up", path)
            wait_for(lambda p=proc: rows_written_by(sb, p.popen.pid) > 0, proc, "the journal intents")
            time.sleep(frac * work)
        phases = db_phases(sb)  # just before the kill: where it was
        proc.signal(signal.SIGKILL)
        rc, _ = proc.wait()
        t0 = time.monotonic()
        report = cli.gc()
        gc_s = time.monotonic() - t0
        done = assert_kernel_matches_db(sb, cli, ctrs, rule_model)
        assert cli.gc() == {k: [] for k in report}, "gc is not idempotent"
        outcomes.append((anchor, round(frac, 2), rc, dict(phases), len(report["attachments"]),
                         len(report["links"]), len(report["allocations"]), len(done), round(gc_s, 2)))
        if done:
            # the finished containers stay, fully set up; `down` removes them
            down = cli.ok("down", path)
            assert statuses(down) == {c.id: "removed" if c.id in done else "not set up" for c in ctrs}
            assert_clean(sb, cli, ctrs, rule_model)
    print(f"\nfull up {full:.2f} s (work after the first journal row {work:.2f} s), down {down_s:.2f} s; kills "
          f"(anchor, fraction, rc, journal before the kill, gc removed attachments/links/allocations, done "
          f"after gc, gc s): {outcomes}")
    assert any(o[4] for o in outcomes), f"no kill landed while the batch was in flight: {outcomes}"

    # and one late kill: every veth exists, the firewall commit / the journal's `done` is under way
    proc = cli.start("up", path)
    wait_for(lambda: veth_count(sb) == 300, proc, "all 300 veths")
    phases = db_phases(sb)
    proc.signal(signal.SIGKILL)
    rc, _ = proc.wait()
    t0 = time.monotonic()
    report = cli.gc()
    print(f"late kill (rc {rc}, journal {dict(phases)}): gc removed {len(report['attachments'])} attachments, "
          f"{len(report['links'])} links in {time.monotonic() - t0:.2f} s")
    done = assert_kernel_matches_db(sb, cli, ctrs, rule_model)
    assert len(done) in (0, 300)
    if done:
        assert set(statuses(cli.ok("down", path)).values()) == {"removed"}
    assert_clean(sb, cli, ctrs, rule_model)

    up = cli.ok("up", path)
    assert all("status" in v for v in up.values())
    assert len({address_of(v) for v in up.values()}) == 300
    assert len(assert_kernel_matches_db(sb, cli, ctrs, rule_model)) == 300
    assert set(statuses(cli.ok("down", path)).values()) == {"removed"}
    assert_clean(sb, cli, ctrs, rule_model)


def test_retry_after_kill_without_gc(sandbox: Sandbox, rule_model: RuleModel) -> None:
    """A batch runner retries `up` right after a kill -9, without gc: the dead process's intents are not
    "already set up" — the error says what happened and what to do; gc, then the retry works."""
    sb, cli = sandbox, Cli(sandbox)
    ctrs = make_ctrs(sb, 40)
    path = batch_file(sb, "retry", ctrs)
    proc = cli.start("up", path)
    wait_for(lambda: rows_written_by(sb, proc.popen.pid) > 0, proc, "the journal intents")
    proc.signal(signal.SIGKILL)
    proc.wait()
    rows = cli.status()["attachments"]
    assert {(r["phase"], r["owner_alive"]) for r in rows} == {("intent", False)} and len(rows) == 40
    rc, doc = cli.run("up", path)
    assert rc == 1
    for c in ctrs:
        assert "interrupted setup" in doc[c.id]["error"] and "asyncnet gc" in doc[c.id]["error"], doc[c.id]
    assert len(cli.gc()["attachments"]) == 40
    assert_clean(sb, cli, ctrs, rule_model)
    assert all("status" in v for v in cli.ok("up", path).values())
    assert len(assert_kernel_matches_db(sb, cli, ctrs, rule_model)) == 40
    rc, doc = cli.run("up", path)
    assert rc == 1 and all(v["error"].endswith("is already set up on network rnet") for v in doc.values())
    assert set(statuses(cli.ok("down", path)).values()) == {"removed"}
    assert_clean(sb, cli, ctrs, rule_model)


@pytest.mark.slow
def test_gc_leaves_a_batch_in_flight_alone(sandbox: Sandbox, rule_model: RuleModel) -> None:
    """gc while another process's `up` is half-way: the live process's intents, veths, bridge and
    addresses are not orphans; the batch completes and the kernel matches the journal."""
    sb, cli = sandbox, Cli(sandbox)
    ctrs = make_ctrs(sb, 300)
    path = batch_file(sb, "live", ctrs)
    proc = cli.start("up", path)
    wait_for(lambda: rows_written_by(sb, proc.popen.pid) > 0, proc, "the journal intents")
    report = cli.gc()
    assert db_phases(sb)["intent"] == 300, "the batch finished before gc did: the test proves nothing"
    assert gc_removed(report) == 0, report
    rc, doc = proc.wait()
    assert rc == 0 and all("status" in v for v in doc.values())
    assert len(assert_kernel_matches_db(sb, cli, ctrs, rule_model)) == 300
    assert set(statuses(cli.ok("down", path)).values()) == {"removed"}
    assert_clean(sb, cli, ctrs, rule_model)


# --------------------------------------------------------------------------------------------------
# SIGTERM


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_during_up_rolls_back(sandbox: Sandbox, rule_model: RuleModel, signum: int) -> None:
    """Signalled mid-`up` — twice, as a supervisor or a double Ctrl-C does: the second signal must not
    kill the rollback. Exit 128+signal, every container reports the interruption, nothing is left."""
    sb, cli = sandbox, Cli(sandbox)
    ctrs = make_ctrs(sb, 150)
    path = batch_file(sb, "t150", ctrs)
    proc = cli.start("up", path)
    wait_for(lambda: veth_count(sb) >= 15, proc, "the first veths")
    proc.signal(signum)
    time.sleep(0.05)
    if proc.popen.poll() is None:
        proc.signal(signum)
    rc, doc = proc.wait()
    assert rc == 128 + signum, (rc, doc, proc.err.read_text()[-1000:])
    assert set(doc) == {c.id for c in ctrs}
    assert all("interrupted" in v.get("error", "") for v in doc.values()), list(doc.values())[:3]
    assert_clean(sb, cli, ctrs, rule_model)
    # and nothing stands in the way of doing it again
    assert set(statuses(cli.ok("up", path)).keys()) == {c.id for c in ctrs}
    assert set(statuses(cli.ok("down", path)).values()) == {"removed"}
    assert_clean(sb, cli, ctrs, rule_model)


@pytest.mark.slow
def test_sigterm_during_down_finishes(sandbox: Sandbox, rule_model: RuleModel) -> None:
    sb, cli = sandbox, Cli(sandbox)
    ctrs = make_ctrs(sb, 150)
    path = batch_file(sb, "t150", ctrs)
    cli.ok("up", path)
    proc = cli.start("down", path)
    wait_for(lambda: db_phases(sb)["removing"] > 0, proc, "the teardown to start")
    proc.signal(signal.SIGTERM)
    time.sleep(0.02)
    if proc.popen.poll() is None:
        proc.signal(signal.SIGTERM)  # repeated: still finishes
    rc, doc = proc.wait()
    assert rc == SIGTERM_STATUS, (rc, doc)
    assert statuses(doc) == {c.id: "removed" for c in ctrs}
    assert_clean(sb, cli, ctrs, rule_model)


# --------------------------------------------------------------------------------------------------
# two processes on one network


@pytest.mark.slow
def test_two_processes_same_network(sandbox: Sandbox, rule_model: RuleModel) -> None:
    """100 + 100 containers by two concurrent `up`s (one nsenter'd, one with --host-netns), IPAM only:
    200 distinct addresses, reachable from the host and across the two batches, one ruleset with every
    rule once; then two concurrent `down`s leave nothing."""
    sb = sandbox
    cli_a, cli_b = Cli(sb), Cli(sb, host_netns_flag=True)
    a, b = make_ctrs(sb, 100), make_ctrs(sb, 100, first=100)
    path_a, path_b = batch_file(sb, "a", a), batch_file(sb, "b", b)
    procs = [cli_a.start("up", path_a), cli_b.start("up", path_b)]
    (rc_a, up_a), (rc_b, up_b) = (p.wait() for p in procs)
    assert (rc_a, rc_b) == (0, 0), ([v for v in up_a.values() if "error" in v][:2],
                                    [v for v in up_b.values() if "error" in v][:2])
    addr = {c.id: address_of(up_a[c.id]) for c in a} | {c.id: address_of(up_b[c.id]) for c in b}
    assert len(set(addr.values())) == 200, "an address was handed out twice"
    done = assert_kernel_matches_db(sb, cli_a, a + b, rule_model)
    assert len(done) == 200
    assert gc_removed(cli_b.gc()) == 0  # (gc with --host-netns) nothing is orphaned
    assert {c: done[c]["addresses"][0].split("/")[0] for c in done} == addr

    rng = random.Random(SEED)
    sample_a, sample_b = rng.sample(a, 6), rng.sample(b, 6)
    probes = [(None, addr[c.id]) for c in sample_a + sample_b]
    probes += [(x.netns, addr[y.id]) for x, y in zip(sample_a, sample_b, strict=True)]
    probes += [(y.netns, addr[x.id]) for x, y in zip(sample_a, sample_b, strict=True)]
    failed = [(ns, ip) for ns, ip in probes if not ping(sb, ns or sb.host, ip)]
    assert not failed, f"no answer: {failed}"

    procs = [cli_a.start("down", path_a), cli_b.start("down", path_b)]
    (rc_a, down_a), (rc_b, down_b) = (p.wait() for p in procs)
    assert (rc_a, rc_b) == (0, 0), (down_a, down_b)
    assert set(statuses(down_a).values()) == set(statuses(down_b).values()) == {"removed"}
    assert_clean(sb, cli_a, a + b, rule_model)


# --------------------------------------------------------------------------------------------------
# teardown corner cases, IPAM, gc


def test_down_after_netns_deleted(sandbox: Sandbox, rule_model: RuleModel) -> None:
    sb, cli = sandbox, Cli(sandbox)
    ctrs = make_ctrs(sb, 3)
    path = batch_file(sb, "three", ctrs)
    cli.ok("up", path)
    sb.remove_netns(ctrs[1].netns)  # the container is gone, and its veth pair with it
    row = next(r for r in cli.status()["attachments"] if r["container_id"] == ctrs[1].id)
    assert row["host_veth"] not in sb.links()
    down = cli.ok("down", path)
    assert statuses(down) == {c.id: "removed" for c in ctrs}
    assert_clean(sb, cli, ctrs, rule_model)


def test_gc_removes_vanished_container_and_is_idempotent(sandbox: Sandbox, rule_model: RuleModel) -> None:
    sb, cli = sandbox, Cli(sandbox)
    ctrs = make_ctrs(sb, 3)
    path = batch_file(sb, "three", ctrs)
    cli.ok("up", path)
    gone = ctrs[1]
    sb.remove_netns(gone.netns)
    report = cli.gc()
    assert [a["container_id"] for a in report["attachments"]] == [gone.id]
    assert report["port_rules"] == [f"{gone.id}/{NET['name']}"] and len(report["allocations"]) == 1
    assert report["bridges"] == [] and report["networks"] == []
    done = assert_kernel_matches_db(sb, cli, ctrs, rule_model)
    assert set(done) == {ctrs[0].id, ctrs[2].id}
    assert cli.gc() == {k: [] for k in report}
    down = cli.ok("down", path)
    assert statuses(down) == {ctrs[0].id: "removed", gone.id: "not set up", ctrs[2].id: "removed"}
    assert_clean(sb, cli, ctrs, rule_model)
    assert cli.gc() == {k: [] for k in report}


def test_double_down(sandbox: Sandbox, rule_model: RuleModel) -> None:
    sb, cli = sandbox, Cli(sandbox)
    ctrs = make_ctrs(sb, 2)
    path = batch_file(sb, "two", ctrs)
    cli.ok("up", path)
    assert statuses(cli.ok("down", path)) == {c.id: "removed" for c in ctrs}
    rc, doc = cli.run("down", path)
    assert rc == 0 and statuses(doc) == {c.id: "not set up" for c in ctrs}
    assert_clean(sb, cli, ctrs, rule_model)


def test_lease_range_and_exhaustion(sandbox: Sandbox, rule_model: RuleModel) -> None:
    """lease_range .3.100–.3.104 (5 addresses): a batch of 6 gives those 5 and one error naming the
    network (that container untouched); one more container alone fails and touches nothing at all."""
    sb, cli = sandbox, Cli(sandbox)
    net = copy.deepcopy(NET)
    net["subnets"][0]["lease_range"] = {"start_ip": "10.96.3.100", "end_ip": "10.96.3.104"}
    ctrs = make_ctrs(sb, 7)
    rc, doc = cli.run("up", batch_file(sb, "six", ctrs[:6], net))
    assert rc == 1
    failed = [c for c in ctrs[:6] if "error" in doc[c.id]]
    assert len(failed) == 1, doc
    err = doc[failed[0].id]["error"]
    assert "rnet" in err and "no free IP address" in err, err
    got = sorted(address_of(doc[c.id]) for c in ctrs[:6] if c not in failed)
    assert got == [f"10.96.3.{i}" for i in range(100, 105)]
    done = assert_kernel_matches_db(sb, cli, ctrs, rule_model, net=net)
    assert failed[0].id not in done and len(done) == 5

    before = (host_snapshot(sb), read_rules(sb, {}, {}), cli.status(), firewall_files(sb))
    rc, doc = cli.run("up", batch_file(sb, "one", ctrs[6:], net))
    assert rc == 1 and "rnet" in doc[ctrs[6].id]["error"], doc
    assert (host_snapshot(sb), read_rules(sb, {}, {}), cli.status(), firewall_files(sb)) == before
    assert container_ifaces([ctrs[6].netns]) == {ctrs[6].netns: {}}

    # released at teardown: the same addresses come back for the next batch
    assert set(statuses(cli.ok("down", batch_file(sb, "all", ctrs, net))).values()) == {"removed", "not set up"}
    assert_clean(sb, cli, ctrs, rule_model)
    up = cli.ok("up", batch_file(sb, "five", ctrs[:5], net))
    assert sorted(address_of(v) for v in up.values()) == [f"10.96.3.{i}" for i in range(100, 105)]


def test_bridge_port_limit(sandbox: Sandbox, rule_model: RuleModel) -> None:
    """The kernel numbers bridge ports in 10 bits and reserves 0: a bridge holds 1023 ports, the next one
    gets EXFULL. A batch that would exceed that fails validation before anything is touched. Real kernel,
    cheaply: (1) one batch of 1024 containers (all naming one namespace: the check comes before any
    namespace is entered); (2) a bridge that already has 1021 ports (veth pairs made with one
    ``ip -batch``): 3 more fail validation, 2 fill it to exactly 1023 and work."""
    sb, cli = sandbox, Cli(sandbox)
    shared_ns = sb.netns("shared")
    many = [Ctr(i, shared_ns) for i in range(KERNEL_MAX_PORTS + 1)]
    rc, doc = cli.run("up", batch_file(sb, "many", many))
    assert rc == 1 and len(doc) == KERNEL_MAX_PORTS + 1
    too_many = f"network rnet: bridge {BRIDGE} would have 1024 ports, more than {KERNEL_MAX_PORTS}"
    assert {v.get("error") for v in doc.values()} == {too_many}
    assert sb.links() == ["lo"] and read_rules(sb, {}, {}) is None
    assert cli.status() == {"attachments": [], "allocations": {}}
    assert container_ifaces([shared_ns]) == {shared_ns: {}}

    taken = KERNEL_MAX_PORTS - 2
    lines = [f"link add {BRIDGE} type bridge"] + [
        f"link add p{i} group 4242 master {BRIDGE} type veth peer name q{i} group 4242" for i in range(taken)]
    sb.run(["ip", "-batch", "-"], input="\n".join(lines) + "\n", timeout=120)
    ctrs = make_ctrs(sb, 3)
    before = host_snapshot(sb)
    rc, doc = cli.run("up", batch_file(sb, "three", ctrs))
    assert rc == 1 and {v.get("error") for v in doc.values()} == {too_many}
    assert host_snapshot(sb) == before and read_rules(sb, {}, {}) is None
    assert cli.status() == {"attachments": [], "allocations": {}}
    assert container_ifaces([c.netns for c in ctrs]) == {c.netns: {} for c in ctrs}
    path = batch_file(sb, "two", ctrs[:2])
    assert all("status" in v for v in cli.ok("up", path).values())
    assert len(sb.run(["ip", "-o", "link", "show", "master", BRIDGE]).stdout.splitlines()) == KERNEL_MAX_PORTS
    assert set(statuses(cli.ok("down", path)).values()) == {"removed"}
    sb.run(["ip", "link", "del", "group", "4242"], timeout=120)
    assert sorted(sb.links()) == ["lo", BRIDGE]  # not ours: asyncnet did not create it, so it stays


# --------------------------------------------------------------------------------------------------
# property: random up/down/kill/gc sequences; after every gc the kernel is what the database says


N_PROP = 6
subsets = st.lists(st.integers(0, N_PROP - 1), min_size=1, max_size=N_PROP, unique=True).map(sorted)
fractions = st.integers(0, 10).map(lambda k: k / 10)
# kills of `up` weigh most (the crash the issue is about); gc is appended to every sequence anyway
ops = st.sampled_from(["up", "down", "kill-up", "kill-up", "kill-down", "gc"])
steps = st.lists(st.tuples(ops, subsets, fractions), min_size=2, max_size=5)
EXPLICIT = [
    # a kill mid-`up` next to finished containers, gc, then a kill mid-`down` and a retry on top of it
    [("up", [0, 1], 0.0), ("kill-up", [2, 3, 4, 5], 0.5), ("gc", [], 0.0), ("kill-down", [0, 1], 0.5),
     ("up", [0, 2], 0.0)],
    # kills without gc in between: a retried `up` meets a dead process's intents, `down` clears them
    [("kill-up", [0, 1, 2, 3, 4, 5], 0.3), ("up", [0, 1, 2], 0.0), ("kill-up", [3, 4], 0.9),
     ("down", [0, 3], 0.0)],
]


@pytest.mark.slow
def test_property_random_sequences(sandbox: Sandbox, rule_model: RuleModel) -> None:
    """Random sequences of up / down / kill -9 of up or down / gc over subsets of 6 containers on one
    network; after every gc (and at the end of each sequence) the kernel is exactly what `asyncnet
    status` says, a second gc finds nothing, and `down` of everything leaves nothing.

    A kill waits until the process has written its first journal row (its work has begun: interpreter
    start-up would otherwise swallow most kill moments), then a drawn fraction of the time the rest of
    such a run takes (measured once), then SIGKILL."""
    sb, cli = sandbox, Cli(sandbox)
    ctrs = make_ctrs(sb, N_PROP)
    paths: dict[tuple[int, ...], str] = {}
    everything = batch_file(sb, "all", ctrs)

    def path_for(subset: Sequence[int]) -> str:
        key = tuple(subset)
        if key not in paths:
            paths[key] = batch_file(sb, "s" + "".join(map(str, key)), [ctrs[i] for i in key])
        return paths[key]

    def start_and_wait_for_work(cmd: str, path: str) -> tuple[Proc, float | None]:
        proc = cli.start(cmd, path)
        while proc.popen.poll() is None:
            if rows_written_by(sb, proc.popen.pid):
                return proc, time.monotonic()
            time.sleep(0.002)
        return proc, None

    def calibrate(cmd: str) -> float:
        """How long the rest of a 6-container `cmd` takes once it has written its first journal row."""
        proc, began = start_and_wait_for_work(cmd, everything)
        assert proc.wait()[0] == 0 and began is not None
        return time.monotonic() - began

    window = {"up": calibrate("up"), "down": calibrate("down")}
    log: list[str] = []
    hits: Counter[str] = Counter()

    @settings(max_examples=4 + len(EXPLICIT), deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @seed(SEED)
    @given(steps)
    def run(seq: list[tuple[Any, ...]]) -> None:
        log.append(repr(seq))
        for step in [*seq, ("gc", [], 0.0)]:
            op = step[0]
            if op in ("up", "down"):
                rc, doc = cli.run(op, path_for(step[1]))
                assert rc in (0, 1) and doc is not None, (step, rc)
                if op == "down":
                    assert rc == 0, doc  # never an error, whatever state the containers are in
            elif op.startswith("kill-"):
                cmd = op[5:]
                proc, began = start_and_wait_for_work(cmd, path_for(step[1]))
                if began is not None:
                    time.sleep(step[2] * window[cmd])
                when = "nothing to do" if began is None else "exited" if proc.popen.poll() is not None else "in flight"
                hits[f"{cmd}: {when}"] += 1
                proc.signal(signal.SIGKILL)
                proc.wait()
            else:
                cli.gc()
                assert_kernel_matches_db(sb, cli, ctrs, rule_model)
                assert gc_removed(cli.gc()) == 0, "gc is not idempotent"
        # leave a clean machine for the next sequence
        assert cli.run("down", everything)[0] == 0
        assert_clean(sb, cli, ctrs, rule_model)

    for seq in EXPLICIT:
        run = example(seq)(run)
    t0 = time.monotonic()
    run()
    print(f"\nproperty: {len(log)} sequences in {time.monotonic() - t0:.1f} s; work after the first journal row "
          f"{window}; kills: {dict(hits)}; {log}")
