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
    """The block list of a transformers causal LM and its architecture family ("llama" or "gpt2")."""
    base = getattr(model, "model", None) or getattr(model, "transformer", None) or model
    if hasattr(base, "layers"):  # Llama, Mistral, Qwen2, Qwen3, SmolLM2, Gemma 3
        return list(base.layers), "llama"
    if hasattr(base, "h"):  # GPT-2
        return list(base.h), "gpt2"
    raise ValueError(f"unsupported architecture {type(model).__name__}: no decoder layer list found")


def _mid_module(layer: nn.Module, arch: str) -> nn.Module:
    # The module whose *input* is m_l: the post-attention norm (Llama) / ln_2 (GPT-2); in Gemma's
    # sandwich layout post_attention_layernorm norms the attention's output before the add, and
    # m_l is the input of pre_feedforward_layernorm.
    if arch == "gpt2":
        return layer.ln_2
    return getattr(layer, "pre_feedforward_layernorm", None) or layer.post_attention_layernorm


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
        handles.append(_mid_module(layer, arch).register_forward_pre_hook(mid_in(i)))
    try:
        model(input_ids=input_ids.view(1, -1), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return torch.stack(resid, dim=1), torch.stack(mid, dim=1)
