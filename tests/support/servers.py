"""Start `alignlens serve` for a test module, or fail the test with the server's log tail."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.serve_process import ServeProcess, ServeProcessError


def started(serve_args: list[str], log_path: Path, timeout_s: float = 400, **kwargs) -> ServeProcess:
    """A ServeProcess (keywords as ServeProcess's), started and SERVING; stop() it when done."""
    srv = ServeProcess(serve_args, log_path, **kwargs)
    srv.start()
    try:
        srv.wait_serving(timeout_s)
    except ServeProcessError as exc:
        srv.stop()
        pytest.fail(str(exc))
    return srv
