"""Alignment features alpha from captured activations (METHOD.md section 3).

For decision positions n, blocks i = 0..L-1 (METHOD's l = i+1) and the captured
resid [N, L+1, d] (h_0..h_L) and resid_mid [N, L, d] (m_1..m_L):
    x_qkv[n, i]      = input_norm_i(h_i)                 what q/k/v read
    y_attn_out[n, i] = m_{i+1} - h_i - b_o,i             what the attention output projection wrote
    x_mlp_in[n, i]   = post_attn_norm_i(m_{i+1})         what gate/up (c_fc) read
    alpha[n, i, f]   = proj[i, f] @ vector[n, i, f]      [k]   (proj from probe.svd)

Cost per token: 2 norms over L vectors plus L*3*k*d multiply-adds for the projection
(SmolLM2-135M, k=32: 1.7 M MACs).
"""

from __future__ import annotations

import torch
from torch import Tensor

from probe.host import Host


def family_vectors(host: Host, resid: Tensor, resid_mid: Tensor) -> Tensor:
    """The vector each family reads/writes: resid [N, L+1, d], resid_mid [N, L, d] -> [N, L, 3, d] float32."""
    L = host.n_layers
    if resid.shape[-2] != L + 1 or resid_mid.shape[-2] != L:
        raise ValueError(f"resid must be [N, {L + 1}, d] and resid_mid [N, {L}, d] for this host, got "
                         f"{tuple(resid.shape)} and {tuple(resid_mid.shape)}")
    h_in = resid[..., :L, :].float()
    m = resid_mid.float()
    x_qkv = host.input_norm(None, h_in)
    y_attn = m - h_in - host.attn_out_bias
    x_mlp = host.post_attn_norm(None, m)
    return torch.stack([x_qkv, y_attn, x_mlp], dim=-2)


def alignment_features(host: Host, proj: Tensor, resid: Tensor, resid_mid: Tensor) -> Tensor:
    """alpha [N, L, 3, k] from resid [N, L+1, d], resid_mid [N, L, d] and proj [L, 3, k, d]."""
    x = family_vectors(host, resid, resid_mid)  # [N, L, 3, d]
    return torch.einsum("nlfd,lfkd->nlfk", x, proj)
