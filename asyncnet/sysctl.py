"""sysctl writes, only when the value differs, inside whatever namespace the calling thread is in.

Write-if-different is what lets a container run with a read-only /proc that already has the right
values (podman's rootless and `--read-only` cases). Callers batch many writes into one worker-thread
hop: the hop, not the write, is the cost.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable

from .errors import SysctlError, os_error_text

SysctlWrite = tuple[str, str, bool]  # (path below /proc/sys, value, tolerate missing / read-only)


def write_sysctls_sync(writes: Iterable[SysctlWrite]) -> None:
    """Apply writes in order in the calling thread's network namespace (run it via run_in_netns)."""
    for key, value, tolerant in writes:
        path = f"/proc/sys/{key}"
        try:
            with open(path) as f:
                if f.read().strip() == value:
                    continue
            with open(path, "w") as f:
                f.write(value)
        except OSError as exc:
            if tolerant and exc.errno in (errno.ENOENT, errno.EROFS):
                continue
            code = exc.errno or errno.EIO
            raise SysctlError(f"Sysctl error: IO Error: {os_error_text(code)}", code=code) from None
