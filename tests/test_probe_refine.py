"""Probe-guided causal refinement (probe/refine.py): which pairs are ablated and what is served."""

import pytest
import torch

from alignlens.probe.refine import refine_with, refined_attribution, select_pairs


def test_select_pairs_largest_first_ties_by_index():
    score = torch.tensor([[0.1, 0.5, 0.5], [0.9, 0.0, 0.2]])  # L = 2: pairs 0..5
    assert select_pairs(score, 3).tolist() == [3, 1, 2]  # 0.9, then the tie 0.5/0.5 in pair order
    assert select_pairs(score[None].expand(4, -1, -1), 1).tolist() == [[3]] * 4
    for k in (0, 7):
        with pytest.raises(ValueError, match="1..6"):
            select_pairs(score, k)


def test_refined_is_exact_where_measured_and_the_prediction_elsewhere():
    gen = torch.Generator().manual_seed(0)
    score = torch.rand(5, 4, 3, generator=gen)
    drop = torch.randn(5, 4, 3, generator=gen)
    assert torch.equal(refine_with(score, drop, 12), drop.abs())  # every pair ablated: the exact profile
    r = refine_with(score, drop, 2)
    top = select_pairs(score, 2)
    chosen = torch.zeros(5, 12, dtype=torch.bool).scatter_(1, top, True).view(5, 4, 3)
    assert torch.equal(r[chosen], drop.abs()[chosen]) and torch.equal(r[~chosen], score[~chosen])
    # what the server serves from the engine's NaN-filled family_drop is the same profile
    measured = torch.where(chosen, drop, torch.full_like(drop, float("nan")))
    assert torch.equal(refined_attribution(score, measured), r)
