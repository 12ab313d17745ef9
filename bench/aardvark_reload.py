"""What aardvark-dns (1.4.0 on Debian 12) does on reload, measured in a private sandbox.

    .venv/bin/python bench/aardvark_reload.py [--reloads 20] [--entries 1000]

1. commit() latency through asyncnet.dns (start with N entries, reload adding N more, stop).
2. SIGHUP vs restart: time until every listener is bound again, and what a client querying flat out
   from a container sees (timeouts / refusals per event).
3. Why temp files must not live in the watched directory: back-to-back reloads with the temp file
   written inside ``aardvark-dns/`` (then renamed) vs outside it; how often the daemon exits.

Everything runs in sandbox namespaces; the daemons are started by this script and killed by pid.
"""

from __future__ import annotations

import argparse
import ctypes
import ipaddress
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from asyncnet.dns import Aardvark, DnsEntry, DnsNetwork, _udp_sockets_sync  # noqa: E402
from asyncnet.netns import Netns, run_in_netns_sync  # noqa: E402
from asyncnet.sandbox import Sandbox  # noqa: E402

BINARY = "/usr/lib/podman/aardvark-dns"
PR_SET_CHILD_SUBREAPER = 36


def build(sb: Sandbox, nets: int, ctrs_per_net: int = 1) -> list[list[str]]:
    """Bridges br<n> with 10.9<n>.0.1/16 + fd9<n>::1/64 and containers on each."""
    out = []
    for n in range(nets):
        cmds = [f"link add br{n} type bridge", f"addr add 10.9{n}.0.1/16 dev br{n}",
                f"addr add fd9{n}::1/64 dev br{n} nodad", f"link set br{n} up"]
        names = []
        for i in range(ctrs_per_net):
            ns = sb.netns(f"n{n}c{i}")
            cmds += [f"link add v{n}c{i} type veth peer name eth0 netns {ns}", f"link set v{n}c{i} master br{n} up"]
            names.append(ns)
        sb.run(["ip", "-batch", "-"], input="\n".join(cmds) + "\n")
        for i, ns in enumerate(names):
            sb.run(["ip", "-batch", "-"], ns, input=f"addr add 10.9{n}.0.{i + 2}/16 dev eth0\n"
                   f"addr add fd9{n}::{i + 2:x}/64 dev eth0 nodad\nlink set eth0 up\nlink set lo up\n")
        out.append(names)
    return out


def ask(sock: socket.socket, name: str, want: bytes, timeout: float) -> str:
    """One A query on a connected UDP socket: ok / nx / refused / timeout."""
    qid = random.randrange(65536)
    pkt = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for part in name.split("."):
        pkt += bytes([len(part)]) + part.encode()
    pkt += b"\0" + struct.pack(">HH", 1, 1)
    sock.settimeout(timeout)
    try:
        sock.send(pkt)
        while True:
            data = sock.recv(4096)
            if struct.unpack(">H", data[:2])[0] == qid:
                return "ok" if want in data[12:] else "nx"
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "timeout"


def entry(n: int, i: int, name: str) -> DnsEntry:
    net = DnsNetwork(f"net{n}", (ipaddress.ip_address(f"10.9{n}.0.1"), ipaddress.ip_address(f"fd9{n}::1")))
    v4 = ipaddress.IPv4Address(f"10.9{n}.{2 + i // 250}.{2 + i % 250}")
    return DnsEntry(net, f"id{n}x{i}", (v4,), (), (name,))


async def bench_commit(entries: int) -> None:
    with Sandbox() as sb:
        build(sb, 1, 0)
        a = Aardvark(sb.config_dir, BINARY, 53, Netns(sb.host))
        batch1 = [entry(0, i, f"c{i}") for i in range(entries)]
        batch2 = [entry(0, entries + i, f"c{entries + i}") for i in range(entries)]
        t0 = time.monotonic()
        await a.commit(add=batch1)
        t1 = time.monotonic()
        await a.commit(add=batch2)
        t2 = time.monotonic()
        await a.commit(remove=[(e.network.name, e.container_id) for e in batch1 + batch2])
        t3 = time.monotonic()
        print(f"commit: start with {entries} entries {1000 * (t1 - t0):.1f} ms; reload +{entries} "
              f"{1000 * (t2 - t1):.1f} ms; remove all + stop {1000 * (t3 - t2):.1f} ms")


def spawn(sb: Sandbox, cfg: Path) -> int:
    subprocess.run(["nsenter", f"--net={sb.host}", BINARY, "--config", str(cfg), "-p", "53", "run"], check=True,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while True:
        try:
            return int((cfg / "aardvark.pid").read_text())
        except (FileNotFoundError, ValueError):
            time.sleep(0.0005)


def bound(pid: int) -> set[int]:
    socks = _udp_sockets_sync(pid) or {}
    return {i for (_, port), inos in socks.items() if port == 53 for i in inos}


def bench_hup_vs_restart(reloads: int, entries: int, nets: int = 3) -> None:
    for mode in ("sighup", "restart"):
        with Sandbox() as sb:
            _one_mode(sb, mode, reloads, entries, nets)


def _one_mode(sb: Sandbox, mode: str, reloads: int, entries: int, nets: int) -> None:
    ctrs = build(sb, nets)
    cfg = sb.config_dir / "aardvark-dns"
    cfg.mkdir()
    files = {n: [f"10.9{n}.0.1,fd9{n}::1", f"id{n} 10.9{n}.0.2 fd9{n}::2 c{n}"]
             + [f"f{n}x{i} 10.9{n}.{1 + i // 250}.{i % 250 + 2}  filler{i}" for i in range(entries)]
             for n in range(nets)}

    def write(n: int) -> None:
        tmp = sb.config_dir / f".n{n}.tmp"
        tmp.write_text("\n".join(files[n]) + "\n")
        os.rename(tmp, cfg / f"n{n}")

    for n in range(nets):
        write(n)
    pid = spawn(sb, cfg)
    while len(bound(pid)) < 2 * nets:
        time.sleep(0.001)
    stop = threading.Event()
    seen: Counter[str] = Counter()

    def prober() -> None:
        fd = Netns(ctrs[0][0]).open()

        def mk() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.connect(("10.90.0.1", 53))
            return s
        s = run_in_netns_sync(fd, mk)
        os.close(fd)
        while not stop.is_set():
            seen[ask(s, "c0", bytes([10, 90, 0, 2]), 0.2)] += 1
            time.sleep(0.0005)
        s.close()

    th = threading.Thread(target=prober)
    th.start()
    time.sleep(0.2)
    ready = []
    for r in range(reloads):
        files[0].append(f"x{r} 10.90.0.{r + 10}  new{r}")
        write(0)
        old = bound(pid)
        t = time.monotonic()
        if mode == "sighup":
            os.kill(pid, signal.SIGHUP)
            while True:
                now = bound(pid)
                if len(now) == 2 * nets and not now & old:
                    break
                time.sleep(0.0005)
        else:
            os.kill(pid, signal.SIGTERM)
            os.waitpid(pid, 0)
            (cfg / "aardvark.pid").unlink()
            pid = spawn(sb, cfg)
            while len(bound(pid)) < 2 * nets:
                time.sleep(0.0005)
        ready.append(time.monotonic() - t)
        time.sleep(0.3)
    stop.set()
    th.join()
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    ready.sort()
    lost = seen["timeout"] + seen["refused"]
    print(f"{mode:8s} {nets} dual-stack nets, {entries} entries/net: all listeners bound again after "
          f"median {1000 * ready[len(ready) // 2]:.1f} ms (max {1000 * ready[-1]:.1f}); prober: "
          f"{dict(seen)} = {lost / reloads:.1f} failed queries per event")


def bench_tempfile_placement(reloads: int = 20, trials: int = 8) -> None:
    with Sandbox() as sb:
        build(sb, 1)
        cfg = sb.config_dir / "aardvark-dns"
        cfg.mkdir()
        for place, tmpdir in (("inside aardvark-dns/", cfg), ("outside (config dir)", sb.config_dir)):
            outcome: Counter[str] = Counter()
            for trial in range(trials):
                lines = ["10.90.0.1,fd90::1", "id0 10.90.0.2 fd90::2 c0"]
                (cfg / "n0").write_text("\n".join(lines) + "\n")
                pid = spawn(sb, cfg)
                for i in range(reloads):
                    lines.append(f"x{trial}y{i} 10.90.1.{i + 2}  n{i}")
                    tmp = tmpdir / ".n0.tmp"
                    tmp.write_text("\n".join(lines) + "\n")
                    os.rename(tmp, cfg / "n0")
                    os.kill(pid, signal.SIGHUP)
                time.sleep(0.5)
                done, status = os.waitpid(pid, os.WNOHANG)
                if done == 0:
                    outcome["alive"] += 1
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                else:
                    outcome[f"exited {os.waitstatus_to_exitcode(status)}"] += 1
                (cfg / "aardvark.pid").unlink(missing_ok=True)
            print(f"{reloads} back-to-back reloads, temp file {place}: {dict(outcome)} of {trials}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reloads", type=int, default=20)
    p.add_argument("--entries", type=int, default=1000)
    args = p.parse_args()
    if not os.access(BINARY, os.X_OK):
        raise SystemExit(f"{BINARY} not installed")
    # become the reaper of the daemons we start, so their exit status can be read
    ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    print(subprocess.run([BINARY, "--version"], capture_output=True, text=True).stdout.strip())
    for n in (100, args.entries):
        anyio.run(bench_commit, n)
    for entries in (0, args.entries):
        bench_hup_vs_restart(args.reloads, entries)
    bench_tempfile_placement()


if __name__ == "__main__":
    main()
