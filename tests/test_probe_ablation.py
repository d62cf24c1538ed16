"""Decision-position ablation: the batched hook ablator against a naive full recompute, and the fast
ablator against the hook ablator, on tiny random Llama and GPT-2 hosts."""

from __future__ import annotations

import pytest
import torch

from alignlens.probe.ablation import DecisionAblator
from alignlens.probe.fast_ablation import FastAblator
from alignlens.probe.host import Host
from alignlens.probe.replica import decoder_layers, sublayers
from alignlens.probe.svd import compute_factors
from tests.support.tiny import random_tokens, tiny_gpt2, tiny_llama, tiny_model

K = 8
# Gemma 3: sandwich norms, q/k norms, two rotary bases, sliding windows of 16 (sequences below are longer)
MAKERS = [(tiny_llama, "llama"), (lambda: tiny_llama(bias=True), "llama"), (tiny_gpt2, "gpt2"),
          (lambda: tiny_model("gemma3"), "gemma")]


def _naive_drop(model, host, basis, ids, p, y, i, j) -> float:
    """Full forward of ids[:p+1] with block i family j's top-k directions projected out at p only."""
    layers, arch = decoder_layers(model)
    layer = layers[i]
    in_norm, mid_norm, attn = sublayers(layer, arch)
    module = [in_norm, attn, mid_norm][j]
    B = basis[i, j]

    def hook(_m, _a, out):
        o = (out[0] if isinstance(out, tuple) else out).clone()
        v = o[0, p] - (host.attn_out_bias[i] if j == 1 else 0)
        o[0, p] = o[0, p] - (v @ B.T) @ B
        return (o,) + tuple(out[1:]) if isinstance(out, tuple) else o

    with torch.no_grad():
        clean = torch.log_softmax(model(input_ids=ids[:p + 1].view(1, -1)).logits[0, -1], -1)[y]
        handle = module.register_forward_hook(hook)
        try:
            ablated = torch.log_softmax(model(input_ids=ids[:p + 1].view(1, -1)).logits[0, -1], -1)[y]
        finally:
            handle.remove()
    return (clean - ablated).item()


@pytest.mark.parametrize("make,arch", MAKERS)
def test_hook_ablator_matches_naive(make, arch):
    model = make()
    host = Host.from_model(model)
    fac = compute_factors(host, K)
    ids = random_tokens(14)
    pos, ys = torch.tensor([3, 13]), torch.tensor([5, 9])
    base, drop = DecisionAblator(model, fac.basis, host.attn_out_bias).drops(ids, pos, ys)
    assert drop.shape == (2, host.n_layers, 3)
    for n, (p, y) in enumerate(zip(pos.tolist(), ys.tolist())):
        for i in range(host.n_layers):
            for j in range(3):
                assert abs(_naive_drop(model, host, fac.basis, ids, p, y, i, j) - drop[n, i, j].item()) < 1e-4
    assert drop.abs().max() > 1e-2  # the ablations do something


@pytest.mark.parametrize("make,arch", MAKERS)
def test_fast_ablator_matches_hook_ablator(make, arch):
    model = make()
    host = Host.from_model(model)
    fac = compute_factors(host, K)
    ids = random_tokens(30, seed=1)
    pos = torch.tensor([0, 4, 17, 29])
    ys = torch.tensor([3, 50, 7, 11])
    ref_base, ref = DecisionAblator(model, fac.basis, host.attn_out_bias).drops(ids, pos, ys)
    fast = FastAblator(model, fac.basis, host.attn_out_bias, max_rows=3 * host.n_layers * 3)  # 2 chunks
    base, drop = fast.drops(ids, pos, ys)
    torch.testing.assert_close(base, ref_base, rtol=0, atol=1e-4)
    torch.testing.assert_close(drop, ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("make,arch", [MAKERS[0], MAKERS[2], MAKERS[3]])
def test_linearized_drops_match_small_ablations(make, arch):
    """With a tiny basis scale the ablation is a small perturbation: drop ~ its first-order term."""
    model = make()
    host = Host.from_model(model)
    fac = compute_factors(host, K)
    ids = random_tokens(12, seed=2)
    pos, ys = torch.tensor([5, 11]), torch.tensor([4, 8])
    fast = FastAblator(model, fac.basis, host.attn_out_bias)
    lin, gamma = fast.linearized(ids, pos, ys)
    assert gamma.shape == (2, host.n_layers, 3, K)
    # scale the projection: removing eps * (B^T B x) instead of all of it (basis * sqrt(eps))
    eps = 1e-3
    small = FastAblator(model, fac.basis * eps ** 0.5, host.attn_out_bias)
    _, drop = small.drops(ids, pos, ys)
    torch.testing.assert_close(drop / eps, lin, rtol=0.05, atol=2e-3)
