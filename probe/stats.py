"""Rank statistics shared by the offline evaluation (probe/evaluate.py) and the server's online
verification (service/server/verify.py), so both report the same correlation."""

from __future__ import annotations

import torch
from torch import Tensor


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise Spearman correlation of a, b [N, P] (average ranks for ties) -> [N]."""
    def ranks(x: Tensor) -> Tensor:
        order = x.argsort(dim=1)
        r = torch.empty_like(x)
        r.scatter_(1, order, torch.arange(x.shape[1], dtype=x.dtype).expand_as(x).contiguous())
        # average ties: rank of equal values = mean of their positions
        out = torch.empty_like(r)
        for i in range(x.shape[0]):
            _, inv, counts = torch.unique(x[i], return_inverse=True, return_counts=True)
            sums = torch.zeros(counts.shape[0], dtype=x.dtype).index_add_(0, inv, r[i])
            out[i] = (sums / counts)[inv]
        return out
    ra, rb = ranks(a.double()), ranks(b.double())
    ra = ra - ra.mean(1, keepdim=True)
    rb = rb - rb.mean(1, keepdim=True)
    den = (ra.norm(dim=1) * rb.norm(dim=1)).clamp_min(1e-12)
    return ((ra * rb).sum(1) / den).float()
