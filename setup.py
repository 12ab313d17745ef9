"""Records the git commit and build time in the package (``asyncnet-netavark version`` reports them)."""

import importlib.util
import json
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


def _load_git_facts():  # type: ignore[no-untyped-def]
    """buildinfo.py by path: importing the package would need its dependencies inside the build env."""
    path = Path(__file__).resolve().parent / "asyncnet" / "buildinfo.py"
    spec = importlib.util.spec_from_file_location("_asyncnet_buildinfo", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.git_facts


git_facts = _load_git_facts()


class BuildPyWithInfo(build_py):
    def run(self) -> None:
        super().run()
        facts = git_facts(Path(__file__).resolve().parent)
        if facts:
            target = Path(self.build_lib) / "asyncnet" / "_build_info.json"
            target.write_text(json.dumps(facts))


setup(cmdclass={"build_py": BuildPyWithInfo})
