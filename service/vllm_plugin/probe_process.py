"""The probe in its own process: the worker hands each work item over a socket and goes on.

Why a process (measured in docs/design/capture.md, "The probe's process"): run as threads of the
worker process, the emitter and the idle-core helper share the worker's GIL. The worker's forward
releases the GIL around every kernel and must take it back after each one; with the probe's
threads holding it between their own torch calls, the worker's main thread blocked on the GIL
about 45 times per decode step at 8 streams, 4.3 ms of a 36 ms step (perf sched_switch). In a
child process the probe has its own interpreter and the worker never waits for it.

Worker side (`ProbeProcess`, the interface of emitter.BackgroundEmitter: submit, step_started,
step_ended, backlog, helper, wait_idle): each item is one `sendmsg` of a pickled header (step,
priority, the rows without tensors, tensor specs) followed by the raw bytes of the rows' stream,
the heads' outputs when a row asked for detail FULL, and each GEN row's logits. The kernel copies
the bytes; the worker does not serialise tensors.

Child side (`python -m alignlens.service.vllm_plugin.probe_process`): loads the same probe, runs
the unchanged BackgroundEmitter (emitter thread on the cores the worker is not pinned to,
idle-core helper on the worker's core at SCHED_IDLE) and PUSHes the records to the server itself.
A small shared memory block (memfd) carries what the emitter's policy reads from the engine
(in a step, when the last step ended) and the counters alignlens_stats() reports.

The child marks each item done (a ring in the shared block) once its records are sent, so the
worker knows what is pending. The child exits when the worker does (PR_SET_PDEATHSIG, and
end-of-file on the socket). If it dies, the worker logs it and falls back to the in-process
emitter, which first computes every item the child had not marked done.
"""

from __future__ import annotations

import argparse
import logging
import mmap
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import torch

from alignlens.probe.record import Detail
from alignlens.service.vllm_plugin.emitter import GEN_PRIORITY, BackgroundEmitter, _name_os_thread, other_cpus
from alignlens.service.vllm_plugin.rows import Row

log = logging.getLogger(__name__)

ENV = "ALIGNLENS_PROBE_PROCESS"  # "0": the probe runs as threads of the worker process
READY_TIMEOUT_S = 180.0

# the shared control block: 16 float64 slots, then a ring of int64 "done" marks: the child writes
# item number s into done[s % DONE_SLOTS] once that item's records were sent (or its error records)
IN_STEP, STEP_ENDED_AT, ROWS_SENT, ERROR_RECORDS, HELPER, READY, FAILED = range(7)
CTL_BYTES = 1 << 16
DONE_SLOTS = (CTL_BYTES - 128) // 8
MAX_IOVECS = 256  # more logits rows than this travel as one stacked buffer (the kernel caps iovecs at 1024)

_HEADER = struct.Struct("<Q")
_OP_ITEM, _OP_STEP_END = 0, 1


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


def _control(fd: int) -> tuple[mmap.mmap, np.ndarray, np.ndarray]:
    block = mmap.mmap(fd, CTL_BYTES)
    return (block, np.frombuffer(block, dtype=np.float64, count=16),
            np.frombuffer(block, dtype=np.int64, count=DONE_SLOTS, offset=128))


def _raw(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(t.view(-1).view(torch.uint8).numpy())


class ProbeProcess:
    """Worker side: starts the child, hands it work items. Same interface as BackgroundEmitter."""

    def __init__(self, address: str, probe_path: str, checkpoint_dir: str | None, idle_helper: bool):
        self._sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        for s, opt in ((self._sock, socket.SO_SNDBUF), (child_sock, socket.SO_RCVBUF)):
            try:
                s.setsockopt(socket.SOL_SOCKET, opt, 8 << 20)  # capped by net.core.[wr]mem_max
            except OSError:
                pass
        self.args = (address, probe_path, checkpoint_dir, idle_helper)
        ctl_fd = os.memfd_create("alignlens-probe-ctl")
        os.ftruncate(ctl_fd, CTL_BYTES)
        self._block, self._ctl, self._done = _control(ctl_fd)
        self._done[:] = -1
        self._seq = 0
        # items sent and not yet marked done by the child: resubmitted to the fallback if it dies
        self._pending: dict[int, tuple] = {}
        cmd = [sys.executable, "-m", "alignlens.service.vllm_plugin.probe_process", "--socket-fd",
               str(child_sock.fileno()), "--control-fd", str(ctl_fd), "--address", address, "--probe", probe_path,
               *(["--checkpoint", checkpoint_dir] if checkpoint_dir else []), *([] if idle_helper else ["--no-helper"])]
        try:
            self._proc = subprocess.Popen(cmd, pass_fds=(child_sock.fileno(), ctl_fd), close_fds=True)
        except BaseException:
            self._sock.close()
            raise
        finally:
            child_sock.close()
            os.close(ctl_fd)
        self._fallback: BackgroundEmitter | None = None
        self._idle_helper = idle_helper
        self._submitted_this_step = False
        self._lock = threading.Lock()  # submit may come from the worker's thread only; guard anyway
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self._ctl[READY]:
            failed = self._proc.poll() is not None or self._ctl[FAILED]
            if failed or time.monotonic() > deadline:
                self.close(kill=True)
                raise RuntimeError(f"the alignlens probe process exited during start-up (code {self._proc.poll()})"
                                   if failed else f"the alignlens probe process was not ready after "
                                                  f"{READY_TIMEOUT_S:.0f} s")
            time.sleep(0.02)

    # ---- BackgroundEmitter's interface ----------------------------------------------------------
    @property
    def pid(self) -> int | None:
        """The child's pid; None once the probe runs in this process (the child died)."""
        return self._proc.pid if self._fallback is None else None

    @property
    def helper(self):
        if self._fallback is not None:
            return self._fallback.helper
        return bool(self._ctl[HELPER]) or None

    @property
    def backlog(self) -> int:
        """Items sent and not yet done (their records sent) by the child."""
        if self._fallback is not None:
            return self._fallback.backlog
        with self._lock:
            self._prune()
            return len(self._pending)

    def counters(self) -> tuple[int, int]:
        """(rows sent, error records) by the child."""
        return int(self._ctl[ROWS_SENT]), int(self._ctl[ERROR_RECORDS])

    def step_started(self) -> None:
        self._ctl[IN_STEP] = 1.0
        self._submitted_this_step = False

    def step_ended(self) -> None:
        self._ctl[STEP_ENDED_AT] = time.monotonic()
        self._ctl[IN_STEP] = 0.0
        if self._fallback is not None:
            self._fallback.step_ended()
        elif self._submitted_this_step:  # wake the helper for this step's generation item
            self._send(_OP_STEP_END, None, ())

    def submit(self, step: int, rows: list[Row], tensors: torch.Tensor, priority: int = GEN_PRIORITY,
               heads: torch.Tensor | None = None) -> None:
        if self._fallback is not None:
            self._fallback.submit(step, rows, tensors, priority, heads)
            return
        bufs, specs = [], []

        def add(tag, t: torch.Tensor) -> None:
            t = t.detach().to("cpu").contiguous()
            specs.append((tag, str(t.dtype).removeprefix("torch."), tuple(t.shape)))
            bufs.append(_raw(t))

        add("tensors", tensors)
        if heads is not None and any(r.detail >= Detail.FULL for r in rows):
            add("heads", heads)
        with_logits = [i for i, r in enumerate(rows) if r.logits is not None]
        if len(with_logits) > MAX_IOVECS:
            add(tuple(with_logits), torch.stack([rows[i].logits for i in with_logits]))
        else:
            for i in with_logits:  # views of the kept logits' rows: no copy
                add(i, rows[i].logits)
        light = [Row(r.batch_index, r.rid, r.kind, r.index, r.token, r.detail, r.ship_resid) for r in rows]
        self._submitted_this_step = True
        with self._lock:
            seq, self._seq = self._seq, self._seq + 1
            self._prune()
            self._pending[seq] = (step, rows, tensors, priority, heads)
        self._send(_OP_ITEM, (step, priority, light, specs, seq), bufs)

    def wait_idle(self, timeout_s: float = 30.0) -> bool:
        if self._fallback is not None:
            return self._fallback.wait_idle(timeout_s)
        deadline = time.monotonic() + timeout_s
        while self.backlog > 0:
            if self._proc.poll() is not None:  # died with work pending: the fallback takes it
                self._fail(RuntimeError("the probe process exited"))
                return self._fallback.wait_idle(max(0.0, deadline - time.monotonic()))
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    # ---- transport ------------------------------------------------------------------------------
    def _prune(self) -> None:
        """Forget the items the child marked done (call with self._lock held)."""
        done = [seq for seq in self._pending if self._done[seq % DONE_SLOTS] == seq]
        for seq in done:
            del self._pending[seq]

    def _send(self, op: int, header, bufs) -> None:
        head = pickle.dumps((op, header), protocol=pickle.HIGHEST_PROTOCOL)
        parts = [_HEADER.pack(len(head)), head, *bufs]
        try:
            with self._lock:
                total = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)
                sent = self._sock.sendmsg(parts)
                if sent < total:  # a partial send: the rest, from where it stopped
                    self._sock.sendall(b"".join(bytes(p) for p in parts)[sent:])
        except OSError as exc:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        """The child is gone: from now on the probe runs in this process, starting with every item the
        child had not marked done, in the order they were sent. None is lost; an item whose records the
        child sent in the instant before it died, unmarked, is sent twice."""
        if self._fallback is not None:
            return
        log.error("alignlens: the probe process (pid %s, exit code %s) cannot be reached (%s); the probe now runs "
                  "inside the worker process", self._proc.pid, self._proc.poll(), exc)
        with self._lock:
            self._prune()
            unfinished = [self._pending[seq] for seq in sorted(self._pending)]
            self._pending.clear()
        self._fallback = BackgroundEmitter(idle_helper=self._idle_helper)
        for step, rows, tensors, priority, heads in unfinished:
            self._fallback.submit(step, rows, tensors, priority, heads)

    def close(self, kill: bool = False) -> None:
        """Stop the child: end of file on its socket (it finishes its queue), or SIGKILL."""
        self._sock.close()
        if kill:
            self._proc.kill()
        try:
            self._proc.wait(5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


# ---- the child ------------------------------------------------------------------------------------
def _recv_exact(sock: socket.socket, n: int) -> bytearray | None:
    """n bytes, or None at end of file. MSG_WAITALL: one call (one release of this process's GIL)
    per buffer, however small the socket's buffer is."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got, socket.MSG_WAITALL)
        if k == 0:
            return None
        got += k
    return buf


def _tensor(buf: bytearray, dtype: str, shape: tuple) -> torch.Tensor:
    if not buf:
        return torch.empty(shape, dtype=getattr(torch, dtype))
    return torch.frombuffer(buf, dtype=torch.uint8).view(getattr(torch, dtype)).reshape(shape)


def _read_item(sock: socket.socket):
    """The next message: _OP_STEP_END, (step, priority, rows, tensors, heads, seq), or None at end of
    file (the worker closed the socket or exited; an item cut off there is dropped)."""
    head_len = _recv_exact(sock, _HEADER.size)
    head = None if head_len is None else _recv_exact(sock, _HEADER.unpack(head_len)[0])
    if head is None:
        return None
    op, header = pickle.loads(head)
    if op == _OP_STEP_END:
        return _OP_STEP_END
    step, priority, rows, specs, seq = header
    tensors = heads = None
    for tag, dtype, shape in specs:
        buf = _recv_exact(sock, _nbytes(dtype, shape))
        if buf is None:
            return None
        t = _tensor(buf, dtype, shape)
        if tag == "tensors":
            tensors = t
        elif tag == "heads":
            heads = t
        elif isinstance(tag, tuple):  # logits stacked for many rows
            for j, i in enumerate(tag):
                rows[i].logits = t[j]
        else:
            rows[tag].logits = t
    return step, priority, rows, tensors, heads, seq


def _nbytes(dtype: str, shape: tuple) -> int:
    return int(np.prod(shape, dtype=np.int64)) * getattr(torch, dtype).itemsize


def child_main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="alignlens probe process (started by the vLLM worker)")
    p.add_argument("--socket-fd", type=int, required=True)
    p.add_argument("--control-fd", type=int, required=True)
    p.add_argument("--address", required=True)
    p.add_argument("--probe", required=True)
    p.add_argument("--checkpoint")
    p.add_argument("--no-helper", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s alignlens-probe %(message)s")
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG: go when the worker goes
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:
        return
    _name_os_thread("alignlens-probe")  # the process as `top` and `ps` show it
    _block, ctl, done = _control(args.control_fd)
    sock = socket.socket(fileno=args.socket_fd)
    try:
        _serve(args, sock, ctl, done)
    except BaseException:
        ctl[FAILED] = 1.0
        raise


def _serve(args, sock: socket.socket, ctl: np.ndarray, done: np.ndarray) -> None:
    from alignlens.probe.attribution import Attributor
    from alignlens.service.engine.channel import CaptureSender
    from alignlens.service.vllm_plugin import emitter
    from alignlens.service.vllm_plugin.capture import fail_probe_token_from_env
    from alignlens.service.vllm_plugin.state import STATE

    torch.set_num_threads(1)
    STATE.attributor = Attributor.load(args.probe, args.checkpoint)
    STATE.sender = CaptureSender(args.address)
    STATE.fail_probe_token = fail_probe_token_from_env()
    emitter.ENGINE_CLOCK = lambda: (bool(ctl[IN_STEP]), float(ctl[STEP_ENDED_AT]))

    lock = threading.Lock()

    def item_done(seq: int) -> None:  # after the item's records were sent (by whichever thread)
        with lock:
            ctl[ROWS_SENT], ctl[ERROR_RECORDS] = STATE.rows_sent, STATE.error_records
            done[seq % DONE_SLOTS] = seq

    em = BackgroundEmitter(idle_helper=not args.no_helper, on_item_done=item_done)
    ctl[HELPER] = 1.0 if em.helper is not None else 0.0
    others = other_cpus()
    if others:  # this (reading) thread off the worker's cores, beside the emitter thread
        os.sched_setaffinity(0, others)
    ctl[READY] = 1.0
    while (item := _read_item(sock)) is not None:
        if item is _OP_STEP_END:
            em.step_ended()
            continue
        step, priority, rows, tensors, heads, seq = item
        em.submit(step, rows, tensors, priority, heads, tag=seq)
    em.wait_idle(timeout_s=30.0)
    STATE.sender.close()


if __name__ == "__main__":
    child_main()
