"""Probe-guided causal refinement: exact ablations of the pairs the probe ranks first.

The amortized `family_attribution` ranks the 3L (block, family) pairs of a token from the captured
activations alone; on held-out prompt kinds it orders them only a little better than the training
mean profile does (docs/benchmarks/probe-levers.md). The exact answer, `family_drop`, costs one
engine forward of the decision position per pair (3L + 1 requests per token, service/engine/causal.py).
Refinement spends a budget of k < 3L exact ablations where the probe says the large effects are:

1. `select_pairs`: the k pairs with the largest `family_attribution`, largest first (ties by pair
   index: the probe's predictions are clamped at 0, and a token with many zeros, rare on SmolLM2
   (0.7 of 90 per held-out token on average), fills its budget from block 1 up);
2. the engine ablates exactly those (family_drop there; NaN elsewhere: not measured);
3. `refined_attribution`: |family_drop| on the measured pairs, the probe's prediction (nats, the
   same unit) on the rest.

The evaluation (probe/evaluate.py, METHOD.md 6.3's metrics) scores the refined profile against the
exact drops of all 3L pairs, beside the same budget spent by the token-independent mean profile
(the null) and by the host's linearized effect (which needs a host backward per token; not served).
Pair index i = 3 * (block - 1) + family, family 0 qkv, 1 attn_out, 2 mlp_in (probe/names.py order).
"""

from __future__ import annotations

import torch
from torch import Tensor


def select_pairs(score: Tensor, k: int) -> Tensor:
    """Indices [..., k] into the flattened 3L pairs of `score` [..., L, 3], largest score first."""
    flat = score.flatten(-2)
    if not 0 < k <= flat.shape[-1]:
        raise ValueError(f"k = {k} must be in 1..{flat.shape[-1]} (the token's (block, family) pairs)")
    return torch.sort(flat, dim=-1, descending=True, stable=True).indices[..., :k]


def refined_attribution(score: Tensor, drop: Tensor) -> Tensor:
    """[..., L, 3] nats: |drop| where it was measured (not NaN), `score` (the probe's prediction) elsewhere."""
    return torch.where(torch.isnan(drop), score, drop.abs())


def refine_with(score: Tensor, drop: Tensor, k: int) -> Tensor:
    """The refined profile [..., L, 3] when the k pairs `select_pairs` picks from `score` are ablated and
    `drop` [..., L, 3] holds the exact drops of every pair (an evaluation's; only the selected ones are read)."""
    measured = torch.full_like(drop.flatten(-2), float("nan"))
    idx = select_pairs(score, k)
    measured.scatter_(-1, idx, drop.flatten(-2).gather(-1, idx))
    return refined_attribution(score, measured.view_as(drop))
