"""Direct logit attribution (METHOD.md section 7): the emitted token's logit, split exactly by component.

The residual stream is a sum: h_L = h_0 + sum_l (a_l + f_l), with a_l = m_l - h_{l-1} the attention
sublayer's write and f_l = h_l - m_l the MLP's (from the captured resid / resid_mid; probe/names.py).
The served quantity is the logit of y relative to the mean logit over the candidate set C (the
host's top-K plus y, as the probe scores it):

    total = logit_y - mean_{c in C} logit_c = final_norm(h_L) . u,   u = W_U[y] - mean_{c in C} W_U[c]

With the final norm's per-token scale frozen at its value on h_L, final_norm is linear in h:
    RMSNorm:   final_norm(x) = s * w * x,                  s = rsqrt(mean(h_L^2) + eps)
    LayerNorm: final_norm(x) = s * w * (x - mean(x)) + b,  s = rsqrt(var(h_L) + eps)
so total = v . h_0 + sum_l (v . a_l + v . f_l) (+ b . u for LayerNorm), with v = s * w * u
(LayerNorm: v centred, since x - mean(x) is a linear map whose adjoint centres). Each term is one
dot product of d; the split is exact up to float32 rounding (tests check 1e-4 against a
transformers forward).

    dla_embed [N]     v . h_0 (token and position embeddings); for LayerNorm hosts it also holds
                      b . u, the final norm's bias, which belongs to no block
    dla_attn  [N, L]  v . a_l, block l = 1..L (entry i is block i+1)
    dla_mlp   [N, L]  v . f_l
    dla_total [N]     final_norm(h_L) . u, computed directly: the sum of the three above
    dla_v     [N, d]  v, the frozen-scale readout direction (for attention_splits)
    dla_attn_out_directions [N, L, k]  (Detail.FULL) the attention write's part along each of the
                      top-k left singular directions of o_proj: (U_j . (a_l - b_o)) (U_j . v). The
                      rest of v . a_l is the bias b_o and the write outside the top-k span.
    dla_heads [N, L, H]  (Detail.FULL, from the heads' outputs z = [z_1 | ... | z_H], the input of
                      o_proj, captured in the forward: service/vllm_plugin/heads.py) head h's write
                      W_O[:, h] z_h read out: (W_O[:, h]^T v) . z_h. Over heads they sum to
                      dla_attn[l] minus the bias's v . b_o (before any attn_out intervention).
Gemma's sandwich norm writes a_l = (1 + w_post) * s_l * y_l, y_l = W_O z the o_proj output and s_l
= rsqrt(mean(y_l^2) + eps): with s_l frozen too the write stays linear in y, so the directions use
y / rms(y) (Host.attn_writer) read out by (1 + w_post) * v (Host.attn_readout), and head h is
s_l (W_O[:, h] z_h) . ((1 + w_post) * v); both still sum to v . a_l exactly.

A direct effect only: what later blocks do with a write is not in it (METHOD.md section 7). Cost
per token: (2L + 1) dot products of d plus the |C| rows of W_U averaged, ~0.06 M multiply-adds for
SmolLM2-135M (0.05 % of the host's forward); the directions add L*k*d (0.6 M); the heads
L*d*H*head_dim (10 M, 7 %: only at Detail.FULL).
"""

from __future__ import annotations

import torch
from torch import Tensor

from alignlens.probe.host import Host


def logit_direction(host: Host, h_last: Tensor, token_ids: Tensor, cand_ids: Tensor,
                    cand_valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(v [N, d], bias term [N], total [N]): the frozen-scale linear readout of logit_y - mean_C logit.

    h_last [N, d] = h_L, token_ids [N], cand_ids / cand_valid [N, C] (probe.model.candidate_set)."""
    h = h_last.float()
    w = cand_valid.float()
    mean_row = torch.einsum("nc,ncd->nd", w, host.W_U[cand_ids]) / w.sum(1, keepdim=True)
    u = host.W_U[token_ids] - mean_row  # [N, d]
    eps = host.spec.norm_eps
    if host.family != "gpt2":
        s = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        v = s * host.final_norm_weight * u
        bias = torch.zeros(h.shape[0], dtype=h.dtype, device=h.device)
    else:
        s = torch.rsqrt((h - h.mean(-1, keepdim=True)).pow(2).mean(-1, keepdim=True) + eps)
        v = s * host.final_norm_weight * u
        v = v - v.mean(-1, keepdim=True)
        bias = (host.final_norm_bias * u).sum(-1)
    total = (host.final_norm(h) * u).sum(-1)
    return v, bias, total


def direct_logit_attribution(host: Host, resid: Tensor, resid_mid: Tensor, token_ids: Tensor, cand_ids: Tensor,
                             cand_valid: Tensor, attn_out_basis: Tensor | None = None,
                             heads: Tensor | None = None) -> dict[str, Tensor]:
    """DLA for N decisions (see module docstring): resid [N, L+1, d], resid_mid [N, L, d].

    attn_out_basis [L, k, d] (the attn_out rows of probe.svd's basis) adds dla_attn_out_directions;
    heads [N, L, H * head_dim] (the o_proj inputs) adds dla_heads."""
    resid, mid = resid.float(), resid_mid.float()
    v, bias, total = logit_direction(host, resid[:, -1], token_ids, cand_ids, cand_valid)
    attn = mid - resid[:, :-1]  # a_l [N, L, d]
    mlp = resid[:, 1:] - mid  # f_l [N, L, d]
    out = {"dla_embed": (resid[:, 0] * v).sum(-1) + bias,
           "dla_attn": torch.einsum("nld,nd->nl", attn, v),
           "dla_mlp": torch.einsum("nld,nd->nl", mlp, v),
           "dla_total": total, "dla_v": v}
    out.update(attention_splits(host, v, attn, attn_out_basis, heads))
    return out


def attention_splits(host: Host, v: Tensor, attn: Tensor, attn_out_basis: Tensor | None = None,
                     heads: Tensor | None = None) -> dict[str, Tensor]:
    """The FULL-detail splits of the attention terms, from the readout direction v [N, d] and the
    attention writes attn [N, L, d]: dla_attn_out_directions (with attn_out_basis [L, k, d]) and
    dla_heads (with heads [N, L, H * head_dim])."""
    out = {}
    readout = host.attn_readout(v)  # [N, L, d]: v as o_proj's output sees it (Gemma: (1 + w_post) * v)
    if attn_out_basis is not None:
        comp = torch.einsum("lkd,nld->nlk", attn_out_basis, host.attn_writer(attn))
        out["dla_attn_out_directions"] = comp * torch.einsum("lkd,nld->nlk", attn_out_basis, readout)
    if heads is not None:
        n, L = heads.shape[0], heads.shape[1]
        w_o = host.attn_out_weights(v.device)
        w_v = torch.einsum("lde,nld->nle", w_o, readout)  # W_O^T v per block
        z = heads.float()
        if host.attn_post_norm_weight is not None:  # Gemma: the post-norm's scale on y = W_O z, frozen
            y = torch.einsum("lde,nle->nld", w_o, z)
            z = z * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + host.spec.norm_eps)
        out["dla_heads"] = (w_v * z).view(n, L, host.spec.n_heads, -1).sum(-1)
    return out


def pair_dla(dla_attn: Tensor, dla_mlp: Tensor) -> Tensor:
    """The DLA term each (block, family) acts through, signed [N, L, 3]: the attention write's for
    qkv and attn_out, the MLP write's for mlp_in (the probe's optional DLA inputs)."""
    return torch.stack([dla_attn, dla_attn, dla_mlp], dim=-1)


def dla_pair_importance(dla: dict[str, Tensor]) -> Tensor:
    """A DLA-derived (block, family) importance [N, L, 3] for the evaluation's baselines: |v . a_l|
    for qkv and attn_out (both act through the attention write), |v . f_l| for mlp_in."""
    return pair_dla(dla["dla_attn"], dla["dla_mlp"]).abs()
