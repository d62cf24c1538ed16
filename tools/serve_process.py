"""`alignlens serve` as a child process on loopback: start it, wait for SERVING, stop it.

One helper for everything that needs a real server in another process: `alignlens bench
--service` (service/bench_service.py) and the tests that talk to a server (tests/test_service.py,
tests/test_deploy_prometheus.py). The engine takes 20-120 s to start, so readiness is the gRPC
health status, polled; a server that exits or never reaches SERVING raises ServeProcessError with
the tail of its log.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


class ServeProcessError(RuntimeError):
    """The server exited, or did not reach SERVING in time (message ends with its log tail)."""


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`alignlens serve <serve_args>` on 127.0.0.1 with fresh gRPC and metrics ports.

    `wrap` turns the command into the one actually run (e.g. inside a sandbox); `env` is the
    child's environment (default: this process's); `client_options` are the AttributionClient
    keywords that reach its health service (a TLS server). `with ServeProcess(...) as s:` starts it and
    waits for SERVING; `stop()` sends SIGTERM (the server drains), then kills after `grace_s`.
    """

    def __init__(self, serve_args: list[str], log_path: Path, *, env: dict | None = None,
                 wrap: Callable[[list[str]], list[str]] | None = None, client_options: dict | None = None):
        self.port, self.metrics_port = free_port(), free_port()
        cmd = [sys.executable, "-m", "alignlens.service.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--metrics-host", "127.0.0.1", "--metrics-port", str(self.metrics_port), *serve_args]
        self.cmd = wrap(cmd) if wrap else cmd
        self.env = env
        self.client_options = client_options or {}  # AttributionClient keywords (TLS) for the health polls
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen | None = None
        self.start_seconds: float | None = None
        self._log = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self) -> ServeProcess:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO)
        self._started = time.perf_counter()
        return self

    def wait_serving(self, timeout_s: float = 900.0, on_status: Callable[[str], None] | None = None) -> float:
        """Poll health until SERVING; seconds since start. `on_status` sees every other status."""
        from alignlens.service.client import AttributionClient

        deadline = time.monotonic() + timeout_s
        with AttributionClient(self.target, **self.client_options) as client:
            while True:
                if self.proc.poll() is not None:
                    raise ServeProcessError(f"alignlens serve exited with {self.proc.returncode}:\n{self.log_tail()}")
                status = client.health(timeout_s=2.0)
                if status == "SERVING":
                    break
                if on_status is not None:
                    on_status(status)
                if time.monotonic() > deadline:
                    raise ServeProcessError(f"alignlens serve not SERVING after {timeout_s:.0f} s "
                                            f"(last status {status}):\n{self.log_tail()}")
                time.sleep(0.5)
        self.start_seconds = time.perf_counter() - self._started
        return self.start_seconds

    def log_tail(self, n: int = 40) -> str:
        if self._log is not None:
            self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self, grace_s: float = 60.0, pid: int | None = None) -> int | None:
        """SIGTERM to `pid` (default: the child), wait up to grace_s, then kill. The exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                os.kill(pid or self.proc.pid, signal.SIGTERM)
                self.proc.wait(grace_s)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode

    def __enter__(self) -> ServeProcess:
        self.start()
        try:
            self.wait_serving()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
