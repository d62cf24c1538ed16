"""Interventions on a transformers replica: the reference the engine's interventions are checked against.

METHOD.md section 7: for block l and family f with orthonormal top-k basis rows B [k, d]
(probe.svd.SvdFactors.basis) and chosen directions D, at every position p in [start, end):
    readers (qkv, mlp_in):  x_p <- x_p + (scale - 1) B_D^T B_D x_p      x: the normed input the family reads
    writer (attn_out):      y_p <- y_p + (scale - 1) B_D^T B_D (y_p - b) y: the attention sublayer output, b its bias
scale 0 is the ablation of probe.ablation at those positions. Applied with forward hooks on the same
modules probe.ablation hooks (input norm, attention, post-attention norm).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from alignlens.probe.replica import decoder_layers, sublayers


@dataclass(frozen=True)
class Spec:
    """One intervention (the same fields as the engine's wire.Intervention)."""

    block: int  # 1..L
    family: int  # index into probe.names.FAMILIES
    directions: tuple[int, ...] = ()  # empty = all k
    scale: float = 0.0
    start: int = 0
    end: int | None = None


def _apply(x: Tensor, specs: Sequence[Spec], basis: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [batch, T, d] with `specs` (all on one (block, family)) applied; basis [k, d]."""
    T, k = x.shape[1], basis.shape[0]
    factor = torch.ones(T, k, dtype=x.dtype)
    for s in specs:
        dirs = list(s.directions) if s.directions else slice(None)
        factor[s.start:s.end, dirs] *= s.scale
    coef = factor - 1.0  # [T, k]
    B = basis.to(x.dtype)
    v = x if bias is None else x - bias.to(x.dtype)
    return x + ((v @ B.T) * coef) @ B


@contextlib.contextmanager
def intervened(model: nn.Module, specs: Sequence[Spec], basis: Tensor, attn_out_bias: Tensor) -> Iterator[None]:
    """Within the block, `model`'s forward applies `specs` (basis [L, 3, k, d], attn_out_bias [L, d])."""
    layers, arch = decoder_layers(model)
    handles = []
    for i, layer in enumerate(layers):
        by_family = {f: [s for s in specs if s.block == i + 1 and s.family == f] for f in range(3)}
        in_norm, mid_norm, attn = sublayers(layer, arch)
        if by_family[0]:
            handles.append(in_norm.register_forward_hook(
                lambda _m, _a, out, sp=by_family[0], i=i: _apply(out, sp, basis[i, 0])))
        if by_family[2]:
            handles.append(mid_norm.register_forward_hook(
                lambda _m, _a, out, sp=by_family[2], i=i: _apply(out, sp, basis[i, 2])))
        if by_family[1]:
            handles.append(attn.register_forward_hook(
                lambda _m, _a, out, sp=by_family[1], i=i: (_apply(out[0], sp, basis[i, 1], attn_out_bias[i]),
                                                           *out[1:])))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def greedy(model: nn.Module, prompt_ids: Sequence[int], max_tokens: int, specs: Sequence[Spec] = (),
           basis: Tensor | None = None, attn_out_bias: Tensor | None = None) -> tuple[list[int], list[float]]:
    """Greedy tokens and their log-probabilities under `specs` (a full forward per token, no cache)."""
    seq = list(prompt_ids)
    logprobs = []
    ctx = intervened(model, specs, basis, attn_out_bias) if specs else contextlib.nullcontext()
    with ctx:
        for _ in range(max_tokens):
            logits = model(input_ids=torch.tensor([seq])).logits[0, -1].float()
            token = int(logits.argmax())
            logprobs.append(float(torch.log_softmax(logits, -1)[token]))
            seq.append(token)
    return seq[len(prompt_ids):], logprobs
