"""Hermetic fixtures: every networking test gets a private host namespace and a leak check after it."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from asyncnet.sandbox import Sandbox


def _real_host_snapshot() -> tuple[list[str], str, str]:
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    names = sorted(line.split(":")[1].strip().split("@")[0] for line in links.splitlines())
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return names, tables, netns


@pytest.fixture
def sandbox(tmp_path) -> Iterator[Sandbox]:
    """A private host namespace (``sandbox.host``) under tmp_path; container namespaces via ``.netns()``.

    After the test: the machine's real host namespace must look exactly as before (no link, nft table
    or named netns appeared), and no process of the test may still run inside the sandbox.
    """
    before = _real_host_snapshot()
    sb = Sandbox(tmp_path / "sb")
    try:
        yield sb
    finally:
        leftovers = _pids_in(sb)
        for pid in leftovers:
            subprocess.run(["kill", "-9", str(pid)], capture_output=True)
        sb.close()
    after = _real_host_snapshot()
    assert after == before, f"test leaked into the real host namespace: {before} -> {after}"
    assert not leftovers, f"processes left running in the sandbox: {leftovers}"


def _pids_in(sb: Sandbox) -> list[int]:
    """PIDs whose network namespace is one of the sandbox's (e.g. a forgotten aardvark-dns)."""
    import os

    inodes = set()
    for path in sb.namespaces:
        try:
            inodes.add(os.stat(path).st_ino)
        except OSError:
            pass
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if os.stat(f"/proc/{entry}/ns/net").st_ino in inodes:
                pids.append(int(entry))
        except OSError:
            continue
    return pids
