"""Command-line faces of asyncnet.

podman runs ``asyncnet-netavark`` once per container, so start-up time is part of every container's
setup. pyroute2's package ``__init__`` imports every family it supports (ndb, ipdb, conntrack, devlink…)
for ~140 ms, although we only need ``pyroute2.iproute.linux``. Importing the CLI therefore registers the
package without running its ``__init__``; the first attribute asked of the package itself (e.g. ``from
pyroute2 import IPRoute`` elsewhere in the process) runs the real ``__init__`` then, so nothing breaks.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any


def _defer_pyroute2_init() -> None:
    if "pyroute2" in sys.modules:
        return
    spec = importlib.util.find_spec("pyroute2")
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    loader = spec.loader

    def __getattr__(name: str) -> Any:
        if importlib.util.find_spec(f"pyroute2.{name}") is not None:  # `from pyroute2 import config`
            return importlib.import_module(f"pyroute2.{name}")
        del module.__dict__["__getattr__"]
        loader.exec_module(module)
        return getattr(module, name)

    module.__dict__["__getattr__"] = __getattr__
    sys.modules["pyroute2"] = module


_defer_pyroute2_init()
