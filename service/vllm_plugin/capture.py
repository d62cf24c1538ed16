"""The worker's step phases: what capture does inside one engine step, in the order vLLM runs them.

  1. `execute_model` (wrapped, internals.wrap_step): marks a real step (dummy/profiling runs
     capture nothing) and forgets requests the scheduler reports finished or aborted.
  2. outer model forward, before the compiled inner model -> `before_forward()`: reads this step's
     requests' options once and writes their intervention coefficients (interventions.py);
     after it -> `on_forward(stream)`: `stream` is the 2L+1 tensors
     [h_0, m_1, h_1, ..., m_L, h_L], each [num_tokens, d_model]. Only rows that decide a
     token are copied out (rows.select_rows; index_select also detaches them from CUDA-graph
     buffers), with the heads' outputs at the same rows (heads.py: [rows, L, H * head_dim]).
  3. `_sample` (wrapped): the host logits of attributed generation rows are copied
     (keep_logits), then the sampled token of each generation row becomes known (on_sampled).
  4. emit (emitter.py; on CPU in a child process by default, probe_process.py, else on background
     threads): the probe runs once, batched, over the rows of a work item, and one
     wire.StepMessage is PUSHed to the server.

Per-request options (wire.CaptureOptions) travel in `SamplingParams.extra_args`; requests
without them (every request at detail NONE) are served exactly like stock vLLM.
"""

from __future__ import annotations

import logging
import os
import time

import torch

from alignlens.probe.record import Detail
from alignlens.service.engine.channel import CaptureSender
from alignlens.service.engine.wire import CaptureOptions, Kind
from alignlens.service.vllm_plugin import heads, internals, interventions
from alignlens.service.vllm_plugin.emitter import BackgroundEmitter, emit_step, split_step
from alignlens.service.vllm_plugin.probe_process import ProbeProcess
from alignlens.service.vllm_plugin.rows import attributed_gen_rows, join_sampled, select_rows
from alignlens.service.vllm_plugin.state import STATE

log = logging.getLogger(__name__)

FAIL_PROBE_TOKEN_ENV = "ALIGNLENS_TEST_FAIL_PROBE_TOKEN"  # tests only: see CaptureState.fail_probe_token


def fail_probe_token_from_env() -> int | None:
    """The token id the probe is made to fail for (FAIL_PROBE_TOKEN_ENV; tests only), or None."""
    fail_token = os.environ.get(FAIL_PROBE_TOKEN_ENV)
    return int(fail_token) if fail_token else None


def before_forward() -> None:
    """Phase 2, before the inner model runs: this step's options, and its interventions written."""
    st = STATE
    st.step_batch, st.step_options = None, []
    if not st.in_step or st.runner is None:
        if st.coefficients is not None:
            st.coefficients.prepare(None, [])  # dummy runs: no request's coefficients left over
        return
    batch = internals.batch_view(st.runner)
    options: list[CaptureOptions | None] = []
    for req_id in batch.req_ids if batch is not None else ():
        opts = CaptureOptions.from_extra_args(internals.request_extra_args(st.runner, req_id))
        if opts is not None:
            st.active[req_id] = opts.rid
        options.append(opts)
    st.step_batch, st.step_options = batch, options
    if st.coefficients is not None and st.coefficients.prepare(batch, options):
        st.intervened_steps += 1


def on_forward(stream: list[torch.Tensor]) -> None:
    """Phase 2: keep the rows that decide tokens. `stream`: 2L+1 tensors [tokens, d]."""
    st = STATE
    st.forward_calls += 1
    if not st.in_step or st.runner is None or st.step_batch is None:
        return
    batch, options = st.step_batch, st.step_options
    prompts = [internals.request_prompt_ids(st.runner, req_id)
               if opts is not None and opts.rows and opts.replay_from is not None else None
               for req_id, opts in zip(batch.req_ids, options)]
    rows, index = select_rows(batch, options, prompts)
    if not rows:
        return
    idx = torch.tensor(index, dtype=torch.long, device=stream[0].device)
    if index == list(range(stream[0].shape[0])):  # every row decides (decoding): one copy, no gather
        st.tensors = torch.stack(stream, dim=1)
    else:
        st.tensors = torch.stack([t.index_select(0, idx) for t in stream], dim=1)
    # the heads' outputs serve only detail FULL (dla_heads): not copied for a step without it
    st.heads = heads.rows(st.head_buffers, idx) if any(r.detail >= Detail.FULL for r in rows) else None
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
    gen = attributed_gen_rows(st.rows, logits.shape[0])
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
    rows, tensors, head_out = st.rows, st.tensors, st.heads
    st.rows, st.tensors, st.heads = [], None, None
    if any(r.kind == Kind.GEN for r in rows):
        join_sampled(rows, sampled_token_ids[:, 0].tolist() if sampled_token_ids is not None else [])
    st.step += 1
    for priority, part_rows, part_tensors, part_heads in split_step(rows, tensors, head_out):
        if st.emitter is not None:
            st.emitter.submit(st.step, part_rows, part_tensors, priority, part_heads)
        else:
            emit_step(st.step, part_rows, part_tensors, part_heads)


def _before_step(finished_req_ids) -> None:
    st = STATE
    for req_id in finished_req_ids:
        st.active.pop(req_id, None)
    if st.rows:  # a step whose sampling never ran: its rows decide nothing
        st.rows, st.tensors, st.heads = [], None, None
    st.in_step = True
    if st.emitter is not None:
        st.emitter.step_started()


def _after_step() -> None:
    st = STATE
    st.in_step = False
    st.step_ended_at = time.monotonic()
    if st.emitter is not None:
        st.emitter.step_ended()


def attach(runner, sender: CaptureSender | None, attributor=None, background: bool = True,
           idle_helper: bool = True, bases: tuple[torch.Tensor, torch.Tensor | None] | None = None,
           probe_process: tuple[str, str, str | None] | None = None) -> None:
    """Wrap the runner's step phases and connect the sender and the probe. `bases`: (basis
    [L, 3, k, d], attn_out bias [L, d] or None) for the model's intervention hooks.
    `probe_process`: (side-channel address, probe path, checkpoint dir) to run the background
    emitter in its own process (probe_process.py); None: as threads of this process."""
    st = STATE
    hooks = interventions.find_hooks(runner.get_model())
    st.head_buffers = heads.find(runner.get_model())
    if hooks and bases is not None:
        st.intervention_k = interventions.load_bases(hooks, *bases)
        st.coefficients = interventions.StepCoefficients(hooks)
    if st.runner is not runner:
        internals.wrap_step(runner, before_step=_before_step, after_step=_after_step,
                            before_sample=keep_logits, after_sample=on_sampled)
    if st.sender is not None and st.sender is not sender:
        st.sender.close()
    st.runner, st.sender, st.attributor = runner, sender, attributor
    st.fail_probe_token = fail_probe_token_from_env()
    if isinstance(st.emitter, ProbeProcess) and (not background or probe_process is None
                                                 or st.emitter.args != (*probe_process, idle_helper)):
        st.emitter.close()  # attached again with another probe, sink or mode
        st.emitter = None
    if background and st.emitter is None:
        if probe_process is not None:
            try:
                st.emitter = ProbeProcess(*probe_process, idle_helper=idle_helper)
            except Exception:  # noqa: BLE001 - attribution still works inside this process
                log.exception("alignlens: the probe process did not start; the probe runs inside the worker")
        if st.emitter is None:
            st.emitter = BackgroundEmitter(idle_helper=idle_helper)
        if st.emitter.helper is not None:  # the helper needs the worker's core between steps
            st.idle_wait_polls = internals.yield_core_while_waiting()
    elif not background:
        st.emitter = None
