"""The emitter: runs the probe over captured rows and sends the records, off the engine's step.

Scheduling (which work first), threads and CPU placement live here; the rows come from the step
phases in capture.py, and what is sent is a wire.StepMessage (alignlens.service.engine.wire).

Work items: a step's generation rows form one item; its replay rows (Audit) are cut into pieces
of REPLAY_PIECE_ROWS. Generation items always go first (a client waits on each of those tokens,
while an audit's rows are needed only once the whole replay is done).

When the probe fails for an item, every row that asked for attribution gets an error record
instead (TokenRecord.error), so the request fails at once with the reason rather than waiting
for its records until a timeout.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from alignlens.probe.record import Detail
from alignlens.service.engine.wire import Kind, StepMessage, TokenRecord
from alignlens.service.vllm_plugin.rows import Row
from alignlens.service.vllm_plugin.state import STATE

log = logging.getLogger(__name__)

# Work items of the emitter. Generation rows go first: a client is waiting on each of those
# tokens, while an audit's rows are only needed once its whole replay is done. Replay rows go
# in pieces of REPLAY_PIECE_ROWS (one message each), so a step's generation rows never wait
# behind more than one piece (~0.13 s of probe on SmolLM2-135M) of a long audit.
GEN_PRIORITY, REPLAY_PRIORITY = 0, 1
REPLAY_PIECE_ROWS = 64


def split_step(rows: list[Row], tensors: torch.Tensor, heads: torch.Tensor | None = None
               ) -> list[tuple[int, list[Row], torch.Tensor, torch.Tensor | None]]:
    """(priority, rows, tensors, heads) work items of one step: its GEN rows, then its REPLAY rows
    in pieces. `heads` [rows, L, H * head_dim] (or None) is split with the rows."""
    gen = [i for i, r in enumerate(rows) if r.kind == Kind.GEN]
    if len(gen) == len(rows):
        return [(GEN_PRIORITY, rows, tensors, heads)]

    def take(t: torch.Tensor | None, idx: list[int]) -> torch.Tensor | None:
        return None if t is None else t.index_select(0, torch.tensor(idx, dtype=torch.long, device=t.device))

    items = []
    if gen:
        items.append((GEN_PRIORITY, [rows[i] for i in gen], take(tensors, gen), take(heads, gen)))
        replay = [i for i, r in enumerate(rows) if r.kind != Kind.GEN]
        rows = [rows[i] for i in replay]
        tensors, heads = take(tensors, replay), take(heads, replay)
    for s in range(0, len(rows), REPLAY_PIECE_ROWS):
        piece = slice(s, s + REPLAY_PIECE_ROWS)
        items.append((REPLAY_PRIORITY, rows[piece], tensors[piece], None if heads is None else heads[piece]))
    return items


def _attribute(rows: list[Row], want: list[int], resid: torch.Tensor, mid: torch.Tensor,
               heads: torch.Tensor | None = None) -> list:
    """The probe over rows `want` (all asked for attribution): TokenAttribution per row."""
    st = STATE
    tokens = torch.tensor([rows[i].token for i in want], dtype=torch.long, device=resid.device)
    if st.fail_probe_token is not None and st.fail_probe_token in tokens.tolist():
        raise RuntimeError(f"injected probe failure for token {st.fail_probe_token} "
                           "(ALIGNLENS_TEST_FAIL_PROBE_TOKEN)")
    sel = torch.tensor(want, dtype=torch.long, device=resid.device)
    detail = Detail.FULL if max(rows[i].detail for i in want) >= Detail.FULL else Detail.SUMMARY
    logits = None
    if all(rows[i].logits is not None for i in want):
        logits = torch.stack([rows[i].logits for i in want])
    return st.attributor(resid.index_select(0, sel), mid.index_select(0, sel), tokens, detail=detail, logits=logits,
                         heads=None if heads is None or detail < Detail.FULL else heads.index_select(0, sel))


def build_message(step: int, rows: list[Row], tensors: torch.Tensor,
                  heads: torch.Tensor | None = None) -> StepMessage | None:
    """Run the probe once over the rows that asked for it; the step message (None: nothing to send).

    tensors: [rows, 2L+1, d], the stream [h_0, m_1, h_1, ..., m_L, h_L] of each row; heads:
    [rows, L, H * head_dim], the heads' outputs (heads.py; dla_heads at FULL), or None.
    """
    keep = [i for i, r in enumerate(rows) if r.token is not None and r.token >= 0]
    resid = tensors[:, 0::2]  # [rows, L+1, d]
    mid = tensors[:, 1::2]  # [rows, L, d]
    attrs: dict[int, object] = {}
    errors: dict[int, str] = {}
    attr_seconds = 0.0
    want = [i for i in keep if rows[i].detail > Detail.NONE]
    if want and STATE.attributor is not None:
        t0 = time.perf_counter()
        try:
            attrs = dict(zip(want, _attribute(rows, want, resid, mid, heads)))
        except Exception as exc:  # noqa: BLE001 - reported to the requests, not only to the log
            log.exception("alignlens: attribution of step %d failed", step)
            errors = {i: f"{type(exc).__name__}: {exc}" for i in want}
        attr_seconds = time.perf_counter() - t0
    ship_any = any(rows[i].ship_resid for i in keep)
    resid_cpu = resid.detach().to("cpu").contiguous() if ship_any else None
    mid_cpu = mid.detach().to("cpu").contiguous() if ship_any else None
    records = []
    for i in keep:
        r = rows[i]
        rec = TokenRecord(rid=r.rid, kind=r.kind, index=r.index, token=r.token, attr=attrs.get(i),
                          error=errors.get(i))
        if r.ship_resid:
            rec.resid = resid_cpu[i].numpy().tobytes()
            rec.resid_mid = mid_cpu[i].numpy().tobytes()
        records.append(rec)
    if not records:
        return None
    return StepMessage(step=step, attr_seconds=attr_seconds, n_blocks=mid.shape[1], d_model=tensors.shape[-1],
                       dtype=str(np.dtype(str(tensors.dtype).removeprefix("torch."))), records=records)


def error_message(step: int, rows: list[Row], exc: BaseException) -> StepMessage | None:
    """Error records for every row of an item whose message could not be built at all."""
    reason = f"{type(exc).__name__}: {exc}"
    records = [TokenRecord(rid=r.rid, kind=r.kind, index=r.index, token=r.token, error=reason)
               for r in rows if r.token is not None and r.token >= 0]
    return StepMessage(step=step, attr_seconds=0.0, n_blocks=0, d_model=0, dtype="float32",
                       records=records) if records else None


def send_message(message: StepMessage | None) -> None:
    st = STATE
    if st.sender is not None and message is not None:
        st.sender.send(message)
        st.rows_sent += len(message.records)
        st.error_records += sum(1 for r in message.records if r.error is not None)


def emit_step(step: int, rows: list[Row], tensors: torch.Tensor, heads: torch.Tensor | None = None) -> None:
    """Inline emission (no background emitter): probe, then PUSH one message."""
    try:
        message = build_message(step, rows, tensors, heads)
    except Exception as exc:  # noqa: BLE001 - the requests get the error
        log.exception("alignlens: step %d could not be emitted", step)
        message = error_message(step, rows, exc)
    send_message(message)


@dataclass(eq=False)
class _WorkItem:
    step: int
    rows: list[Row]
    tensors: torch.Tensor
    heads: torch.Tensor | None = None
    queued_at: float = 0.0  # time.monotonic() at submit
    steal_at: float = 0.0  # when the idle-core helper took it: the time the emitter thread may recompute it
    stolen: bool = False  # the emitter thread is computing it too
    sent: bool = False
    tag: object = None  # the submitter's (the probe process's item number), passed to on_item_done


STEAL_AFTER_S = 0.25  # a helper item older than this is recomputed by the emitter thread when it is idle
ENGINE_IDLE_S = 0.01  # the helper takes a replay piece only when no step ran for this long
# Generation items go to the idle-core helper first (BackgroundEmitter, "generation rows"): the
# emitter thread takes one only once it has waited this long, i.e. when the next step started at
# once or the helper is busy ...
GEN_HANDOFF_S = 0.005
# ... and recomputes one the helper has held this long (a step started and took the helper's core).
GEN_STEAL_S = 0.1
GEN_TO_HELPER_ENV = "ALIGNLENS_HELPER_TAKES_GENERATION"


def _name_os_thread(name: str) -> None:
    """Name the calling thread for the OS (top -H, ps -L, /proc/*/task/*/comm; 15 bytes at most)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


# Where the emitter reads the engine's step clock: (in a step, time.monotonic() the last step ended).
# None: this process's STATE (the worker); the probe process sets a reader of the worker's shared block.
ENGINE_CLOCK = None


def _engine_clock() -> tuple[bool, float]:
    if ENGINE_CLOCK is not None:
        return ENGINE_CLOCK()
    return STATE.in_step, STATE.step_ended_at


def other_cpus() -> set[int]:
    """The cores the calling thread is not pinned to (in the worker: the ones vLLM left free)."""
    return set(range(os.cpu_count() or 1)) - os.sched_getaffinity(0)


def _engine_idle() -> bool:
    in_step, ended_at = _engine_clock()
    return not in_step and time.monotonic() - ended_at > ENGINE_IDLE_S


class BackgroundEmitter:
    """Runs the probe off the engine's critical path: generation rows first, then replay pieces,
    FIFO within each (see split_step).

    The rows were copied out of the model's buffers in phase 2, so step t+1 can run while the
    probe works on step t. Records reach the server slightly after their tokens; it joins by index.

    Threads (CPU; vLLM pins the worker to its cores and leaves the others mostly idle):
    - the emitter thread moves to the cores the worker is not pinned to and takes every item;
    - the idle-core helper sits on the worker's own cores at SCHED_IDLE priority (Linux runs
      it only when those cores have nothing else to do: the engine's steps are not slowed) and
      takes replay pieces only. When the engine is idle, e.g. after an Audit's last prefill
      chunk, the two threads split the remaining pieces. A piece the helper holds while the
      engine keeps its core busy would wait; once the emitter thread is idle it recomputes any
      helper piece older than STEAL_AFTER_S, and whichever finishes first sends it.
    For an Audit this pipelines the replay: with chunked prefill the probe attributes chunk c
    while the engine computes chunk c+1, and both cores finish the last chunk.

    Generation rows (`helper_takes_generation`, on unless ALIGNLENS_HELPER_TAKES_GENERATION=0): the
    worker's core idles between steps while the engine core, the server and the clients work on
    the other one, so the helper takes each step's generation item as soon as the step ends. The
    emitter thread takes it instead when nobody did within GEN_HANDOFF_S (the next step started
    at once), and recomputes it when the helper has held it GEN_STEAL_S (a step preempted it);
    the first to finish sends it. Measured in docs/benchmarks/http-vs-vllm.md.
    """

    def __init__(self, idle_helper: bool = True, helper_takes_generation: bool | None = None,
                 on_item_done=None):
        self._gen: collections.deque[_WorkItem] = collections.deque()
        self._replay: collections.deque[_WorkItem] = collections.deque()
        self._helper_items: list[_WorkItem] = []
        self._cv = threading.Condition()
        self._send_lock = threading.Lock()  # one sender socket, two threads; first finisher sends
        self._busy = 0
        # on_item_done(tag) after each computation of an item whose records were sent by then (the
        # probe process marks items done with it)
        self._on_item_done = on_item_done
        worker_cpus = os.sched_getaffinity(0)
        self._cpus = other_cpus()
        self._thread = threading.Thread(target=self._run, args=(False, self._cpus), name="alignlens-emitter",
                                        daemon=True)
        self._thread.start()
        self.helper = None
        if helper_takes_generation is None:
            helper_takes_generation = os.environ.get(GEN_TO_HELPER_ENV, "1") != "0"
        self._gen_to_helper = False  # set once the helper thread exists
        if idle_helper and self._cpus and hasattr(os, "SCHED_IDLE"):
            self._gen_to_helper = helper_takes_generation
            self.helper = threading.Thread(target=self._run, args=(True, worker_cpus), name="alignlens-idle-helper",
                                           daemon=True)
            self.helper.start()

    def _run(self, helper: bool, cpus: set[int]) -> None:
        if cpus:
            try:
                os.sched_setaffinity(0, cpus)  # this thread only
                if helper:
                    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            except OSError as exc:
                log.warning("alignlens %s could not move to cores %s: %s", "idle helper" if helper else "emitter",
                            sorted(cpus), exc)
                if helper:
                    with self._cv:
                        self._gen_to_helper = False  # nobody else would take generation items early
                        self._cv.notify_all()
                    return  # a helper at normal priority would slow the engine's own steps
        _name_os_thread("alignlens-idle" if helper else "alignlens-emit")
        torch.set_num_threads(1)
        while True:
            item = self._take(helper)
            try:
                try:
                    message = build_message(item.step, item.rows, item.tensors, item.heads)
                except Exception as exc:  # noqa: BLE001 - the requests get the error; later steps go on
                    log.exception("alignlens: step %d could not be emitted", item.step)
                    message = error_message(item.step, item.rows, exc)
                with self._send_lock:
                    if not item.sent:
                        item.sent = True
                        send_message(message)
            except Exception:  # noqa: BLE001 - the socket failed: nothing more can reach the server
                log.exception("alignlens: records of step %d could not be sent", item.step)
            finally:
                with self._cv:
                    self._busy -= 1
                    if helper:
                        self._helper_items.remove(item)
                    self._cv.notify_all()
                if self._on_item_done is not None and item.sent:
                    self._on_item_done(item.tag)

    def _take(self, helper: bool) -> _WorkItem:
        with self._cv:
            while True:
                now = time.monotonic()
                if self._gen and helper and self._gen_to_helper and not _engine_clock()[0]:
                    item = self._gen.popleft()
                    item.steal_at = now + GEN_STEAL_S
                    self._helper_items.append(item)
                elif self._gen and not helper and (not self._gen_to_helper
                                                   or now - self._gen[0].queued_at >= GEN_HANDOFF_S):
                    item = self._gen.popleft()
                elif self._replay and (not helper or _engine_idle()):
                    item = self._replay.popleft()
                    if helper:
                        item.steal_at = now + STEAL_AFTER_S
                        self._helper_items.append(item)
                elif not helper and (item := self._stuck_helper_item(now)) is not None:
                    item.stolen = True
                else:
                    self._cv.wait(timeout=self._wait_s(helper, now))
                    continue
                self._busy += 1
                return item

    def _wait_s(self, helper: bool, now: float) -> float:
        """How long a thread with nothing to take sleeps unless notified: the helper polls for an
        idle engine; the emitter thread wakes when a generation item's hand-off or a helper item's
        steal time comes."""
        if helper:
            return ENGINE_IDLE_S
        due = [i.steal_at for i in self._helper_items if not i.stolen and not i.sent]
        if self._gen:
            due.append(self._gen[0].queued_at + GEN_HANDOFF_S)
        return max(min(due, default=now + STEAL_AFTER_S) - now, 1e-4)

    def _stuck_helper_item(self, now: float) -> _WorkItem | None:
        for item in self._helper_items:
            if not item.stolen and not item.sent and now >= item.steal_at:
                return item
        return None

    def step_started(self) -> None:
        """The engine's step started (capture._before_step); the worker's STATE says so already."""

    def step_ended(self) -> None:
        """The engine's step ended (capture._after_step): the helper may take the step's items."""
        if self._gen_to_helper:
            with self._cv:
                self._cv.notify_all()

    def submit(self, step: int, rows: list[Row], tensors: torch.Tensor, priority: int = GEN_PRIORITY,
               heads: torch.Tensor | None = None, tag: object = None) -> None:
        with self._cv:
            (self._gen if priority == GEN_PRIORITY else self._replay).append(
                _WorkItem(step, rows, tensors, heads, queued_at=time.monotonic(), tag=tag))
            self._cv.notify_all()

    def wait_idle(self, timeout_s: float = 30.0) -> bool:
        """Block until nothing is queued or running (tests, shutdown); False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while self._gen or self._replay or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(timeout=left)
            return True

    @property
    def backlog(self) -> int:
        return len(self._gen) + len(self._replay)
