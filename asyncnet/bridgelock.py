"""Per-bridge locks between engines and processes: setups share one, deleting a bridge takes it alone.

Without them a teardown can find a bridge without ports, a concurrent setup can then put its veth on it,
and the teardown's delete detaches that fresh veth: the setup reports success and its container has no
network (seen in about 1 of 40 setup/teardown races in one process). netavark has the same window and
relies on podman's lock; asyncnet callers run concurrently by design.

``flock(2)`` on one file per bridge under ``<config dir>/locks``: shared by every engine and process using
that directory, released by the kernel when a holder dies. Waiting polls with ``LOCK_NB`` on the event
loop (a few syscalls), so waiters neither block the loop nor tie up worker threads that the holders need.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio

LOCK_DIR = "locks"


class BridgeLocks:
    def __init__(self, config_dir: Path) -> None:
        self.directory = config_dir / LOCK_DIR

    @asynccontextmanager
    async def hold(self, bridges: Iterable[str], *, exclusive: bool) -> AsyncIterator[None]:
        """Hold the locks of ``bridges`` (taken in sorted order, so two holders cannot deadlock)."""
        fds: list[int] = []
        try:
            for name in sorted(set(bridges)):
                self.directory.mkdir(parents=True, exist_ok=True)
                fds.append(os.open(self.directory / f"{name}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
                await _flock(fds[-1], fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            for fd in fds:
                os.close(fd)  # releases the lock


async def _flock(fd: int, op: int) -> None:
    delay = 0.001
    while True:
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.02)
