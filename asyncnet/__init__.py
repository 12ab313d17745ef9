"""asyncnet: netavark's bridge driver for many containers at once, on asyncio.

The public face: the engine, the netavark config types and the errors. Importing this package does not
import pyroute2 or touch the kernel; that happens when an Engine is opened.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import AsyncnetError, ConfigError, FirewallError, MultipleErrors, NamespaceError
from .types import (
    Network,
    NetworkOptions,
    PerNetworkOptions,
    PortMapping,
    StatusBlock,
    loads_network_options,
    parse_network_options,
)

if TYPE_CHECKING:
    from .engine import Container, Engine, Result

__all__ = [
    "AsyncnetError", "ConfigError", "Container", "Engine", "FirewallError", "MultipleErrors", "NamespaceError",
    "Network", "NetworkOptions", "PerNetworkOptions", "PortMapping", "Result", "StatusBlock",
    "loads_network_options", "parse_network_options",
]


def __getattr__(name: str) -> Any:
    """Engine, Container and Result load the I/O layers; only pay for them when asked."""
    if name in ("Engine", "Container", "Result"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'asyncnet' has no attribute {name!r}")
