"""The benchmarks still run and measure what they say (tiny N: seconds, not a performance test).

The numbers in the README come from these scripts; a bench that rots silently would leave them
unreproducible. Both run in private namespaces of their own, like the rest of the suite.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bulk_bench_runs_every_system_and_verifies(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--n", "4", "--repeat", "1", "--networks", "2",
         "--ports-per-container", "1", "--systems", "asyncnet,asyncnet+nft,floor,floor+nft",
         "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    [report] = tmp_path.glob("bench-*.json")
    assert list(tmp_path.glob("bench-*.png")), "no plot"
    doc = json.loads(report.read_text())
    rows = {r["system"]: r for r in doc["summary"]}
    assert set(rows) == {"asyncnet", "asyncnet+nft", "floor", "floor+nft"}
    assert all(r["failed"] == 0 for r in rows.values()), rows
    for r in doc["rounds"]:
        assert r["ok"] and r["verify"], r["spec"]["system"]
    # a batch's per-container latencies: one per container, within the batch's own time
    [asn] = [r for r in doc["rounds"] if r["spec"]["system"] == "asyncnet"]
    assert len(asn["setup_lat_s"]) == 4 and 0 < max(asn["setup_lat_s"]) <= asn["setup_s"]
    assert rows["asyncnet+nft"]["fw_commit_ms"] > 0 and rows["floor+nft"]["fw_commit_ms"] > 0
    assert "* one batch" in proc.stdout


def test_firewall_bench_commits_the_same_rules_both_ways() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "firewall_commit.py"), "-n", "20", "-r", "1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    summary = doc["summary"]
    assert doc["rules"] == 20 * 2 * 4 + 14  # netavark's fixed rules, the network's, 4 per port
    assert summary["commit"]["commands"] == summary["commit_prepared"]["commands"] > 20 * 2 * 4
    assert summary["kernel"]["wall_ms"]["median"] > 0 and summary["floor"]["wall_ms"]["median"] > 0
