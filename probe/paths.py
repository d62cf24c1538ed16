"""Where alignlens keeps what it builds once: `$ALIGNLENS_HOME`, default `~/.cache/alignlens`.

Below it: models/ (converted checkpoints), svd/ (SVD factor caches), probe-eval/ (evaluation
traces), runtime/ (IPC sockets), vllm-cache/ and inductor-cache/ (compiled graphs).
"""

from __future__ import annotations

import os
from pathlib import Path


def alignlens_home() -> Path:
    """`$ALIGNLENS_HOME`, else `~/.cache/alignlens`."""
    env = os.environ.get("ALIGNLENS_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "alignlens"
