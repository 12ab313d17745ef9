"""Version facts for ``asyncnet-netavark version``: podman parses netavark's version JSON.

The commit and build time come from ``_build_info.json`` (written by setup.py at build time) or, for an
editable install, from the git checkout the package lives in.
"""

from __future__ import annotations

import datetime as dt
import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

NETAVARK_LEVEL = "1.14.0"  # the netavark behaviour asyncnet reproduces
_HERE = Path(__file__).resolve().parent


def asyncnet_version() -> str:
    try:
        return metadata.version("asyncnet")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0.0.0"


def git_facts(repo: Path) -> dict[str, str]:
    try:
        out = subprocess.run(["git", "-C", str(repo), "log", "-1", "--format=%H %cI"], capture_output=True,
                             text=True, timeout=5, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": out[0], "build_time": out[1]} if len(out) == 2 else {}


def build_info() -> dict[str, Any]:
    facts: dict[str, str] = {}
    stored = _HERE / "_build_info.json"
    if stored.exists():
        facts = json.loads(stored.read_text())
    else:
        facts = git_facts(_HERE.parent)
    return {
        "version": NETAVARK_LEVEL,
        "commit": facts.get("commit", "0" * 40),
        "build_time": facts.get("build_time", dt.datetime.now(dt.UTC).isoformat()),
        "target": f"{platform.machine()}-unknown-linux-gnu",
        "asyncnet": asyncnet_version(),
    }
