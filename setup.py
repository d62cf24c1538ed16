"""Build hook and package layout (everything else about the package is in pyproject.toml).

Layout: the checkout's folders install under one namespace, `alignlens`:
    alignlens/        -> alignlens            namespace root; alignlens/v1 is the generated gRPC code
    service/          -> alignlens.service    the process (server, engine hosting, vLLM plugin, CLI)
    probe/            -> alignlens.probe      the science on plain tensors
The gRPC code is generated from protos/ by `build_py` (wheel and editable installs alike; `make
protos` does the same in a checkout), with `-I protos`, so protoc's own imports
(`from alignlens.v1 import attribution_pb2`) resolve inside the installed package untouched.
"""

import importlib.util
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _generate_protos() -> None:
    # Loaded by path: the package itself must not be imported at build time.
    spec = importlib.util.spec_from_file_location("alignlens_protos", ROOT / "service" / "protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.generate()


class BuildPyWithProtos(build_py):
    def run(self):
        _generate_protos()
        super().run()


_generate_protos()  # before the package list is made: alignlens/v1 must exist to be listed
PACKAGE_DIR = {"alignlens": "alignlens", "alignlens.service": "service", "alignlens.probe": "probe"}
PACKAGES = ["alignlens", *(f"alignlens.{p}" for p in find_packages(where="alignlens"))]
for name, folder in (("service", "service"), ("probe", "probe")):
    PACKAGES += [f"alignlens.{name}", *(f"alignlens.{name}.{p}" for p in find_packages(where=folder))]

setup(cmdclass={"build_py": BuildPyWithProtos}, package_dir=PACKAGE_DIR, packages=PACKAGES)
