"""The tuned lens (Belrose et al. 2023): the depth-readout baseline the probe has to beat.

One affine translator per depth l < L, zero-initialised as a residual (so an untrained lens is the
logit lens), read out through the host's frozen final norm and unembedding:
    r_l = h_l + A_l h_l + b_l          (l = 0..L-1),   r_L = h_L
    lens_l = final_norm(r_l) @ W_U^T
trained to minimise sum_l KL(host || lens_l), the host's final distribution being the target.

The full-vocabulary KL costs V*d per depth and token (49152 x 576 for SmolLM2: 30 depths make it
~850 MFLOP per token and step), so training, like the probe's readout loss (probe.train), takes the
KL over the host's top-K plus `negatives` vocabulary rows sampled per step; evaluation
(probe.evaluate) always uses the full vocabulary. Adam, a fixed seed, one thread.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from alignlens.probe.host import Host

if TYPE_CHECKING:  # probe.data -> probe.model -> here: no import cycle at run time
    from alignlens.probe.data import TokenSet

log = logging.getLogger(__name__)


@dataclass
class TunedLensConfig:
    steps: int = 400  # Adam steps
    batch_size: int = 64  # tokens per step
    lr: float = 1e-3  # peak learning rate (cosine decay)
    negatives: int = 512  # vocabulary rows sampled per step for the tail of the KL
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


class TunedLens(nn.Module):
    """L zero-initialised affine translators [L, d, d] + [L, d] on h_0..h_{L-1}."""

    def __init__(self, n_layers: int, d_model: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_layers, d_model, d_model))
        self.bias = nn.Parameter(torch.zeros(n_layers, d_model))

    def forward(self, resid: Tensor) -> Tensor:
        """resid [N, L+1, d] -> translated r [N, L+1, d] (depth L unchanged)."""
        h = resid[:, :-1]
        r = h + torch.einsum("nld,led->nle", h, self.weight) + self.bias
        return torch.cat([r, resid[:, -1:]], dim=1)


def subset_kl(host: Host, r: Tensor, batch: "TokenSet", top_k: int, negatives: Tensor) -> Tensor:
    """[B, L] KL(host || readout of r_l) for depths l < L over the host's top-K plus the sampled rows
    `negatives` [S] (those already in the top-K masked out); the host side is computed from h_L."""
    B = r.shape[0]
    top = batch.cand_ids[:, :top_k]
    neg = negatives[None].expand(B, -1)
    ok = torch.cat([torch.ones_like(top, dtype=torch.bool), ~(neg[:, :, None] == top[:, None]).any(-1)], 1)
    rows = torch.cat([top, neg], dim=1)
    W = host.W_U[rows]  # [B, K+S, d]
    q = torch.einsum("nld,ncd->nlc", host.final_norm(r[:, :-1]), W).masked_fill(~ok[:, None], float("-inf"))
    with torch.no_grad():
        p = torch.einsum("nd,ncd->nc", host.final_norm(batch.resid[:, -1]), W).masked_fill(~ok, float("-inf"))
        logp = torch.log_softmax(p, -1)
    logq = torch.log_softmax(q, -1)
    return (logp.exp()[:, None] * (logp[:, None] - logq)).masked_fill(~ok[:, None], 0.0).sum(-1)


def train_tuned_lens(host: Host, data: "TokenSet", cfg: TunedLensConfig | None = None,
                     top_k: int = 32) -> tuple[TunedLens, dict]:
    """Fit a tuned lens on `data` (its resid rows); returns (lens in eval mode, summary)."""
    cfg = cfg or TunedLensConfig()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    lens = TunedLens(host.n_layers, host.d_model)
    opt = torch.optim.Adam(lens.parameters(), lr=cfg.lr)
    warm = max(1, cfg.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / cfg.steps))))
    start, ema = time.perf_counter(), None
    order, pos = torch.randperm(len(data), generator=gen), 0
    for _ in range(cfg.steps):
        if pos + cfg.batch_size > len(order):
            order, pos = torch.randperm(len(data), generator=gen), 0
        b = data.subset(order[pos:pos + cfg.batch_size])
        pos += cfg.batch_size
        negatives = torch.randperm(host.vocab_size, generator=gen)[:cfg.negatives]
        loss = subset_kl(host, lens(b.resid), b, top_k, negatives).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
    seconds = time.perf_counter() - start
    log.info("tuned lens: %d steps on %d tokens in %.1f s (depth-summed KL %.3f)", cfg.steps, len(data), seconds, ema)
    return lens.eval(), {"config": cfg.to_dict(), "tokens": len(data), "seconds": round(seconds, 1),
                         "final_loss": round(ema or 0.0, 4)}
