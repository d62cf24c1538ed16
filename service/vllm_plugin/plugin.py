"""vLLM general plugin: register capture-enabled model classes.

vLLM calls `register()` in every process (engine core, workers) when plugins load.
Registering a class under an existing architecture name replaces vLLM's own class,
so a checkpoint whose config says `LlamaForCausalLM` is built with capture inside
its forward. Strings keep the import lazy (no CUDA init at plugin load).
"""

from __future__ import annotations

CAPTURE_ARCHITECTURES = {
    "LlamaForCausalLM": "alignlens.service.vllm_plugin.models:CaptureLlamaForCausalLM",
    "MistralForCausalLM": "alignlens.service.vllm_plugin.models:CaptureMistralForCausalLM",
    "Qwen2ForCausalLM": "alignlens.service.vllm_plugin.models:CaptureQwen2ForCausalLM",
    "Qwen3ForCausalLM": "alignlens.service.vllm_plugin.models:CaptureQwen3ForCausalLM",
    "Gemma3ForCausalLM": "alignlens.service.vllm_plugin.models:CaptureGemma3ForCausalLM",
    "GPT2LMHeadModel": "alignlens.service.vllm_plugin.models:CaptureGPT2LMHeadModel",
}

_watching = False

# Registered under the entry-point name alignlens.service.engine.config.PLUGIN_NAME (pyproject.toml).


def register() -> None:
    from vllm import ModelRegistry

    from alignlens.service.engine import runtime

    global _watching
    if not _watching:  # an engine process of `alignlens serve` stops when its parent dies
        _watching = runtime.watch_parent() is not None

    for arch, qualname in CAPTURE_ARCHITECTURES.items():
        ModelRegistry.register_model(arch, qualname)
    _engine_core_sleeps_while_waiting()


def _engine_core_sleeps_while_waiting() -> None:
    """In vLLM's engine-core process: its wait for the worker's step output polls with a short
    sleep instead of spinning (internals.yield_core_while_waiting, as the worker's between-step wait).

    The engine core hands a step to the worker and then busy-polls the shared-memory queue for the
    result, with sched_yield, for the whole step. On a CPU host that spin is a third busy thread
    beside the worker's forward and the emitter: measured on the 2-core machine, 8 concurrent
    streams, the engine core used 15-20 ms of CPU per generated token (0.8 of a core) while it
    waited. ALIGNLENS_ENGINE_CORE_SPIN=1 keeps vLLM's spin (for A/B measurements).
    """
    import logging
    import multiprocessing
    import os

    if not multiprocessing.current_process().name.startswith("EngineCore"):
        return
    if os.environ.get("ALIGNLENS_ENGINE_CORE_SPIN") == "1":
        return
    import importlib

    from alignlens.service.vllm_plugin import internals

    importlib.import_module("vllm.distributed.device_communicators.shm_broadcast")
    if internals.yield_core_while_waiting():
        logging.getLogger(__name__).info("alignlens: the engine core's wait for step outputs polls every %.0f us "
                                         "instead of spinning", internals.IDLE_POLL_S * 1e6)
