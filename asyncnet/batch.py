"""The bulk batch file: shared network definitions plus many containers, each checked on its own.

One bad container must not stop the other 999, so parse errors are collected per container id
instead of failing the file (only a malformed file as a whole is fatal).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from .engine import Container
from .errors import ConfigError
from .netns import Netns
from .types import parse_network_options


@dataclass
class BatchSpec:
    containers: list[Container] = field(default_factory=list)
    errors: dict[str, dict[str, str]] = field(default_factory=dict)  # container id -> {"error": …}


def load_batch(data: bytes | str) -> BatchSpec:
    try:
        raw = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"invalid batch JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError("batch: expected an object with `networks` and `containers`")
    networks = raw.get("networks") or {}
    entries = raw.get("containers")
    if not isinstance(networks, dict):
        raise ConfigError("batch.networks: expected an object")
    if not isinstance(entries, list):
        raise ConfigError("batch: missing required field `containers` (an array)")
    spec = BatchSpec()
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        key = entry.get("container_id") if isinstance(entry, dict) else None
        key = key if isinstance(key, str) and key else f"containers[{i}]"
        try:
            if key in seen:
                raise ConfigError(f"containers[{i}]: container id {key} appears twice")
            seen.add(key)
            spec.containers.append(_container(entry, networks, i))
        except ConfigError as exc:
            spec.errors[key] = {"error": str(exc)}
    return spec


def _container(entry: Any, networks: dict[str, Any], i: int) -> Container:
    if not isinstance(entry, dict):
        raise ConfigError(f"containers[{i}]: expected an object")
    netns = entry.get("netns")
    if not isinstance(netns, str) or not netns:
        raise ConfigError(f"containers[{i}]: missing required field `netns`")
    if "/" in netns and not netns.startswith("/"):
        raise ConfigError(f"containers[{i}].netns: {netns!r} must be an absolute path or a bare name")
    per = entry.get("networks")
    if not isinstance(per, dict) or not per:
        raise ConfigError(f"containers[{i}]: missing required field `networks`")
    missing = [name for name in per if name not in networks]
    if missing:
        raise ConfigError(f"containers[{i}].networks.{missing[0]}: network {missing[0]} is not defined in "
                          f"the batch's `networks`")
    options: dict[str, Any] = {k: v for k, v in entry.items() if k != "netns"}
    options["network_info"] = {name: networks[name] for name in per}
    try:
        parsed = parse_network_options(options)
    except ConfigError as exc:
        raise ConfigError(f"containers[{i}]: {exc}") from None
    return Container(Netns.from_ref(netns), parsed)
