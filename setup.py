"""Records the git commit and build time in the package (``asyncnet-netavark version`` reports them)."""

import json
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

from asyncnet.buildinfo import git_facts


class BuildPyWithInfo(build_py):
    def run(self) -> None:
        super().run()
        facts = git_facts(Path(__file__).resolve().parent)
        if facts:
            target = Path(self.build_lib) / "asyncnet" / "_build_info.json"
            target.write_text(json.dumps(facts))


setup(cmdclass={"build_py": BuildPyWithInfo})
