"""The probe: a depth-causal transformer over the host's depth sequence, with two trained heads.

Inputs per decision position (L host blocks, d = d_model, k singular directions, w = width):
    resid  [N, L+1, d]   h_0..h_L
    alpha  [N, L, 3, k]  alignment features of blocks 1..L (probe.features)
    y      [N]           the emitted token

Trunk (METHOD.md section 4): depth token l = 0..L
    e_l = ActProj(h_l) + AlignProj(alpha_l) + pos_l            (alpha_0 = 0)   [N, L+1, w]
    ActProj = LayerNorm-Linear-GELU on h_l; AlignProj = Linear-GELU on alpha_l standardized with
    fixed per-(block, family, direction) statistics measured on the training data.
    A few pre-norm encoder layers with a causal mask over depth (token l sees depths <= l) give y_l.

Readout head (the decision at every depth, a tuned-lens-style residual correction):
    r_l = h_l + Out(y_l) for l < L,   r_L = h_L
    logits_l = final_norm(r_l) @ W_U[C]^T over the candidate set C (host top-K plus y)
with the host's frozen final norm and unembedding. Out is zero-initialised, so an untrained probe
is the logit lens; the last depth is the host's own readout (a correction there could only add
error), which makes final-depth agreement with the host exact by construction.

Ablation head (amortized ablation, METHOD.md section 4 option 2): for every (block i, family f)
    z_if  = GELU(LN(A_f alpha_if + B y_{i+1} + C y_L + E_if))                        [a]
    drop_if = v . GELU(W (z_if * (1 + Q W_U[y]))) + c_if                             scalar
trained to predict the host's own ablation drop of log p(y) (probe.ablation), in a compressed unit
t(x) = sign(x) log(1 + |x| / tau) (monotone, so rankings are unchanged). It is conditioned on the
emitted token through its unembedding row. This is the pair attribution the service reports; it is
faithful by construction wherever it generalises, and is checked against real ablations in eval.

FLOPs per token (multiply-adds, SmolLM2-135M: L=30, d=576, k=32, w=128, a=64, 2 layers, |C|=33):
    ActProj (L+1)dw 2.3M, AlignProj 3Lkw 0.4M, encoder 2*(L+1)*12w^2 12.2M, Out (L+1)wd 2.3M,
    readout (L+1)|C|d 0.6M, ablation head ~1.3M: about 19M MACs, plus the host's full-vocabulary
    logits for host_logprob and the candidate set (V d = 28.3M) -- see probe.attribution.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class ProbeConfig:
    """Shape and hyper-parameters of a probe; stored in every artifact."""

    n_layers: int  # L, host blocks
    d_model: int  # host residual width
    k: int = 32  # singular directions per (block, family)
    width: int = 128  # w, depth-token width
    n_encoder_layers: int = 2  # pre-norm encoder layers over depth
    n_heads: int = 4  # attention heads in the encoder
    mlp_ratio: int = 4  # encoder MLP hidden = mlp_ratio * w
    ablation_width: int = 64  # a, width of the amortized-ablation head
    top_k: int = 32  # K, host top-K candidates scored at serving (plus the emitted token)
    drop_tau: float = 0.1  # nats, scale of the compressed ablation-drop unit t(x)

    def to_dict(self) -> dict:
        return asdict(self)


def compress_drop(x: Tensor, tau: float) -> Tensor:
    """t(x) = sign(x) * log(1 + |x| / tau): the ablation head's training unit (monotone)."""
    return torch.sign(x) * torch.log1p(x.abs() / tau)


def expand_drop(t: Tensor, tau: float) -> Tensor:
    """Inverse of compress_drop: back to nats."""
    return torch.sign(t) * tau * torch.expm1(t.abs())


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer with a causal mask over depth."""

    def __init__(self, width: int, n_heads: int, mlp_ratio: int):
        super().__init__()
        self.n_heads = n_heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, x: Tensor) -> Tensor:
        N, S, W = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(N, S, 3, self.n_heads, W // self.n_heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(N, S, W))
        return x + self.mlp(self.ln2(x))


class ProbeModel(nn.Module):
    """Trunk + readout head + ablation head (see module docstring). Host tensors are passed in, not owned."""

    def __init__(self, cfg: ProbeConfig):
        super().__init__()
        self.cfg = cfg
        L, d, k, w, a = cfg.n_layers, cfg.d_model, cfg.k, cfg.width, cfg.ablation_width
        # Fixed input statistics (set from training data by probe.train; identity until then).
        self.register_buffer("alpha_mean", torch.zeros(L, 3, k))
        self.register_buffer("alpha_std", torch.ones(L, 3, k))
        self.act_proj = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, w), nn.GELU())
        self.align_proj = nn.Sequential(nn.Linear(3 * k, w), nn.GELU())
        self.pos = nn.Parameter(torch.randn(L + 1, w) * 0.02)
        self.layers = nn.ModuleList(EncoderLayer(w, cfg.n_heads, cfg.mlp_ratio) for _ in range(cfg.n_encoder_layers))
        self.ln_out = nn.LayerNorm(w)
        self.out = nn.Linear(w, d)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        # Ablation head.
        self.abl_alpha = nn.Parameter(torch.randn(3, k, a) / k ** 0.5)  # A_f
        self.abl_depth = nn.Linear(w, a)  # B
        self.abl_final = nn.Linear(w, a, bias=False)  # C
        self.abl_pair = nn.Parameter(torch.zeros(L, 3, a))  # E_if
        self.abl_ln = nn.LayerNorm(a)
        self.abl_token = nn.Linear(d, a)  # Q
        self.abl_mlp = nn.Sequential(nn.Linear(a, a), nn.GELU(), nn.Linear(a, 1))
        self.abl_bias = nn.Parameter(torch.zeros(L, 3))  # c_if

    def standardize(self, alpha: Tensor) -> Tensor:
        """alpha [N, L, 3, k] -> standardized [N, L, 3, k]."""
        return (alpha - self.alpha_mean) / self.alpha_std

    def trunk(self, resid: Tensor, alpha_std: Tensor) -> Tensor:
        """resid [N, L+1, d], standardized alpha [N, L, 3, k] -> depth states y [N, L+1, w]."""
        N = resid.shape[0]
        align = self.align_proj(alpha_std.reshape(N, self.cfg.n_layers, -1))  # [N, L, w]
        x = self.act_proj(resid) + self.pos
        x = torch.cat([x[:, :1], x[:, 1:] + align], dim=1)
        for layer in self.layers:
            x = layer(x)
        return self.ln_out(x)

    def corrected_resid(self, resid: Tensor, y: Tensor) -> Tensor:
        """r_l = h_l + Out(y_l) for l < L, r_L = h_L: [N, L+1, d]."""
        corr = self.out(y[:, :-1])
        return torch.cat([resid[:, :-1] + corr, resid[:, -1:]], dim=1)

    def ablation(self, y: Tensor, alpha_std: Tensor, token_rows: Tensor) -> Tensor:
        """Predicted ablation drops in the compressed unit: y [N, L+1, w], alpha_std [N, L, 3, k],
        token_rows = W_U[y_emitted] [N, d] -> [N, L, 3]."""
        z = torch.einsum("nlfk,fka->nlfa", alpha_std, self.abl_alpha)
        z = z + self.abl_depth(y[:, 1:])[:, :, None] + self.abl_final(y[:, -1])[:, None, None] + self.abl_pair
        z = F.gelu(self.abl_ln(z))
        q = self.abl_token(token_rows)[:, None, None]  # [N, 1, 1, a]
        return self.abl_mlp(z * (1 + q)).squeeze(-1) + self.abl_bias

    def forward(self, resid: Tensor, alpha: Tensor, token_rows: Tensor) -> tuple[Tensor, Tensor]:
        """-> (corrected residuals r [N, L+1, d], predicted compressed drops [N, L, 3])."""
        a = self.standardize(alpha)
        y = self.trunk(resid, a)
        return self.corrected_resid(resid, y), self.ablation(y, a, token_rows)


def readout_logits(final_norm, r: Tensor, W_rows: Tensor) -> Tensor:
    """Depth readouts over candidate rows: r [N, L+1, d], W_rows [N, C, d] -> [N, L+1, C] float32."""
    return torch.einsum("nld,ncd->nlc", final_norm(r), W_rows)


def candidate_set(cand_ids: Tensor, token_ids: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """C = host top-K plus the emitted token: cand_ids [N, >=K], token_ids [N] ->
    (ids [N, K+1], valid [N, K+1] bool; the appended y is invalid where it already is in the top-K)."""
    top = cand_ids[:, :top_k]
    ids = torch.cat([top, token_ids[:, None]], dim=1)
    valid = torch.ones_like(ids, dtype=torch.bool)
    valid[:, -1] = ~(top == token_ids[:, None]).any(dim=1)
    return ids, valid
