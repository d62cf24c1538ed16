"""Build hook: generate the gRPC code from protos/ before packaging (see service/protos_build.py).

Everything else about the package is in pyproject.toml. The generated modules are package data
of `service` (service/gen/, git-ignored), so a wheel carries them and needs no protoc at run time.
"""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithProtos(build_py):
    def run(self):
        # Loaded by path: the `service` package itself must not be imported at build time.
        source = Path(__file__).parent / "service" / "protos_build.py"
        spec = importlib.util.spec_from_file_location("protos_build", source)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.generate()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
