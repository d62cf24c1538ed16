"""Rank statistics shared by the offline evaluation (probe/evaluate.py) and the server's online
verification (service/server/verify.py), so both report the same correlation."""

from __future__ import annotations

import torch
from torch import Tensor


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise Spearman correlation of a, b [N, P] (average ranks for ties) -> [N]; a row that is
    constant in a or b gives 0."""
    ra, rb = _average_ranks(a.double()), _average_ranks(b.double())
    ra = ra - ra.mean(1, keepdim=True)
    rb = rb - rb.mean(1, keepdim=True)
    den = (ra.norm(dim=1) * rb.norm(dim=1)).clamp_min(1e-12)
    return ((ra * rb).sum(1) / den).float()


def _average_ranks(x: Tensor) -> Tensor:
    """Ranks 0..P-1 along dim 1, ties given the mean of their positions (vectorized over rows)."""
    n, p = x.shape
    values, order = x.sort(dim=1)
    starts = torch.ones_like(values, dtype=torch.bool)
    starts[:, 1:] = values[:, 1:] != values[:, :-1]
    group = starts.long().cumsum(1) - 1  # [n, p] tie-group id of each sorted position
    pos = torch.arange(p, dtype=x.dtype).expand(n, p)
    sums = torch.zeros(n, p, dtype=x.dtype).scatter_add_(1, group, pos)
    counts = torch.zeros(n, p, dtype=x.dtype).scatter_add_(1, group, torch.ones_like(pos))
    ranked = (sums / counts.clamp_min(1)).gather(1, group)
    return torch.empty_like(ranked).scatter_(1, order, ranked)
