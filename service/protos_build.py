"""Generate the Python gRPC code for protos/ into service/gen/, on demand.

protoc runs with `-I protos`, so the generated modules import each other by the proto path
(`from alignlens.v1 import attribution_pb2`) exactly as protoc writes them; the generated
code is never edited. That import form needs the output root, service/gen, importable as a
source root, which `load()` arranges once. service/gen is git-ignored: the build (or the
first import in an editable checkout) produces it, and it is regenerated whenever a .proto is
newer than its output. In an installed wheel protos/ is absent and the shipped files are used.

Usage: `pb2, pb2_grpc = protos_build.load()`; `python -m service.protos_build` regenerates.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType

PROTO_ROOT = Path(__file__).resolve().parent.parent / "protos"
GEN_DIR = Path(__file__).resolve().parent / "gen"
PROTOS = ("alignlens/v1/attribution.proto",)
# Per .proto file: the modules protoc writes (message classes, type stubs, service stubs).
_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def _outputs(proto: str) -> list[Path]:
    stem = proto.removesuffix(".proto")
    return [GEN_DIR / f"{stem}{suffix}" for suffix in _SUFFIXES]


def is_stale() -> bool:
    """True when an output is missing or older than its .proto (False without protos/)."""
    for proto in PROTOS:
        source = PROTO_ROOT / proto
        if not source.exists():
            continue
        mtime = source.stat().st_mtime
        for out in _outputs(proto):
            if not out.exists() or out.stat().st_mtime < mtime:
                return True
    return False


@contextlib.contextmanager
def _lock():
    # Server and client processes may start together on a fresh checkout; one generates.
    GEN_DIR.mkdir(parents=True, exist_ok=True)
    with open(GEN_DIR / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def generate() -> list[Path]:
    """Run protoc (grpc_tools) over PROTOS into GEN_DIR; returns the files written."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    with _lock():
        if not is_stale():
            return []
        with tempfile.TemporaryDirectory(dir=GEN_DIR) as tmp:
            args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", f"--python_out={tmp}",
                    f"--pyi_out={tmp}", f"--grpc_python_out={tmp}", *PROTOS]
            if protoc.main(args) != 0:
                raise RuntimeError(f"protoc failed: {' '.join(args)}")
            written = []
            for proto in PROTOS:
                for out in _outputs(proto):
                    out.parent.mkdir(parents=True, exist_ok=True)
                    # Write then rename, so a concurrent reader never imports a half-written file.
                    os.replace(Path(tmp) / out.relative_to(GEN_DIR), out)
                    written.append(out)
                    # Regular packages, so `alignlens` cannot merge with a namespace elsewhere.
                    for parent in out.relative_to(GEN_DIR).parents:
                        init = GEN_DIR / parent / "__init__.py"
                        if parent != Path(".") and not init.exists():
                            init.touch()
            return written


def load() -> tuple[ModuleType, ModuleType]:
    """(attribution_pb2, attribution_pb2_grpc), generating them first when stale."""
    if is_stale():
        generate()
    root = str(GEN_DIR)
    if root not in sys.path:
        sys.path.append(root)  # see module docstring: protoc's import form needs the output root
    return (importlib.import_module("alignlens.v1.attribution_pb2"),
            importlib.import_module("alignlens.v1.attribution_pb2_grpc"))


def clean() -> None:
    """Remove everything generated (tests of the build use it)."""
    shutil.rmtree(GEN_DIR, ignore_errors=True)


if __name__ == "__main__":
    for path in generate() or ["(up to date)"]:
        print(path)
