"""``asyncnet up|down|status``: the bulk command line, run as a process the way a batch runner runs it.

The CLI runs under ``nsenter --net=<sandbox host>``. Bare namespace names mean ``/run/netns/NAME``; to
create those without them ever showing in the machine's ``ip netns list``, every step of a scenario runs
inside one private mount namespace (``unshare -m``) with a tmpfs over ``/run`` (this machine has no
``/run/netns`` to mount on, and nothing else under ``/run`` is needed). When that shell exits the mount
namespace goes, and with it any namespace a failing step could have left.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _bridge_util import cid, ip_json, network, ping

from asyncnet.sandbox import Sandbox
from asyncnet.state import State

ASYNCNET = str(Path(sys.executable).parent / "asyncnet")
F_SETPIPE_SZ = 1031
NET_A = network("neta", "asn0", subnets=[("10.90.0.0/16", "10.90.0.1"), ("fd90:0:a::/64", "fd90:0:a::1")],
                net_id="a1" * 32)
NET_B = network("netb", "asn1", subnets=[("10.91.0.0/24", "10.91.0.1")], net_id="b2" * 32)


@dataclass
class Step:
    rc: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def entry(netns: str, n: int, nets: list[str], **per: Any) -> dict[str, Any]:
    return {"netns": netns, "container_id": cid(n), "container_name": f"ctr{n}",
            "networks": {name: {"interface_name": f"eth{i}", **per} for i, name in enumerate(nets)}}


def write_batch(path: Path, containers: list[dict[str, Any]]) -> str:
    path.write_text(json.dumps({"networks": {"neta": NET_A, "netb": NET_B}, "containers": containers}))
    return str(path)


def scenario(sb: Sandbox, work: Path, steps: list[tuple[str, list[str]]]) -> dict[str, Step]:
    """Run ``steps`` (label, argv) one after the other in ONE private mount namespace with an empty
    ``/run/netns``; ``{ASYNCNET}`` and ``{HOST}`` in argv stand for the CLI run in the sandbox host."""
    lines = ["mount -t tmpfs tmpfs /run && mkdir /run/netns || exit 99"]
    for label, argv in steps:
        words = []
        for a in argv:
            if a == "{ASYNCNET}":
                words += ["nsenter", f"--net={sb.host}", ASYNCNET]
            else:
                words.append(a)
        lines.append(f"{shlex.join(words)} >{work / label}.out 2>{work / label}.err; echo $? >{work / label}.rc")
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", "\n".join(lines)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc
    return {label: Step(int((work / f"{label}.rc").read_text()), (work / f"{label}.out").read_text(),
                        (work / f"{label}.err").read_text()) for label, _ in steps}


def status_shape(block: dict[str, Any], ifname: str) -> list[str]:
    """The ipnets of a StatusBlock's one interface, after checking netavark's StatusBlock layout."""
    assert block["dns_search_domains"] == [] and block["dns_server_ips"] == []
    [(name, iface)] = block["interfaces"].items()
    assert name == ifname and len(iface["mac_address"].split(":")) == 6
    return [s["ipnet"] for s in iface["subnets"]]


def test_up_status_down_with_named_namespaces(sandbox: Sandbox, tmp_path: Path) -> None:
    cfg = str(sandbox.config_dir)
    a, b, c, d, e, f, g = (entry(f"bulk-{x}", n, nets) for x, n, nets in (
        ("a", 1, ["neta"]), ("b", 2, ["neta"]), ("c", 3, ["neta", "netb"]), ("d", 4, ["netb"]),
        ("e", 5, ["nope"]), ("f", 6, ["netb"]), ("g", 7, ["neta"])))
    f["networks"]["netb"]["static_ips"] = ["10.91.0.50"]
    d["networks"]["netb"]["static_ips"] = ["10.91.0.50"]
    # e: network not defined in the batch (caught by the batch parser); f: the static address d holds
    first = write_batch(tmp_path / "first.json", [a, b, c, e])
    second = write_batch(tmp_path / "second.json", [d])
    third = write_batch(tmp_path / "third.json", [f])
    everything = write_batch(tmp_path / "all.json", [a, b, c, d, f, g])
    broken = write_batch(tmp_path / "broken.json", [e])
    probe_a = ["nsenter", "--net=/run/netns/bulk-a", "ip", "-j", "addr", "show", "dev", "eth0"]
    probe_c = ["nsenter", "--net=/run/netns/bulk-c", "ip", "-j", "addr", "show"]
    ping_b = ["nsenter", "--net=/run/netns/bulk-a", "ping", "-c", "1", "-W", "2", "-q", "10.90.0.3"]
    steps = scenario(sandbox, tmp_path, [
        ("up1", ["{ASYNCNET}", "up", "--config", cfg, "--create-netns", first]),
        ("up2", ["{ASYNCNET}", "up", "--config", cfg, "--create-netns", second]),
        ("up3", ["{ASYNCNET}", "up", "--config", cfg, "--create-netns", third]),
        ("ls_up", ["ls", "/run/netns"]),
        ("probe_a", probe_a),
        ("probe_c", probe_c),
        ("ping", ping_b),
        ("status", ["{ASYNCNET}", "status", "--config", cfg]),
        ("down", ["{ASYNCNET}", "down", "--config", cfg, "--create-netns", everything]),
        ("ls_down", ["ls", "/run/netns"]),
        ("status_down", ["{ASYNCNET}", "status", "--config", cfg]),
        ("down_broken", ["{ASYNCNET}", "down", "--config", cfg, broken]),
    ])

    # up: one object keyed by container id; a failed container makes the exit status 1
    up1 = steps["up1"]
    assert up1.rc == 1, up1
    doc = up1.json()
    assert sorted(doc) == sorted([cid(1), cid(2), cid(3), cid(5)])
    assert list(doc[cid(5)]) == ["error"] and "nope" in doc[cid(5)]["error"]
    assert status_shape(doc[cid(1)]["status"]["neta"], "eth0") == ["10.90.0.2/16", "fd90:0:a::2/64"]
    assert status_shape(doc[cid(2)]["status"]["neta"], "eth0") == ["10.90.0.3/16", "fd90:0:a::3/64"]
    assert sorted(doc[cid(3)]["status"]) == ["neta", "netb"]
    assert status_shape(doc[cid(3)]["status"]["netb"], "eth1") == ["10.91.0.2/24"]
    assert steps["up2"].rc == 0 and list(steps["up2"].json()) == [cid(4)]
    assert status_shape(steps["up2"].json()[cid(4)]["status"]["netb"], "eth0") == ["10.91.0.50/24"]
    up3 = steps["up3"]
    assert up3.rc == 1 and list(up3.json()) == [cid(6)]
    assert "10.91.0.50" in up3.json()[cid(6)]["error"]
    for label in ("up1", "up2", "up3", "status", "down", "status_down"):
        assert steps[label].err == "", (label, steps[label].err)  # not a terminal: no progress bar

    # --create-netns made exactly the named namespaces of parsed containers, and they are networked
    assert steps["ls_up"].out.split() == ["bulk-a", "bulk-b", "bulk-c", "bulk-d", "bulk-f"]
    [eth0] = json.loads(steps["probe_a"].out)
    assert eth0["address"] == doc[cid(1)]["status"]["neta"]["interfaces"]["eth0"]["mac_address"]
    assert {f"{x['local']}/{x['prefixlen']}" for x in eth0["addr_info"] if x["scope"] != "link"} == {
        "10.90.0.2/16", "fd90:0:a::2/64"}
    assert sorted(i["ifname"] for i in json.loads(steps["probe_c"].out)) == ["eth0", "eth1", "lo"]
    assert steps["ping"].rc == 0, steps["ping"]

    # status: what the state knows
    assert steps["status"].rc == 0
    st = steps["status"].json()
    assert sorted((x["container_id"], x["network"], x["phase"]) for x in st["attachments"]) == [
        (cid(1), "neta", "done"), (cid(2), "neta", "done"), (cid(3), "neta", "done"), (cid(3), "netb", "done"),
        (cid(4), "netb", "done")]
    assert {x["netns"] for x in st["attachments"]} == {f"/run/netns/bulk-{x}" for x in "abcd"}
    assert sorted(x["address"] for x in st["allocations"]["neta"]) == [
        "10.90.0.2", "10.90.0.3", "10.90.0.4", "fd90:0:a::2", "fd90:0:a::3", "fd90:0:a::4"]

    # down: removed / not set up (not an error, exit 0), and the named namespaces are deleted
    down = steps["down"]
    assert down.rc == 0, down
    assert down.json() == {cid(1): {"status": "removed"}, cid(2): {"status": "removed"},
                           cid(3): {"status": "removed"}, cid(4): {"status": "removed"},
                           cid(6): {"status": "not set up"}, cid(7): {"status": "not set up"}}
    assert steps["ls_down"].out == ""
    assert steps["status_down"].json() == {"attachments": [], "allocations": {}}
    assert steps["down_broken"].rc == 1 and list(steps["down_broken"].json()) == [cid(5)]

    assert sorted(sandbox.links()) == ["lo"]
    assert "nv_" not in sandbox.run(["nft", "list", "ruleset"]).stdout


def test_host_netns_option_and_paths(sandbox: Sandbox, tmp_path: Path) -> None:
    """``--host-netns`` instead of nsenter, absolute namespace paths: a second ``down`` finds nothing set up
    and says so with exit 0; a second ``up`` of the same containers is an error for each of them."""
    nss = [sandbox.netns(f"c{i}") for i in range(6)]
    batch = write_batch(tmp_path / "b.json", [entry(ns, i, ["neta"] if i % 2 else ["netb"])
                                              for i, ns in enumerate(nss)])
    base = [ASYNCNET]

    def cli(*args: str) -> Step:
        proc = subprocess.run([*base, args[0], "--config", str(sandbox.config_dir), "--host-netns", sandbox.host,
                               *args[1:]], capture_output=True, text=True, timeout=60)
        return Step(proc.returncode, proc.stdout, proc.stderr)

    up = cli("up", batch)
    assert up.rc == 0 and up.err == "", up
    doc = up.json()
    assert sorted(doc) == sorted(cid(i) for i in range(6))
    assert all(list(v) == ["status"] for v in doc.values())
    assert ip_json(sandbox, ["link", "show", "master", "asn0"]) and ip_json(sandbox, ["link", "show", "master", "asn1"])
    assert ping(sandbox, nss[1], "10.90.0.1") and ping(sandbox, nss[0], "10.91.0.1")

    again = cli("up", batch)
    assert again.rc == 1
    assert all("already set up" in v["error"] for v in again.json().values()), again.json()

    down = cli("down", batch)
    assert down.rc == 0 and down.err == "", down
    assert down.json() == {cid(i): {"status": "removed"} for i in range(6)}
    down2 = cli("down", batch)
    assert down2.rc == 0, down2
    assert down2.json() == {cid(i): {"status": "not set up"} for i in range(6)}
    assert sorted(sandbox.links()) == ["lo"]
    assert all(sandbox.links(ns) == ["lo"] for ns in nss)


@pytest.mark.parametrize("content,expected", [
    ("{not json", "invalid batch JSON"),
    ('{"networks": {}}', "missing required field `containers`"),
])
def test_malformed_batch_file(sandbox: Sandbox, tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    proc = subprocess.run([ASYNCNET, "up", "--config", str(sandbox.config_dir), "--host-netns", sandbox.host,
                           str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr == ""
    doc = json.loads(proc.stdout)
    assert list(doc) == ["error"] and expected in doc["error"]


def test_progress_bar_on_a_terminal(sandbox: Sandbox, tmp_path: Path) -> None:
    """stderr a terminal, stdout a pipe (a batch runner watched by a human): the bar goes to stderr and
    reaches 100% even when a container fails before the kernel work; stdout is the JSON report alone."""
    nss = [sandbox.netns(f"c{i}") for i in range(8)]
    containers = [entry(ns, i, ["netb"]) for i, ns in enumerate(nss)]
    containers[3]["networks"]["netb"]["static_ips"] = ["10.91.0.9"]
    containers[5]["networks"]["netb"]["static_ips"] = ["10.91.0.9"]  # taken by container 3: IPAM error
    batch = write_batch(tmp_path / "b.json", containers)
    for command in ("up", "down"):
        master, slave = pty.openpty()
        try:
            proc = subprocess.run([ASYNCNET, command, "--config", str(sandbox.config_dir), "--host-netns",
                                   sandbox.host, batch], stdout=subprocess.PIPE, stderr=slave, timeout=60)
            os.close(slave)
            err = b""
            while True:
                try:
                    chunk = os.read(master, 1 << 16)
                except OSError:  # EIO: the other side is closed
                    break
                if not chunk:
                    break
                err += chunk
        finally:
            os.close(master)
        assert proc.stdout.startswith(b"{"), proc.stdout[:200]
        doc = json.loads(proc.stdout)
        assert len(doc) == 8
        assert proc.returncode == (1 if command == "up" else 0)
        assert command.encode() in err and b"100%" in err, err[-400:]
    assert sorted(sandbox.links()) == ["lo"]


def _up_and_signal(sb: Sandbox, batch: str, fire: Callable[[State], bool]) -> tuple[int, str]:
    """``asyncnet up`` with stdout on a 4 KiB pipe nobody reads yet; SIGTERM as soon as ``fire(state)``
    says so, then let the report sit in the full pipe for a moment before draining it."""
    r, w = os.pipe()
    fcntl.fcntl(w, F_SETPIPE_SZ, 4096)
    proc = subprocess.Popen([ASYNCNET, "up", "--config", str(sb.config_dir), "--host-netns", sb.host, batch],
                            stdout=w, stderr=subprocess.DEVNULL)
    os.close(w)
    try:
        deadline = time.monotonic() + 60
        with State.open(sb.config_dir) as state:
            while not fire(state):
                assert time.monotonic() < deadline and proc.poll() is None, "never reached the signal point"
                time.sleep(0.001)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        out = b""
        while chunk := os.read(r, 1 << 16):
            out += chunk
        return proc.wait(timeout=60), out.decode()
    finally:
        os.close(r)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_during_up(sandbox: Sandbox, tmp_path: Path) -> None:
    """SIGTERM while the kernel work runs: the batch is rolled back and every container says so (exit
    143). SIGTERM after the batch is set up, while the report is stuck in a full pipe: the complete, true
    report (the containers ARE set up), not a report cut short by the signal's default action or rewritten
    to "rolled back" (both happened before)."""
    n = 100
    nss = [sandbox.netns(f"c{i}") for i in range(n)]
    batch = write_batch(tmp_path / "b.json", [entry(ns, i, ["neta"] if i % 2 else ["netb"])
                                              for i, ns in enumerate(nss)])

    rc, out = _up_and_signal(sandbox, batch, lambda st: bool(st.list_attachments(phase="intent")))
    assert rc == 128 + signal.SIGTERM
    doc = json.loads(out)
    assert doc == {cid(i): {"error": "interrupted by signal 15; batch rolled back"} for i in range(n)}
    assert sorted(sandbox.links()) == ["lo"]
    assert "nv_" not in sandbox.run(["nft", "list", "ruleset"]).stdout
    with State.open(sandbox.config_dir) as st:
        assert st.list_attachments() == [] and st.list_allocations() == []

    rc, out = _up_and_signal(sandbox, batch, lambda st: len(st.list_attachments(phase="done")) == n)
    assert rc in (0, 128 + signal.SIGTERM)  # nothing was interrupted; the signal may be noticed or not
    doc = json.loads(out)
    assert sorted(doc) == sorted(cid(i) for i in range(n))
    assert all(list(v) == ["status"] for v in doc.values()), [v for v in doc.values() if "error" in v][:2]
    assert len(sandbox.links()) == 1 + 2 + n

    down = subprocess.run([ASYNCNET, "down", "--config", str(sandbox.config_dir), "--host-netns", sandbox.host,
                           batch], capture_output=True, text=True, timeout=60)
    assert down.returncode == 0, down
    assert sorted(sandbox.links()) == ["lo"]
