"""Host loading, fingerprint and SVD factors on tiny random models."""

from __future__ import annotations

import pytest
import torch

from alignlens.probe.fingerprint import host_fingerprint
from alignlens.probe.host import Host, UnsupportedHost, spec_from_config
from alignlens.probe.names import FAMILIES
from alignlens.probe.svd import compute_factors, load_or_compute
from tests.support.tiny import tiny_gpt2, tiny_llama

K = 8


@pytest.mark.parametrize("make", [tiny_llama, lambda: tiny_llama(tied=False), tiny_gpt2])
def test_folder_and_memory_agree(make, tmp_path):
    model = make()
    model.save_pretrained(tmp_path)
    a, b = Host.from_model(model), Host.from_checkpoint(tmp_path)
    assert a.spec == b.spec
    assert host_fingerprint(a) == host_fingerprint(b)
    assert torch.equal(a.W_U, b.W_U)
    assert torch.equal(a.W_U, model.get_output_embeddings().weight.float())
    x = torch.randn(5, a.d_model)
    ref_logits = model.lm_head(model.base_model.norm(x) if a.family == "llama" else model.transformer.ln_f(x))
    torch.testing.assert_close(b.logits(x), ref_logits, rtol=1e-5, atol=1e-5)


def test_fingerprint_changes_with_weights():
    a, b = tiny_llama(seed=0), tiny_llama(seed=0)
    with torch.no_grad():
        b.model.layers[1].mlp.up_proj.weight[0, 0] += 1e-3
    assert host_fingerprint(Host.from_model(a)) != host_fingerprint(Host.from_model(b))


def test_gpt2_conv1d_is_transposed():
    model = tiny_gpt2()
    host = Host.from_model(model)
    blk = model.transformer.h[1]
    x = torch.randn(4, host.d_model)
    torch.testing.assert_close(x @ host.family_matrix(1, "qkv").T + blk.attn.c_attn.bias, blk.attn.c_attn(x))
    torch.testing.assert_close(x @ host.family_matrix(1, "attn_out").T + blk.attn.c_proj.bias, blk.attn.c_proj(x))
    assert host.family_matrix(1, "mlp_in").shape == (4 * host.d_model, host.d_model)


def test_unsupported_architecture_is_named():
    with pytest.raises(UnsupportedHost, match="gemma"):
        spec_from_config({"model_type": "gemma"})


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_svd_factors(make):
    host = Host.from_model(make())
    fac = compute_factors(host, K)
    L, d = host.n_layers, host.d_model
    assert fac.proj.shape == (L, 3, K, d) and fac.basis.shape == (L, 3, K, d) and fac.sigma.shape == (L, 3, K)
    for i in range(L):
        for j, f in enumerate(FAMILIES):
            W = host.family_matrix(i, f).double()
            s_ref = torch.linalg.svdvals(W)[:K]
            torch.testing.assert_close(fac.sigma[i, j].double(), s_ref, rtol=1e-5, atol=1e-6)
            B = fac.basis[i, j].double()
            torch.testing.assert_close(B @ B.T, torch.eye(K, dtype=torch.float64), atol=1e-5, rtol=0)
            if f == "attn_out":  # u_i^T W = sigma_i v_i^T  -> |W^T u_i| = sigma_i
                torch.testing.assert_close(torch.linalg.norm(W.T @ B.T, dim=0), s_ref, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(fac.proj[i, j], fac.basis[i, j])
            else:  # W v_i has norm sigma_i and proj = sigma * V^T
                torch.testing.assert_close(torch.linalg.norm(W @ B.T, dim=0), s_ref, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(fac.proj[i, j], fac.sigma[i, j, :, None] * fac.basis[i, j])


def test_svd_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNLENS_HOME", str(tmp_path))
    host = Host.from_model(tiny_llama())
    first = load_or_compute(host, K)
    files = list((tmp_path / "svd").glob("*.safetensors"))
    assert [p.name for p in files] == [f"{host_fingerprint(host)}-k{K}.safetensors"]
    second = load_or_compute(host, K)
    assert torch.equal(first.proj, second.proj) and torch.equal(first.sigma, second.sigma)


def test_top_singular_matches_svd():
    from alignlens.probe.svd import _top_singular
    torch.manual_seed(0)
    W = torch.randn(300, 64, dtype=torch.float64) @ torch.diag(torch.linspace(5, 0.1, 64, dtype=torch.float64))
    S, rows = _top_singular(W, 16)
    U, S_ref, Vh = torch.linalg.svd(W, full_matrices=False)
    torch.testing.assert_close(S, S_ref[:16])
    torch.testing.assert_close((rows * Vh[:16]).sum(1).abs(), torch.ones(16, dtype=torch.float64))


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_final_norm_vjp_matches_autograd(make):
    host = Host.from_model(make())
    h = torch.randn(3, host.d_model, requires_grad=True)
    u = torch.randn(3, host.d_model)
    (host.final_norm(h) * u).sum().backward()
    torch.testing.assert_close(host.final_norm_vjp(h.detach(), u), h.grad, rtol=1e-4, atol=1e-5)
