"""Teacher-forced capture of `resid` / `resid_mid` on a transformers replica of the host.

This is the reference the vLLM capture is tested against, and how probe/ collects
activations without vLLM (tests, ablation). Forward hooks are fine here: the
transformers model is neither compiled nor fused, and the hooks read the true
residual stream (HF blocks add their sublayers in place, no deferred residual).
"""

from __future__ import annotations

import torch
from torch import nn


def decoder_layers(model: nn.Module) -> tuple[list[nn.Module], str]:
    """The block list of a transformers causal LM and its architecture family ("llama", "gemma" or
    "gpt2", as probe.host names them)."""
    base = getattr(model, "model", None) or getattr(model, "transformer", None) or model
    if hasattr(base, "layers"):  # Llama, Mistral, Qwen2, Qwen3, SmolLM2; Gemma 3 (sandwich norms)
        layers = list(base.layers)
        return layers, "gemma" if hasattr(layers[0], "pre_feedforward_layernorm") else "llama"
    if hasattr(base, "h"):  # GPT-2
        return list(base.h), "gpt2"
    raise ValueError(f"unsupported architecture {type(model).__name__}: no decoder layer list found")


def sublayers(layer: nn.Module, arch: str) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(qkv's input norm, mlp_in's input norm, attention module) of one block: the modules whose
    outputs are the vectors qkv and mlp_in read and attn_out writes (the attention module's first
    output is o_proj's, before Gemma's post_attention_layernorm). The module whose *input* is m_l
    is the second."""
    if arch == "gpt2":
        return layer.ln_1, layer.ln_2, layer.attn
    mid = layer.pre_feedforward_layernorm if arch == "gemma" else layer.post_attention_layernorm
    return layer.input_layernorm, mid, layer.self_attn


@torch.no_grad()
def capture_replica(model: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `input_ids` [T] teacher-forced and return (resid [T, L+1, d], resid_mid [T, L, d]).

    Row t holds the activations at position t, i.e. those that decide token t+1.
    """
    layers, arch = decoder_layers(model)
    n = len(layers)
    resid: list[torch.Tensor | None] = [None] * (n + 1)
    mid: list[torch.Tensor | None] = [None] * n
    handles = []

    def first_in(_m, args, kwargs):
        hs = args[0] if args else kwargs["hidden_states"]
        resid[0] = hs[0].detach().clone()

    def block_out(i):
        def hook(_m, _args, out):
            hs = out[0] if isinstance(out, tuple) else out
            resid[i + 1] = hs[0].detach().clone()
        return hook

    def mid_in(i):
        def hook(_m, args):
            mid[i] = args[0][0].detach().clone()
        return hook

    handles.append(layers[0].register_forward_pre_hook(first_in, with_kwargs=True))
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_hook(block_out(i)))
        handles.append(sublayers(layer, arch)[1].register_forward_pre_hook(mid_in(i)))
    try:
        model(input_ids=input_ids.view(1, -1), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return torch.stack(resid, dim=1), torch.stack(mid, dim=1)
