"""Records the git commit and build time in the package (``asyncnet-netavark version`` reports them)."""

import json
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

sys.path.insert(0, str(Path(__file__).resolve().parent))  # PEP 517 builds do not put the project on sys.path
from asyncnet.buildinfo import git_facts  # noqa: E402


class BuildPyWithInfo(build_py):
    def run(self) -> None:
        super().run()
        facts = git_facts(Path(__file__).resolve().parent)
        if facts:
            target = Path(self.build_lib) / "asyncnet" / "_build_info.json"
            target.write_text(json.dumps(facts))


setup(cmdclass={"build_py": BuildPyWithInfo})
