"""alpha from captured resid/resid_mid equals the definition computed naively from module I/O."""

from __future__ import annotations

import pytest
import torch

from alignlens.probe.features import alignment_features
from alignlens.probe.host import Host
from alignlens.probe.replica import capture_replica
from alignlens.probe.svd import compute_factors
from tests.support.tiny import random_tokens, tiny_gpt2, tiny_llama, tiny_model

K = 8


def _record_module_io(model, arch: str, ids: torch.Tensor):
    """Inputs of q/c_attn, gate/c_fc and input/output of o_proj/attn.c_proj, per block: [T, *]."""
    rec: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    llama_shaped = arch in ("llama", "gemma")
    blocks = model.model.layers if llama_shaped else model.transformer.h
    for i, b in enumerate(blocks):
        reader_qkv = b.self_attn.q_proj if llama_shaped else b.attn.c_attn
        writer = b.self_attn.o_proj if llama_shaped else b.attn.c_proj
        reader_mlp = b.mlp.gate_proj if llama_shaped else b.mlp.c_fc

        def pre(key):
            return lambda _m, args: rec.__setitem__(key, args[0][0].detach().clone())

        def post(key):
            return lambda _m, _a, out: rec.__setitem__(key, out[0].detach().clone())

        handles += [reader_qkv.register_forward_pre_hook(pre((i, "qkv"))),
                    writer.register_forward_pre_hook(pre((i, "z"))),
                    writer.register_forward_hook(post((i, "attn_out"))),
                    reader_mlp.register_forward_pre_hook(pre((i, "mlp_in")))]
    with torch.no_grad():
        model(input_ids=ids.view(1, -1), use_cache=False)
    for h in handles:
        h.remove()
    return rec


@pytest.mark.parametrize("make,arch", [(tiny_llama, "llama"), (lambda: tiny_llama(tied=False), "llama"),
                                       (lambda: tiny_llama(bias=True), "llama"),
                                       (tiny_gpt2, "gpt2"),
                                       # Llama-shaped families probe/ reads the same way
                                       (lambda: tiny_model("qwen2"), "llama"), (lambda: tiny_model("qwen3"), "llama"),
                                       (lambda: tiny_model("mistral"), "llama"),
                                       # sandwich norms: attn_out's vector is o_proj's output over its RMS
                                       (lambda: tiny_model("gemma3"), "gemma")])
def test_features_match_naive_hooks(make, arch):
    model = make()
    host = Host.from_model(model)
    fac = compute_factors(host, K)
    ids = random_tokens(17)
    resid, resid_mid = capture_replica(model, ids)
    assert resid.shape == (17, host.n_layers + 1, host.d_model) and resid_mid.shape == (17, host.n_layers, host.d_model)
    alpha = alignment_features(host, fac.proj, resid, resid_mid)
    assert alpha.shape == (17, host.n_layers, 3, K)

    rec = _record_module_io(model, arch, ids)
    for i in range(host.n_layers):
        x = rec[(i, "qkv")]
        naive_qkv = x @ fac.proj[i, 0].T  # sigma * V^T x with x the real input of q/k/v
        writer_out = rec[(i, "attn_out")] - host.attn_out_bias[i]  # o_proj(z) without its bias
        # Gemma norms o_proj's output before adding it: its feature is of y / rms(y)
        rms = (writer_out.pow(2).mean(-1, keepdim=True) + host.spec.norm_eps).sqrt() if arch == "gemma" else 1.0
        naive_attn = writer_out @ fac.basis[i, 1].T / rms  # U^T y
        W_o = host.family_matrix(i, "attn_out").double()
        U = fac.basis[i, 1].double()
        v_scaled = (W_o.T @ U.T).T  # rows sigma_i v_i^T
        via_z = (rec[(i, "z")].double() @ v_scaled.T).float() / rms  # sigma * V^T z: the preprint's formula
        naive_mlp = rec[(i, "mlp_in")] @ fac.proj[i, 2].T
        scale = alpha[:, i].abs().max()
        for got, want in [(alpha[:, i, 0], naive_qkv), (alpha[:, i, 1], naive_attn),
                          (alpha[:, i, 1], via_z), (alpha[:, i, 2], naive_mlp)]:
            torch.testing.assert_close(got / scale, want / scale, rtol=0, atol=2e-5)
    # non-trivial: every family carries signal
    assert (alpha.abs().amax(dim=(0, 3)) > 1e-2).all()
