"""Direct logit attribution (probe/dla.py) against a transformers forward with hooks on the sublayers."""

from __future__ import annotations

import pytest
import torch

from alignlens.probe.collect_replica import capture
from alignlens.probe.dla import direct_logit_attribution, logit_direction
from alignlens.probe.host import Host
from alignlens.probe.model import candidate_set
from alignlens.probe.replica import decoder_layers
from alignlens.probe.svd import load_or_compute
from tests.support.tiny import tiny_gpt2, tiny_llama, tiny_model


def _tiny(arch: str, seed: int, layers: int):
    if arch == "gemma":
        return tiny_model("gemma3", seed=seed, layers=layers)
    return tiny_llama(seed=seed, layers=layers) if arch == "llama" else tiny_gpt2(seed=seed, layers=layers)


def _sublayer_writes(model, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(attention writes [T, L, d], MLP writes [T, L, d], logits [T, V]) from hooks on each block's
    attention and MLP modules: what each sublayer adds to the stream, read independently of the
    captured resid / resid_mid the served DLA is computed from."""
    layers, arch = decoder_layers(model)
    attn, mlp = {}, {}
    hooks = []
    for i, layer in enumerate(layers):
        if arch == "gemma":  # sandwich norms: what is added is the post-norms' output
            a_mod, m_mod = layer.post_attention_layernorm, layer.post_feedforward_layernorm
        else:
            a_mod, m_mod = (layer.self_attn, layer.mlp) if arch == "llama" else (layer.attn, layer.mlp)
        hooks.append(a_mod.register_forward_hook(
            lambda _m, _a, out, i=i: attn.__setitem__(i, (out[0] if isinstance(out, tuple) else out)[0].detach())))
        hooks.append(m_mod.register_forward_hook(lambda _m, _a, out, i=i: mlp.__setitem__(i, out[0].detach())))
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
    finally:
        for h in hooks:
            h.remove()
    L = len(layers)
    return torch.stack([attn[i] for i in range(L)], 1), torch.stack([mlp[i] for i in range(L)], 1), logits


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma"])
def test_dla_splits_the_logit_exactly_and_matches_the_sublayer_writes(arch, tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNLENS_HOME", str(tmp_path))
    model = _tiny(arch, 1, 3)
    host = Host.from_model(model)
    prompt, completion = [5, 6, 7, 8], [9, 10, 11, 12, 13, 14]
    cap = capture(model, prompt, completion)
    attn_w, mlp_w, logits = _sublayer_writes(model, prompt + completion)
    rows = torch.arange(len(prompt) - 1, len(prompt) + len(completion) - 1)  # positions deciding the completion
    attn_w, mlp_w, logits = attn_w[rows], mlp_w[rows], logits[rows]
    y = cap["token_ids"]
    ids, valid = candidate_set(logits.topk(8).indices, y, 8)
    basis = load_or_compute(host, 4).basis[:, 1]
    dla = direct_logit_attribution(host, cap["resid"], cap["resid_mid"], y, ids, valid, basis)

    # the total is the transformers logit of y minus the mean candidate logit; the parts sum to it
    mean_c = torch.stack([logits[t, ids[t][valid[t]]].mean() for t in range(len(y))])
    torch.testing.assert_close(dla["dla_total"], logits.gather(1, y[:, None]).squeeze(1) - mean_c,
                               rtol=0, atol=1e-4)
    parts = dla["dla_embed"] + dla["dla_attn"].sum(1) + dla["dla_mlp"].sum(1)
    torch.testing.assert_close(parts, dla["dla_total"], rtol=0, atol=1e-4)

    # each block's term is the frozen-scale readout of what that sublayer's module returned
    h_L = cap["resid"][:, -1]
    u = host.W_U[y] - torch.stack([host.W_U[ids[t][valid[t]]].mean(0) for t in range(len(y))])
    if arch != "gpt2":  # RMSNorm (Gemma's (1 + w) is the Host's effective weight)
        v = torch.rsqrt(h_L.pow(2).mean(-1, keepdim=True) + host.spec.norm_eps) * host.final_norm_weight * u
    else:
        s = torch.rsqrt(h_L.var(-1, unbiased=False, keepdim=True) + host.spec.norm_eps)
        v = s * host.final_norm_weight * u
        v = v - v.mean(-1, keepdim=True)
    torch.testing.assert_close(dla["dla_attn"], torch.einsum("tld,td->tl", attn_w, v), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dla["dla_mlp"], torch.einsum("tld,td->tl", mlp_w, v), rtol=1e-4, atol=1e-5)

    # along attn_out's top-k directions: the projection of the bias-free write, k terms per block;
    # with k = d they would sum to dla_attn minus the bias term
    dirs = dla["dla_attn_out_directions"]
    assert dirs.shape == (len(y), host.n_layers, 4)
    full = load_or_compute(host, host.d_model).basis[:, 1]
    every = direct_logit_attribution(host, cap["resid"], cap["resid_mid"], y, ids, valid, full)
    bias_term = torch.einsum("ld,td->tl", host.attn_out_bias, v)
    torch.testing.assert_close(every["dla_attn_out_directions"].sum(-1) + bias_term, dla["dla_attn"],
                               rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(every["dla_attn_out_directions"][..., :4], dirs, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma"])
def test_dla_heads_are_each_heads_write_read_out(arch, tmp_path, monkeypatch):
    """dla_heads from the o_proj input (what the engine captures) = each head's write, obtained by
    running the model's own output projection on that head alone, read out through v."""
    monkeypatch.setenv("ALIGNLENS_HOME", str(tmp_path))
    model = _tiny(arch, 2, 2)
    host = Host.from_model(model)
    layers, _ = decoder_layers(model)
    projs = [layer.attn.c_proj if arch == "gpt2" else layer.self_attn.o_proj for layer in layers]
    z = {}
    hooks = [p.register_forward_pre_hook(lambda _m, args, i=i: z.__setitem__(i, args[0][0].detach()))
             for i, p in enumerate(projs)]
    prompt, completion = [3, 4, 5], [6, 7, 8, 9]
    try:
        cap = capture(model, prompt, completion)
    finally:
        for h in hooks:
            h.remove()
    rows = torch.arange(len(prompt) - 1, len(prompt) + len(completion) - 1)
    heads = torch.stack([z[i][rows] for i in range(len(projs))], 1)  # [T, L, H*dh]
    y = cap["token_ids"]
    logits = host.logits(cap["resid"][:, -1])
    ids, valid = candidate_set(logits.topk(8).indices, y, 8)
    dla = direct_logit_attribution(host, cap["resid"], cap["resid_mid"], y, ids, valid, heads=heads)
    H, dh = host.spec.n_heads, host.spec.head_dim
    assert dla["dla_heads"].shape == (len(y), len(projs), H)
    v, _, _ = logit_direction(host, cap["resid"][:, -1], y, ids, valid)
    for i, proj in enumerate(projs):
        bias = host.attn_out_bias[i]
        for h in range(H):
            alone = torch.zeros_like(heads[:, i])
            alone[:, h * dh:(h + 1) * dh] = heads[:, i, h * dh:(h + 1) * dh]
            with torch.no_grad():
                out = proj(alone)
            write = (out[0] if isinstance(out, tuple) else out) - bias  # head h's write, bias removed
            if arch == "gemma":  # through the post-norm with its scale on the whole write frozen
                with torch.no_grad():
                    y = proj(heads[:, i])
                norm = layers[i].post_attention_layernorm
                write = write * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + norm.eps) * (1 + norm.weight)
            torch.testing.assert_close(dla["dla_heads"][:, i, h], (write * v).sum(-1), rtol=1e-4, atol=1e-5)
        # over heads: the attention write's term minus the bias's
        torch.testing.assert_close(dla["dla_heads"][:, i].sum(-1) + (bias * v).sum(-1), dla["dla_attn"][:, i],
                                   rtol=1e-4, atol=1e-4)
