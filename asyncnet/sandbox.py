"""Throwaway namespaces for tests, the demo and the benchmark.

A Sandbox owns a directory holding a private "host" namespace and any number of container namespaces
(bind-mounted files, not /run/netns names), so that nothing it does is visible in the machine's real
host namespace and two sandboxes cannot see each other. ``close()`` removes every namespace it made;
the kernel then destroys every link, address, route and nftables table inside them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .netns import create_netns_at, delete_netns_at


class Sandbox:
    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self._own_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="asyncnet-sb-"))
        (self.root / "ns").mkdir(parents=True, exist_ok=True)
        self.config_dir = self.root / "config"
        self.config_dir.mkdir(exist_ok=True)
        self.namespaces: list[str] = []
        self.host = self.netns("host")
        self.run(["ip", "link", "set", "lo", "up"])

    def netns(self, name: str) -> str:
        """Create a namespace file under the sandbox and return its path."""
        path = str(self.root / "ns" / name)
        create_netns_at(path)
        self.namespaces.append(path)
        return path

    def remove_netns(self, path: str) -> None:
        delete_netns_at(path)
        self.namespaces.remove(path)

    def run(self, cmd: Sequence[str], ns: str | None = None, *, check: bool = True, timeout: float = 30,
            input: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command inside ``ns`` (default: the sandbox host) with nsenter."""
        full = ["nsenter", f"--net={ns or self.host}", *cmd]
        return subprocess.run(full, check=check, capture_output=True, text=True, timeout=timeout,
                              input=input, env=env)

    def links(self, ns: str | None = None) -> list[str]:
        out = self.run(["ip", "-o", "link", "show"], ns).stdout
        return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if line.strip()]

    def nft_tables(self, ns: str | None = None) -> list[str]:
        return [line for line in self.run(["nft", "list", "tables"], ns).stdout.splitlines() if line]

    def close(self) -> None:
        for path in reversed(self.namespaces):
            try:
                delete_netns_at(path)
            except OSError:
                pass
        self.namespaces.clear()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
