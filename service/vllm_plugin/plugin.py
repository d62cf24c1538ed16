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
