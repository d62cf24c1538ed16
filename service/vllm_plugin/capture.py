"""Worker-side capture state: which rows of a step decide which tokens, and what leaves.

Phases of one engine step, in the order vLLM runs them in the worker:
  1. `execute_model` (wrapped): marks a real step (dummy/profiling runs capture nothing)
     and forgets requests the scheduler reports finished or aborted.
  2. model forward -> `on_forward(stream)`: `stream` is the 2L+1 tensors
     [h_0, m_1, h_1, ..., m_L, h_L], each [num_tokens, d_model]. Only rows that decide a
     token are copied out (index_select; this also detaches them from CUDA-graph
     buffers): the last row of each request whose sampled token is kept, and, for
     teacher-forced replay requests, every row that decides a completion token.
  3. `_sample` (wrapped): the host logits of generation rows are copied (keep_logits), then the
     sampled token of each generation row becomes known.
  4. emit (background thread by default, see BackgroundEmitter): the probe runs once,
     batched, over all rows of the step that asked for attribution, and one compact
     message per step is PUSHed to the server (service/channel.py).

Per-request options travel in `SamplingParams.extra_args["alignlens"]`:
    rid          external request id (the engine appends a random suffix internally)
    resid        bool: ship the bulk rows (`alignlens trace`)
    detail       0 none, 1 summary, 2 full: run the probe
    replay_from  int: capture rows deciding prompt tokens replay_from.. (audit)
Requests without that key are served exactly like stock vLLM.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from service.channel import GEN, REPLAY, CaptureSender

log = logging.getLogger(__name__)

OPTIONS_KEY = "alignlens"


@dataclass
class _Row:
    batch_index: int  # position of the request in the input batch (sampler row)
    rid: str
    kind: str  # GEN or REPLAY
    index: int  # output index (GEN) or completion index (REPLAY)
    token: int | None  # known for REPLAY; filled after sampling for GEN
    detail: int
    ship_resid: bool
    logits: torch.Tensor | None = None  # GEN: the host's logits [V] for this row, copied before sampling


@dataclass
class CaptureState:
    runner: Any = None
    sender: CaptureSender | None = None
    attributor: Any = None  # probe.attribution.Attributor, or None
    in_step: bool = False
    step: int = 0
    rows: list[_Row] = field(default_factory=list)
    tensors: torch.Tensor | None = None  # [rows, 2L+1, d]
    active: dict[str, str] = field(default_factory=dict)  # internal id -> external id
    forward_calls: int = 0
    rows_sent: int = 0
    emitter: "BackgroundEmitter | None" = None
    step_ended_at: float = 0.0  # time.monotonic() at the end of the last execute_model
    engine_logits_rows: int = 0  # GEN rows attributed from the engine's own logits (keep_logits)
    idle_wait_polls: bool = False  # the worker's between-step wait sleeps instead of spinning

    def stats(self) -> dict:
        return {
            "attached": self.runner is not None,
            "steps": self.step,
            "forward_calls": self.forward_calls,
            "rows_sent": self.rows_sent,
            "pending_rows": len(self.rows) + (self.emitter.backlog if self.emitter else 0),
            "tracked_requests": len(self.active),
            "probe_loaded": self.attributor is not None,
            "engine_logits_rows": self.engine_logits_rows,
            "idle_helper": bool(self.emitter and self.emitter.helper),
            "idle_wait_polls": self.idle_wait_polls,
        }


STATE = CaptureState()


def _options(runner, req_id: str) -> dict | None:
    req = runner.requests.get(req_id)
    params = getattr(req, "sampling_params", None)
    extra = getattr(params, "extra_args", None) or {}
    return extra.get(OPTIONS_KEY)


def on_forward(stream: list[torch.Tensor]) -> None:
    """Phase 2: keep the rows that decide tokens. `stream`: 2L+1 tensors [tokens, d]."""
    st = STATE
    st.forward_calls += 1
    if not st.in_step or st.runner is None:
        return
    runner = st.runner
    batch = runner.input_batch
    n = batch.num_reqs
    if n == 0:
        return
    qsl = runner.query_start_loc.np[: n + 1]
    computed = batch.num_computed_tokens_cpu[:n]
    n_prompt = batch.num_prompt_tokens[:n]
    rows: list[_Row] = []
    index: list[int] = []
    for i, req_id in enumerate(batch.req_ids[:n]):
        opts = _options(runner, req_id)
        if opts is None:
            continue
        rid = opts["rid"]
        st.active[req_id] = rid
        start, end = int(qsl[i]), int(qsl[i + 1])
        pos0 = int(computed[i])
        detail = int(opts.get("detail", 0))
        ship = bool(opts.get("resid", False))
        replay_from = opts.get("replay_from")
        if replay_from is not None:
            prompt_ids = runner.requests[req_id].prompt_token_ids
            # row at position p decides prompt token p+1; keep p+1 in [replay_from, n_prompt)
            lo = max(start, start + (replay_from - 1 - pos0))
            hi = min(end, start + (int(n_prompt[i]) - 1 - pos0))
            for r in range(lo, hi):
                p = pos0 + (r - start)
                rows.append(_Row(i, rid, REPLAY, p + 1 - replay_from, prompt_ids[p + 1], detail, ship))
                index.append(r)
            continue
        out_index = pos0 + (end - start) - int(n_prompt[i])  # (last position + 1) - prompt tokens
        if out_index >= 0:  # negative: a chunked-prefill piece that samples nothing
            rows.append(_Row(i, rid, GEN, out_index, None, detail, ship))
            index.append(end - 1)
    if not rows:
        return
    idx = torch.tensor(index, dtype=torch.long, device=stream[0].device)
    st.tensors = torch.stack([t.index_select(0, idx) for t in stream], dim=1)
    st.rows = rows


def keep_logits(logits: torch.Tensor | None, spec_decode_metadata) -> None:
    """Phase 3, before the sampler: copy the host logits of the GEN rows that asked for
    attribution, so the probe need not recompute them (probe.attribution.Attributor, `logits=`).

    The sampler scales and masks its input in place (temperature, penalties), so the copy is
    taken first: one index_select of [rows, V] (3 MB for 16 rows of a 49k vocabulary) against
    the probe's own V*d product and read of all of W_U. Skipped with speculative decoding
    (logits then have one row per draft token, not per request).
    """
    st = STATE
    if logits is None or spec_decode_metadata is not None or st.attributor is None or logits.dim() != 2:
        return
    gen = [r for r in st.rows if r.kind == GEN and r.detail > 0 and r.batch_index < logits.shape[0]]
    V = st.attributor.host.W_U.shape[0]
    if not gen or logits.shape[1] < V:
        return
    idx = torch.tensor([r.batch_index for r in gen], dtype=torch.long, device=logits.device)
    kept = logits.index_select(0, idx)[:, :V]
    for j, r in enumerate(gen):
        r.logits = kept[j]
    st.engine_logits_rows += len(gen)


def on_sampled(sampled_token_ids: torch.Tensor | None) -> None:
    """Phase 3: join sampled tokens; hand the step to the emitter (inline or background)."""
    st = STATE
    if not st.rows:
        return
    rows, tensors = st.rows, st.tensors
    st.rows, st.tensors = [], None
    if any(r.kind == GEN for r in rows):
        sampled = sampled_token_ids[:, 0].tolist() if sampled_token_ids is not None else []
        for r in rows:
            if r.kind == GEN:
                r.token = int(sampled[r.batch_index]) if r.batch_index < len(sampled) else -1
    st.step += 1
    for priority, part_rows, part_tensors in split_step(rows, tensors):
        if st.emitter is not None:
            st.emitter.submit(st.step, part_rows, part_tensors, priority)
        else:
            emit_step(st.step, part_rows, part_tensors)


# Work items of the emitter. Generation rows go first: a client is waiting on each of those
# tokens, while an audit's rows are only needed once its whole replay is done. Replay rows go
# in pieces of REPLAY_PIECE_ROWS (one message each), so a step's generation rows never wait
# behind more than one piece (~0.13 s of probe on SmolLM2-135M) of a long audit.
GEN_PRIORITY, REPLAY_PRIORITY = 0, 1
REPLAY_PIECE_ROWS = 64


def split_step(rows: list[_Row], tensors: torch.Tensor) -> list[tuple[int, list[_Row], torch.Tensor]]:
    """(priority, rows, tensors) work items of one step: its GEN rows, then its REPLAY rows in pieces."""
    gen = [i for i, r in enumerate(rows) if r.kind == GEN]
    if len(gen) == len(rows):
        return [(GEN_PRIORITY, rows, tensors)]
    items = []
    if gen:
        items.append((GEN_PRIORITY, [rows[i] for i in gen],
                      tensors.index_select(0, torch.tensor(gen, dtype=torch.long, device=tensors.device))))
        replay = [i for i, r in enumerate(rows) if r.kind != GEN]
        rows = [rows[i] for i in replay]
        tensors = tensors.index_select(0, torch.tensor(replay, dtype=torch.long, device=tensors.device))
    for s in range(0, len(rows), REPLAY_PIECE_ROWS):
        items.append((REPLAY_PRIORITY, rows[s:s + REPLAY_PIECE_ROWS], tensors[s:s + REPLAY_PIECE_ROWS]))
    return items


def build_message(step: int, rows: list[_Row], tensors: torch.Tensor) -> dict | None:
    """Run the probe once over the rows that asked for it; the step message (None: nothing to send)."""
    st = STATE
    keep = [i for i, r in enumerate(rows) if r.token is not None and r.token >= 0]
    resid = tensors[:, 0::2]  # [rows, L+1, d]
    mid = tensors[:, 1::2]  # [rows, L, d]
    attrs: dict[int, dict] = {}
    attr_seconds = 0.0
    want = [i for i in keep if rows[i].detail > 0]
    if want and st.attributor is not None:
        t0 = time.perf_counter()
        sel = torch.tensor(want, dtype=torch.long, device=tensors.device)
        tokens = torch.tensor([rows[i].token for i in want], dtype=torch.long, device=tensors.device)
        detail = "full" if max(rows[i].detail for i in want) >= 2 else "summary"
        logits = None
        if all(rows[i].logits is not None for i in want):
            logits = torch.stack([rows[i].logits for i in want])
        results = st.attributor(resid.index_select(0, sel), mid.index_select(0, sel), tokens, detail=detail,
                                logits=logits)
        for i, res in zip(want, results):
            attrs[i] = res.to_dict()
        attr_seconds = time.perf_counter() - t0
    ship_any = any(rows[i].ship_resid for i in keep)
    resid_cpu = resid.detach().to("cpu").contiguous() if ship_any else None
    mid_cpu = mid.detach().to("cpu").contiguous() if ship_any else None
    records = []
    for i in keep:
        r = rows[i]
        rec = {"rid": r.rid, "kind": r.kind, "index": r.index, "token": r.token,
               "attr": attrs.get(i), "resid": None, "resid_mid": None}
        if r.ship_resid:
            rec["resid"] = resid_cpu[i].numpy().tobytes()
            rec["resid_mid"] = mid_cpu[i].numpy().tobytes()
        records.append(rec)
    if not records:
        return None
    return {"step": step, "attr_seconds": attr_seconds, "L": mid.shape[1], "d": tensors.shape[-1],
            "dtype": str(np.dtype(str(tensors.dtype).removeprefix("torch."))), "records": records}


def send_message(message: dict | None) -> None:
    st = STATE
    if st.sender is not None and message is not None:
        st.sender.send(message)
        st.rows_sent += len(message["records"])


def emit_step(step: int, rows: list[_Row], tensors: torch.Tensor) -> None:
    """Inline emission (no background emitter): probe, then PUSH one message."""
    send_message(build_message(step, rows, tensors))


@dataclass(eq=False)
class _WorkItem:
    step: int
    rows: list[_Row]
    tensors: torch.Tensor
    taken_at: float = 0.0  # when the idle-core helper took it (0: not taken by the helper)
    stolen: bool = False  # the emitter thread is computing it too
    sent: bool = False


STEAL_AFTER_S = 0.25  # a helper item older than this is recomputed by the emitter thread when it is idle
ENGINE_IDLE_S = 0.01  # the helper takes a piece only when no step ran for this long


def _name_os_thread(name: str) -> None:
    """Name the calling thread for the OS (top -H, ps -L, /proc/*/task/*/comm; 15 bytes at most)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


IDLE_POLL_S = 100e-6  # the worker's wait for its next step polls at this period instead of spinning


def yield_core_while_waiting(poll_s: float = IDLE_POLL_S) -> bool:
    """Make this (worker) process's shared-memory queue waits sleep `poll_s` between polls.

    Between steps vLLM's worker waits for the scheduler's next message by busy-polling the
    shm ring buffer with sched_yield for up to 1 s after each read (shm_broadcast.SpinCondition).
    On CPU that keeps the worker's own core busy exactly when the idle-core helper could run
    there: after an Audit's last prefill chunk the helper got 55-65 % of the core (per-thread CPU
    ticks, /proc). A 100 us sleep per poll adds at most that to a step's start; measured on the
    2-core machine, 520-token replay engine-direct, 7 interleaved pairs: median 2.57 s -> 2.43 s.
    Only the worker process is changed (the engine core and the server keep vLLM's spin).
    Returns False and changes nothing where the queue module is not loaded (no vLLM worker in
    this process, e.g. unit tests) or has no such hook (another vLLM version).
    """
    shm_broadcast = sys.modules.get("vllm.distributed.device_communicators.shm_broadcast")
    if not callable(getattr(shm_broadcast, "sched_yield", None)):
        return False
    shm_broadcast.sched_yield = functools.partial(time.sleep, poll_s)
    return True


def _engine_idle() -> bool:
    st = STATE
    return not st.in_step and time.monotonic() - st.step_ended_at > ENGINE_IDLE_S


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
    """

    def __init__(self, idle_helper: bool = True):
        import collections
        import os
        import threading

        self._gen: collections.deque[_WorkItem] = collections.deque()
        self._replay: collections.deque[_WorkItem] = collections.deque()
        self._helper_items: list[_WorkItem] = []
        self._cv = threading.Condition()
        self._send_lock = threading.Lock()  # one sender socket, two threads; first finisher sends
        self._busy = 0
        worker_cpus = os.sched_getaffinity(0)
        self._cpus = set(range(os.cpu_count() or 1)) - worker_cpus
        self._thread = threading.Thread(target=self._run, args=(False, self._cpus), name="alignlens-emitter",
                                        daemon=True)
        self._thread.start()
        self.helper = None
        if idle_helper and self._cpus and hasattr(os, "SCHED_IDLE"):
            self.helper = threading.Thread(target=self._run, args=(True, worker_cpus), name="alignlens-idle-helper",
                                           daemon=True)
            self.helper.start()

    def _run(self, helper: bool, cpus: set[int]) -> None:
        import os

        if cpus:
            try:
                os.sched_setaffinity(0, cpus)  # this thread only
                if helper:
                    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            except OSError as exc:
                log.warning("alignlens %s could not move to cores %s: %s", "idle helper" if helper else "emitter",
                            sorted(cpus), exc)
                if helper:
                    return  # a helper at normal priority would slow the engine's own steps
        _name_os_thread("alignlens-idle" if helper else "alignlens-emit")
        torch.set_num_threads(1)
        while True:
            item = self._take(helper)
            try:
                message = build_message(item.step, item.rows, item.tensors)
                with self._send_lock:
                    if not item.sent:
                        item.sent = True
                        send_message(message)
            except Exception:  # a failed step must not stop later steps' records
                log.exception("alignlens: attribution of step %d failed", item.step)
            finally:
                with self._cv:
                    self._busy -= 1
                    if helper:
                        self._helper_items.remove(item)
                    self._cv.notify_all()

    def _take(self, helper: bool) -> _WorkItem:
        with self._cv:
            while True:
                if not helper and self._gen:
                    item = self._gen.popleft()
                elif self._replay and (not helper or _engine_idle()):
                    item = self._replay.popleft()
                    if helper:
                        item.taken_at = time.monotonic()
                        self._helper_items.append(item)
                elif not helper and (item := self._stuck_helper_item()) is not None:
                    item.stolen = True
                else:
                    self._cv.wait(timeout=ENGINE_IDLE_S if helper else STEAL_AFTER_S / 2)
                    continue
                self._busy += 1
                return item

    def _stuck_helper_item(self) -> _WorkItem | None:
        now = time.monotonic()
        for item in self._helper_items:
            if not item.stolen and not item.sent and now - item.taken_at > STEAL_AFTER_S:
                return item
        return None

    def submit(self, step: int, rows: list[_Row], tensors: torch.Tensor, priority: int = GEN_PRIORITY) -> None:
        with self._cv:
            (self._gen if priority == GEN_PRIORITY else self._replay).append(_WorkItem(step, rows, tensors))
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


def attach(runner, sender: CaptureSender | None, attributor=None, background: bool = True,
           idle_helper: bool = True) -> None:
    """Wrap the runner's step phases (instance attributes; the class is untouched)."""
    st = STATE
    if st.runner is not runner:
        execute = runner.execute_model
        sample = runner._sample

        def execute_model(scheduler_output, *args, **kwargs):
            for req_id in getattr(scheduler_output, "finished_req_ids", ()) or ():
                st.active.pop(req_id, None)
            if st.rows:  # a step whose sampling never ran: its rows decide nothing
                st.rows, st.tensors = [], None
            st.in_step = True
            try:
                return execute(scheduler_output, *args, **kwargs)
            finally:
                st.in_step = False
                st.step_ended_at = time.monotonic()

        def _sample(*args, **kwargs):
            keep_logits(args[0] if args else kwargs.get("logits"),
                        args[1] if len(args) > 1 else kwargs.get("spec_decode_metadata"))
            out = sample(*args, **kwargs)
            on_sampled(out.sampled_token_ids)
            return out

        runner.execute_model = execute_model
        runner._sample = _sample
    if st.sender is not None and st.sender is not sender:
        st.sender.close()
    st.runner, st.sender, st.attributor = runner, sender, attributor
    if background and st.emitter is None:
        st.emitter = BackgroundEmitter(idle_helper=idle_helper)
        if st.emitter.helper is not None:  # the helper needs the worker's core between steps
            st.idle_wait_polls = yield_core_while_waiting()
    elif not background:
        st.emitter = None
