"""The gRPC code generated from protos/: made by the build, loaded by everything else.

`generate()` runs protoc (grpc_tools) with `-I protos` into the checkout root, so the modules land
in alignlens/v1/ (git-ignored) and import each other exactly as protoc writes them (`from
alignlens.v1 import attribution_pb2`), inside the installed `alignlens` namespace: no sys.path
edit, no edit of generated code. It runs in the package build (setup.py's build_py, which loads
this file by path) and in `make protos`, which the Makefile reruns whenever a .proto is newer than
its output. `load()` only imports; it never writes into the package.

Usage: `pb2, pb2_grpc = protos.load()`; `python service/protos.py` regenerates.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path
from types import ModuleType

PROTO_ROOT = Path(__file__).resolve().parent.parent / "protos"
GEN_DIR = Path(__file__).resolve().parent.parent  # the checkout root: outputs go to alignlens/v1/
PROTOS = ("alignlens/v1/attribution.proto",)
# Per .proto file: the modules protoc writes (message classes, type stubs, service stubs).
_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # gRPC message limit, client and server: a long FULL Audit is a few MB
OUT_PACKAGE = GEN_DIR / "alignlens" / "v1"  # where the modules land (git-ignored)


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
    # Two builds may run together (make and pip); one generates.
    OUT_PACKAGE.mkdir(parents=True, exist_ok=True)
    with open(OUT_PACKAGE / ".lock", "w") as handle:
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
        with tempfile.TemporaryDirectory(dir=OUT_PACKAGE) as tmp:
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
    """(attribution_pb2, attribution_pb2_grpc) of the installed package."""
    try:
        from alignlens.v1 import attribution_pb2, attribution_pb2_grpc
    except ImportError as exc:
        raise ImportError("the generated gRPC code (alignlens.v1) is missing: run `make protos` in the "
                          "checkout, or reinstall the package") from exc
    return attribution_pb2, attribution_pb2_grpc


if __name__ == "__main__":
    for path in generate() or ["(up to date)"]:
        print(path)
