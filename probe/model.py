"""The probe: a depth-causal transformer over the host's depth sequence, with two trained heads.

Inputs per decision position (L host blocks, d = d_model, k singular directions, w = width):
    resid  [N, L+1, d]   h_0..h_L
    alpha  [N, L, 3, k]  alignment features of blocks 1..L (probe.features)
    g_out  [N, L, 3, k]  the output gradient d log p(y)/d h_L (through the final norm and W_U;
                         probe.features.output_gradient) projected on every family's basis
    y      [N]           the emitted token, entering as its unembedding row W_U[y] [N, d]

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
error), which makes final-depth agreement with the host exact by construction. With
ProbeConfig.tuned_lens the readout is r_l = h_l + A_l h_l + b_l + Out_l(y_l): a frozen tuned lens
(probe.tuned_lens) under the probe's correction, and with ProbeConfig.depth_out Out has one matrix
per depth (the shipped SmolLM2 probe has both since 2026-11-30: probe.train.retrain_readout).

Importance head (amortized ablation, METHOD.md section 4 option 2). For block i, family f:
    phi_if = [alpha_if ; g_out_if (both standardized) ; log|comp_if|, log|g_out_if|, log|comp_if . g_out_if|]
    s_if   = [log|comp_if|, log|g_out_if|, log|comp_if . g_out_if|, host log p(y), host entropy]
    z_if   = GELU(LN(A_f phi_if + B y_{i+1} + C y_L + E_if)) * (1 + Q W_U[y])                [a]
    [u_if, v_if] = M(z_if) + W_if s_if + b_if                                                   [2]
with comp = B_if x_if, the family vector's coordinates in its top-k basis. The per-pair affine part
W_if s_if alone (how much of the vector the ablation removes, how confident the host is) carries
most of the predictable signal; the shared MLP adds the context. u_if is trained to predict
log(|drop_if| + eps), drop_if being the host's own ablation effect on log p(y) (probe.ablation /
probe.fast_ablation: the top-k directions projected out at the decision position), so
    family_attribution_if = max(exp(u_if) - eps, 0)      predicted |change of log p(y)| in nats
and family_importance is its per-block share. v_if is an auxiliary output trained on the host's
linearized effect |gamma_if . comp_if| (one replica backward pass per sequence labels EVERY
training token, whereas real ablations are affordable for a sample), which shapes the shared
features with 5-10x more contexts.

Why magnitudes, and why not gradients: measured on SmolLM2-135M (held-out tokens, Spearman over
the 90 pairs against real ablations, mean over tokens; probe/artifacts/README.md):
    - gradient x input of the probe's own readout (METHOD's default): -0.07; the readout sees h_L
      directly, so its dependence on alpha is arbitrary;
    - the host's own gradient x input (linearized ablation, a backward pass of the host): 0.60
      signed, 0.58 on magnitudes -- but a probe cannot amortize the host's gradient at inner
      blocks (a head trained on it reached 0.10: those gradients are uncorrelated with anything
      cheap, e.g. the output gradient, corr ~0.0);
    - so the signs of the many small effects are out of reach for a cheap probe (this head: 0.19,
      the token-independent mean profile 0.19), while magnitudes are predictable (mean profile
      0.49, this head 0.54). Importance (METHOD section 4 defines it from |gradient x input|) is
      a magnitude; it is evaluated against |drop|, and the signed numbers are reported beside it.
    - tried and dropped: a head regressing signed (compressed) drops directly (0.19, no better
      than the mean profile), a ListNet ranking term (slightly worse in a head-only fit). The few
      ablation labels do not train the shared trunk (TrainConfig.ablation_grad_to_trunk, off;
      not measured on the real host).

FLOPs per token (multiply-adds, SmolLM2-135M: L=30, d=576, k=32, w=128, a=64, 2 layers, |C|=33):
    ActProj (L+1)dw 2.3M, AlignProj 3Lkw 0.4M, encoder 2*(L+1)*12w^2 12.2M, Out (L+1)wd 2.3M,
    readout (L+1)|C|d 0.6M, importance head 3L((2k+3)a + a*a + 2a) + L*w*a = 1.0M: about 19M;
    with the tuned lens L*d*d 10.0M more (depth_out adds parameters, not multiply-adds);
    plus what probe.attribution adds around it (host logits 28.3M, features and g_out 3.4M).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alignlens.probe.tuned_lens import TunedLens


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
    head_width: int = 64  # a, width of the importance head
    eps_nats: float = 0.01  # eps of the log-magnitude targets log(|drop| + eps)
    top_k: int = 32  # K, host top-K candidates scored at serving (plus the emitted token)
    # The trunk's depth tokens include AlignProj(alpha_l). False: the activation-only probe of the
    # same size (the evaluation's test of whether weight alignment adds information).
    alignment_features: bool = True
    # The readout starts from a tuned lens (probe.tuned_lens) inside the probe: r_l = h_l + A_l h_l
    # + b_l + Out(y_l), the lens fitted first on the same tokens and frozen (probe.train). Costs
    # L*d*d multiply-adds per token (10 M for SmolLM2).
    tuned_lens: bool = False
    # The importance head also reads each pair's direct logit attribution (probe.dla.pair_dla):
    # two more per-pair scalars, sign(dla) log(1 + |dla|) and log(|dla| + 1e-3).
    dla_inputs: bool = False
    # Out has its own zero-initialised matrix per depth (DepthLinear) instead of one shared by every
    # depth: the same multiply-adds per token, L times the parameters (probe.train.retrain_readout).
    depth_out: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


N_SCALARS = 5  # per-pair scalars s_if: log|comp|, log|g_out|, log|comp . g_out|, host log p(y), host entropy
N_DLA_SCALARS = 2  # ... and with ProbeConfig.dla_inputs: sign(dla) log(1 + |dla|), log(|dla| + 1e-3)


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


class DepthLinear(nn.Module):
    """One affine map per depth: x [N, L, w] -> x_l @ W_l + b_l [N, L, d] (weights [L, w, d], [L, d])."""

    def __init__(self, n_depths: int, width: int, d_model: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_depths, width, d_model))
        self.bias = nn.Parameter(torch.empty(n_depths, d_model))

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("nlw,lwd->nld", x, self.weight) + self.bias


class ProbeModel(nn.Module):
    """Trunk + readout head + importance head (see module docstring). Host tensors are passed in."""

    def __init__(self, cfg: ProbeConfig):
        super().__init__()
        self.cfg = cfg
        L, d, k, w, a = cfg.n_layers, cfg.d_model, cfg.k, cfg.width, cfg.head_width
        # Fixed statistics, set from training data by probe.train (identity until then), and the
        # host's singular values (component = alpha / comp_scale: sigma for readers, 1 for attn_out).
        self.register_buffer("alpha_mean", torch.zeros(L, 3, k))
        self.register_buffer("alpha_std", torch.ones(L, 3, k))
        self.register_buffer("g_out_std", torch.ones(L, 3, k))
        self.register_buffer("comp_scale", torch.ones(L, 3, k))
        self.act_proj = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, w), nn.GELU())
        self.align_proj = nn.Sequential(nn.Linear(3 * k, w), nn.GELU())
        self.pos = nn.Parameter(torch.randn(L + 1, w) * 0.02)
        self.layers = nn.ModuleList(EncoderLayer(w, cfg.n_heads, cfg.mlp_ratio) for _ in range(cfg.n_encoder_layers))
        self.ln_out = nn.LayerNorm(w)
        self.out = DepthLinear(L, w, d) if cfg.depth_out else nn.Linear(w, d)
        self.lens = TunedLens(L, d) if cfg.tuned_lens else None
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        # Importance head.
        extra = N_DLA_SCALARS if cfg.dla_inputs else 0
        self.i_in = nn.Parameter(torch.randn(3, 2 * k + 3 + extra, a) / (2 * k + 3 + extra) ** 0.5)  # A_f
        self.i_depth = nn.Linear(w, a)  # B
        self.i_final = nn.Linear(w, a, bias=False)  # C
        self.i_pair = nn.Parameter(torch.zeros(L, 3, a))  # E_if
        self.i_ln = nn.LayerNorm(a)
        self.i_token = nn.Linear(d, a)  # Q
        self.i_mlp = nn.Sequential(nn.Linear(a, a), nn.GELU(), nn.Linear(a, 2))  # M
        self.i_bias = nn.Parameter(torch.zeros(L, 3, 2))  # b_if
        self.i_lin = nn.Parameter(torch.zeros(L, 3, N_SCALARS + extra, 2))  # w_if: per-pair affine on s_if

    def standardize(self, alpha: Tensor) -> Tensor:
        """alpha [N, L, 3, k] -> standardized [N, L, 3, k]."""
        return (alpha - self.alpha_mean) / self.alpha_std

    def trunk(self, resid: Tensor, alpha_std: Tensor) -> Tensor:
        """resid [N, L+1, d], standardized alpha [N, L, 3, k] -> depth states y [N, L+1, w]."""
        N = resid.shape[0]
        x = self.act_proj(resid) + self.pos
        if self.cfg.alignment_features:
            align = self.align_proj(alpha_std.reshape(N, self.cfg.n_layers, -1))  # [N, L, w]
            x = torch.cat([x[:, :1], x[:, 1:] + align], dim=1)
        for layer in self.layers:
            x = layer(x)
        return self.ln_out(x)

    def corrected_resid(self, resid: Tensor, y: Tensor) -> Tensor:
        """r_l = h_l + Out(y_l) for l < L (with the tuned lens: h_l + A_l h_l + b_l + Out(y_l)),
        r_L = h_L: [N, L+1, d]."""
        base = resid if self.lens is None else self.lens(resid)
        corr = self.out(y[:, :-1])
        return torch.cat([base[:, :-1] + corr, resid[:, -1:]], dim=1)

    def pair_features(self, alpha: Tensor, g_out: Tensor, token_feats: Tensor,
                      dla: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(phi [N, L, 3, 2k+3(+2)], s [N, L, 3, N_SCALARS(+2)]) from raw alpha, g_out [N, L, 3, k],
        token_feats [N, 2] = (host log p(y), host entropy over the top-K) and, when the probe reads
        it (ProbeConfig.dla_inputs), the pairs' signed DLA [N, L, 3] (probe.dla.pair_dla)."""
        comp = alpha / self.comp_scale
        logs = torch.stack([torch.log(comp.norm(dim=-1) + 1e-6), torch.log(g_out.norm(dim=-1) + 1e-9) + 5,
                            torch.log((comp * g_out).sum(-1).abs() + 1e-6)], dim=-1)
        if self.cfg.dla_inputs:
            if dla is None:
                raise ValueError("this probe reads direct logit attribution (ProbeConfig.dla_inputs): pass dla")
            logs = torch.cat([logs, torch.sign(dla)[..., None] * torch.log1p(dla.abs())[..., None],
                              torch.log(dla.abs() + 1e-3)[..., None]], dim=-1)
        phi = torch.cat([self.standardize(alpha), g_out / self.g_out_std, logs], dim=-1)
        s = torch.cat([logs, token_feats[:, None, None].expand(-1, logs.shape[1], 3, -1)], dim=-1)
        return phi, s

    def importance(self, y: Tensor, feats: tuple[Tensor, Tensor], token_rows: Tensor) -> Tensor:
        """[u, v] log-magnitude predictions [N, L, 3, 2]: y [N, L+1, w] trunk states, feats from
        pair_features, token_rows = W_U[y_emitted] [N, d]."""
        phi, s = feats
        z = torch.einsum("nlfk,fka->nlfa", phi, self.i_in)
        z = z + self.i_depth(y[:, 1:])[:, :, None] + self.i_final(y[:, -1])[:, None, None] + self.i_pair
        z = F.gelu(self.i_ln(z)) * (1 + self.i_token(token_rows)[:, None, None])
        return self.i_mlp(z) + self.i_bias + torch.einsum("nlfs,lfso->nlfo", s, self.i_lin)

    def log_magnitude(self, effect: Tensor) -> Tensor:
        """The training target of u and v: log(|effect| + eps) for an effect on log p(y) in nats."""
        return torch.log(effect.abs() + self.cfg.eps_nats)

    def attribution(self, u: Tensor) -> Tensor:
        """Predicted |change of log p(y)| in nats from the log-magnitude output u [...] (the inverse
        of log_magnitude, clamped at 0)."""
        return (u.exp() - self.cfg.eps_nats).clamp_min(0)

    def forward(self, resid: Tensor, alpha: Tensor, g_out: Tensor, token_rows: Tensor,
                token_feats: Tensor, dla: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """-> (corrected residuals r [N, L+1, d], log-magnitude predictions [N, L, 3, 2])."""
        y = self.trunk(resid, self.standardize(alpha))
        return self.corrected_resid(resid, y), self.importance(y, self.pair_features(alpha, g_out, token_feats, dla),
                                                               token_rows)


LSE_FLOOR = -80.0  # exp of (logit - max) below this is < 2e-35: a whole vocabulary of them adds < 1e-29


def vocab_logsumexp(logits: Tensor) -> Tensor:
    """logsumexp over the last dimension (the host's full vocabulary), with every (logit - max)
    floored at LSE_FLOOR first; training (probe.data) and serving (probe.attribution) both use it.

    torch's exp takes a slow path where its result underflows (measured on this AVX2 CPU, one
    thread, [16, 262144] float32: 76-89 ms with most entries below -87, 22 ms without), and a
    262k-entry vocabulary has many such entries; the floor changes the sum by less than
    V * e^-80 relative to its largest term (1 for the max itself)."""
    m = logits.amax(dim=-1, keepdim=True)
    return ((logits - m).clamp_min_(LSE_FLOOR).exp_().sum(dim=-1, keepdim=True).log_() + m).squeeze(-1)


def token_features(host_logprob: Tensor, cand_logits: Tensor) -> Tensor:
    """[N, 2]: the host's log p(y) (full vocabulary) and the entropy of its top-K distribution (nats)."""
    p = torch.softmax(cand_logits.float(), dim=-1)
    return torch.stack([host_logprob.float(), -(p * torch.log(p.clamp_min(1e-12))).sum(-1)], dim=-1)


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
