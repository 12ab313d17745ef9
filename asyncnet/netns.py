"""Network namespace handles and running blocking work inside one from a worker thread.

``setns()`` is per thread, so a worker thread can enter a namespace, do one blocking thing (create a
netlink socket, write a sysctl, call libnftables) and come back without affecting the event loop
thread. This is what makes "the host" a parameter: the engine's host namespace may be a test's private
namespace while the process itself stays where it is. pyroute2's own ``netns=`` forks a child per socket
and silently creates missing namespaces, which is why we do not use it.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import anyio.to_thread

from .errors import NamespaceError, io_error_text

CLONE_NEWNET = 0x40000000
MS_BIND = 4096
MNT_DETACH = 2
NS_GET_NSTYPE = 0xB703
NETNS_RUN_DIR = "/run/netns"

_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")


def _check(ret: int, what: str) -> None:
    if ret != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def setns(fd: int) -> None:
    _check(_libc.setns(fd, CLONE_NEWNET), "setns")


@dataclass(frozen=True)
class Netns:
    """A network namespace named by a path; ``path=None`` is the namespace of the calling process."""

    path: str | None = None

    @classmethod
    def from_ref(cls, ref: str | None) -> Netns:
        """A bare name means ``/run/netns/NAME`` (the `ip netns` convention)."""
        if ref is None:
            return cls(None)
        if "/" not in ref:
            return cls(os.path.join(NETNS_RUN_DIR, ref))
        return cls(ref)

    def open(self) -> int:
        """An O_RDONLY fd on the namespace; raises ``invalid namespace path: …`` when it is not one."""
        path = self.path or "/proc/self/ns/net"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise NamespaceError(f"invalid namespace path: {io_error_text(exc)}", code=exc.errno) from None
        try:
            _check_is_netns(fd)
        except NamespaceError:
            os.close(fd)
            raise
        return fd

    def __str__(self) -> str:
        return self.path or "<current>"


def _check_is_netns(fd: int) -> None:
    """NS_GET_NSTYPE answers CLONE_NEWNET only for a network namespace (a plain file gets ENOTTY)."""
    try:
        nstype = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError:
        nstype = -1
    if nstype != CLONE_NEWNET:
        raise NamespaceError(f"invalid namespace path: {io_error_text(OSError(errno.EINVAL, ''))}",
                             code=errno.EINVAL)


def run_in_netns_sync(netns_fd: int | None, fn: Callable[[], T]) -> T:
    """Run ``fn`` in the calling thread with its netns switched to ``netns_fd``, then switch back.

    Must be called from a worker thread (never the event loop). If switching back fails the thread is
    unusable, so we raise rather than hand a thread in the wrong namespace back to the pool.
    """
    if netns_fd is None:
        return fn()
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(netns_fd)
        try:
            return fn()
        finally:
            setns(own)
    finally:
        os.close(own)


async def run_in_netns(netns_fd: int | None, fn: Callable[[], T]) -> T:
    return await anyio.to_thread.run_sync(run_in_netns_sync, netns_fd, fn)


def _on_fresh_thread(fn: Callable[[], T]) -> T:
    """unshare() changes the calling thread for good, so do it on a throwaway thread."""
    box: dict[str, object] = {}

    def body() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            box["error"] = exc

    t = threading.Thread(target=body, name="asyncnet-netns")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def create_netns_at(path: str) -> None:
    """Create a new network namespace and keep it alive by bind-mounting it on ``path``.

    Like ``ip netns add`` but at any path, so tests can keep their namespaces in a private directory.
    """

    def body() -> None:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o444)
        os.close(fd)
        try:
            _check(_libc.unshare(CLONE_NEWNET), "unshare")
            _check(_libc.mount(b"/proc/thread-self/ns/net", path.encode(), None, MS_BIND, None), "mount")
        except OSError:
            os.unlink(path)
            raise

    _on_fresh_thread(body)


def delete_netns_at(path: str) -> None:
    """Unmount and remove a namespace file made by :func:`create_netns_at` (or ``ip netns add``)."""
    if _libc.umount2(path.encode(), MNT_DETACH) != 0:
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOENT):
            raise OSError(code, f"umount {path}: {os.strerror(code)}")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def create_named_netns(name: str) -> str:
    """``ip netns add NAME`` semantics: /run/netns made a shared mount point, then the bind mount."""
    import subprocess

    path = os.path.join(NETNS_RUN_DIR, name)
    if os.path.exists(path):
        return path
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    return path
