"""Alignment features alpha from captured activations (METHOD.md section 3).

For decision positions n, blocks i = 0..L-1 (METHOD's l = i+1) and the captured
resid [N, L+1, d] (h_0..h_L) and resid_mid [N, L, d] (m_1..m_L):
    x_qkv[n, i]      = input_norm_i(h_i)                 what q/k/v read
    y_attn_out[n, i] = m_{i+1} - h_i - b_o,i             what the attention output projection wrote
                       (Gemma: (m_{i+1} - h_i) / (1 + w_post), o_proj's output over its RMS; Host.attn_writer)
    x_mlp_in[n, i]   = post_attn_norm_i(m_{i+1})         what gate/up (c_fc) read
    alpha[n, i, f]   = proj[i, f] @ vector[n, i, f]      [k]   (proj from alignlens.probe.svd)

Cost per token: 2 norms over L vectors plus L*3*k*d multiply-adds for the projection
(SmolLM2-135M, k=32: 1.7 M MACs).
"""

from __future__ import annotations

import torch
from torch import Tensor

from alignlens.probe.host import Host


def family_vectors(host: Host, resid: Tensor, resid_mid: Tensor) -> Tensor:
    """The vector each family reads/writes: resid [N, L+1, d], resid_mid [N, L, d] -> [N, L, 3, d] float32."""
    L = host.n_layers
    if resid.shape[-2] != L + 1 or resid_mid.shape[-2] != L:
        raise ValueError(f"resid must be [N, {L + 1}, d] and resid_mid [N, {L}, d] for this host, got "
                         f"{tuple(resid.shape)} and {tuple(resid_mid.shape)}")
    h_in = resid[..., :L, :].float()
    m = resid_mid.float()
    x_qkv = host.input_norm(None, h_in)
    y_attn = host.attn_writer(m - h_in)
    x_mlp = host.post_attn_norm(None, m)
    return torch.stack([x_qkv, y_attn, x_mlp], dim=-2)


def alignment_features(host: Host, proj: Tensor, resid: Tensor, resid_mid: Tensor) -> Tensor:
    """alpha [N, L, 3, k] from resid [N, L+1, d], resid_mid [N, L, d] and proj [L, 3, k, d]."""
    x = family_vectors(host, resid, resid_mid)  # [N, L, 3, d]
    return torch.einsum("nlfd,lfkd->nlfk", x, proj)


def output_gradient(host: Host, h_last: Tensor, token_ids: Tensor, cand_ids: Tensor, cand_logits: Tensor) -> Tensor:
    """g = d log p(y) / d h_L through the host's final norm and unembedding [N, d] float32.

    h_last [N, d], token_ids [N], host top-K cand_ids / cand_logits [N, K]. The expectation term of
    the softmax uses the host's top-K renormalized (exact up to the tail mass), so no full-vocabulary
    product is needed: u = W_U[y] - sum_c p_c W_U[c], then the final norm's vector-Jacobian product.
    """
    p = torch.softmax(cand_logits.float(), dim=-1)
    u = host.W_U[token_ids] - torch.einsum("nk,nkd->nd", p, host.W_U[cand_ids])
    return host.final_norm_vjp(h_last, u)


def output_gradient_on_bases(host: Host, basis: Tensor, h_last: Tensor, token_ids: Tensor, cand_ids: Tensor,
                             cand_logits: Tensor) -> Tensor:
    """g_out [N, L, 3, k]: output_gradient projected on every (block, family) basis [L, 3, k, d].
    The one definition training (probe.data) and serving (probe.attribution) both use."""
    return torch.einsum("lfkd,nd->nlfk", basis, output_gradient(host, h_last, token_ids, cand_ids, cand_logits))
