"""A server's private runtime folder, and engine processes that do not outlive their server.

vLLM's engine core does not watch the process that started it: after `kill -9` of `alignlens
serve`, its `VLLM::EngineCore` and `VLLM::Worker` (and multiprocessing's resource tracker) kept
running, holding the model's memory, and its ZeroMQ sockets and torch's file store stayed in /tmp
(measured: 3 processes and 8 files still there 20 s later). So:

- `claim()` (the server, before the engine spawns): a private folder `<runtime>/serve-<pid>-<random>`
  becomes TMPDIR, VLLM_RPC_BASE_PATH and ALIGNLENS_RUNTIME_DIR for the engine's processes, so every
  IPC file they make is in it; ALIGNLENS_SERVER_PID names the server. Folders of servers that no
  longer exist are removed first. `release()` removes the folder at a normal exit.
- `watch_parent()` (every vLLM process the server spawned, from the plugin's `register`): a daemon
  thread polls the parent pid; once the parent is gone (re-parented), a direct child of the server
  removes the server's folder, then the process asks itself to stop (SIGTERM: vLLM's own shutdown,
  which also stops its workers) and exits hard after `GRACE_S` if that hangs. Workers watch the engine
  core the same way (besides vLLM's death pipe). The resource tracker exits by itself when the last of
  them closes its pipe, removing the shared-memory segments they left.
Nothing here imports vLLM.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

SERVER_PID_ENV = "ALIGNLENS_SERVER_PID"
PRIVATE_DIR_ENV = "ALIGNLENS_SERVER_RUNTIME_DIR"
POLL_S = 0.5
GRACE_S = 2.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(base: Path) -> list[Path]:
    """Remove `serve-<pid>-*` folders under `base` whose server process is gone; the removed paths."""
    removed = []
    for path in base.glob("serve-*-*"):
        try:
            pid = int(path.name.split("-")[1])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def claim(base: Path) -> Path:
    """Make this server's private runtime folder and point the engine's processes at it."""
    base.mkdir(parents=True, exist_ok=True)
    for path in sweep_stale(base):
        log.info("removed the runtime folder of a server that no longer runs: %s", path)
    private = base / f"serve-{os.getpid()}-{secrets.token_hex(4)}"
    private.mkdir(mode=0o700)
    for name in ("TMPDIR", "VLLM_RPC_BASE_PATH", "ALIGNLENS_RUNTIME_DIR", PRIVATE_DIR_ENV):
        os.environ[name] = str(private)
    os.environ[SERVER_PID_ENV] = str(os.getpid())
    return private


def release(private: Path | None) -> None:
    """Remove the private folder (the engine has been shut down)."""
    if private is not None:
        shutil.rmtree(private, ignore_errors=True)


def watch_parent() -> threading.Thread | None:
    """In a process a server spawned (directly or not): stop when the parent process dies.

    A no-op outside a server's process tree (the in-process engine, tests, the bench) and in the
    server itself.
    """
    server = os.environ.get(SERVER_PID_ENV)
    if not server or int(server) == os.getpid():
        return None
    parent = os.getppid()
    if parent == 1 or not _alive(parent):
        return None
    owns_dir = parent == int(server)  # the engine core: the server's direct child

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(POLL_S)
        if owns_dir:
            private = os.environ.get(PRIVATE_DIR_ENV)
            if private and Path(private).name.startswith(f"serve-{server}-"):
                shutil.rmtree(private, ignore_errors=True)
        log.warning("alignlens: parent process %d is gone; shutting down this engine process", parent)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(GRACE_S)
        os._exit(1)

    thread = threading.Thread(target=watch, name="alignlens-parent-watch", daemon=True)
    thread.start()
    return thread
