"""One error hierarchy whose ``str()`` is the netavark-compatible message.

netavark composes messages as ``context: inner`` chains ("create veth pair: interface eth0 already exists
on container namespace: Netlink error: File exists (os error 17)"); podman and netavark's own test-suite
match on those texts, so every layer here adds context the same way instead of inventing new wording.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence


def os_error_text(code: int) -> str:
    """Rust's ``io::Error`` display: ``Read-only file system (os error 30)``."""
    return f"{os.strerror(code)} (os error {code})"


def io_error_text(exc: OSError) -> str:
    """netavark's ``IO error: …`` prefix for an ``std::io::Error``."""
    if exc.errno is not None:
        return f"IO error: {os_error_text(exc.errno)}"
    return f"IO error: {exc.strerror or exc}"


def netlink_error_text(code: int) -> str:
    return f"Netlink error: {os_error_text(abs(code))}"


class AsyncnetError(Exception):
    """Base class. ``code`` carries the errno when the failure came from the kernel."""

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code

    def __str__(self) -> str:
        return self.message

    def wrap(self, context: str) -> AsyncnetError:
        """Return an error of the same class with ``context: `` in front (netavark's ``.wrap()``)."""
        new = type(self).__new__(type(self))
        AsyncnetError.__init__(new, f"{context}: {self.message}", code=self.code)
        return new


class ConfigError(AsyncnetError):
    """Invalid input; raised before anything in the kernel is touched."""


class NamespaceError(AsyncnetError):
    """A namespace path that does not exist or is not a network namespace."""


class NetlinkOpError(AsyncnetError):
    """A netlink request failed; the message says what was being done."""

    @property
    def exists(self) -> bool:
        return self.code == errno.EEXIST


class SysctlError(AsyncnetError):
    pass


class FirewallError(AsyncnetError):
    pass


class DnsError(AsyncnetError):
    pass


class IpamError(AsyncnetError):
    """No address left, or a static address that is not assignable or already someone else's."""


class StateError(AsyncnetError):
    """The state database could not be read or written (the message names the file)."""


class MultipleErrors(AsyncnetError):
    """Several independent failures (teardown keeps going and reports them all)."""

    def __init__(self, errors: Sequence[AsyncnetError]) -> None:
        self.errors = list(errors)
        text = "netavark encountered multiple errors:" + "".join(f"\n\t- {e}" for e in self.errors)
        super().__init__(text)


def combine(errors: Sequence[AsyncnetError]) -> AsyncnetError | None:
    """netavark's rule: no error → None, one → itself, several → the multiple-errors list."""
    if not errors:
        return None
    if len(errors) == 1:
        return errors[0]
    return MultipleErrors(errors)
