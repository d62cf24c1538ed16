"""Training the probe (METHOD.md section 4) and writing its artifact (section 5).

Phases (log lines name them):
1. data     — traces -> TokenSet (alignment features, host top-K targets; probe.data);
2. stats    — per-(block, family, direction) mean/std of alpha from the training tokens (fixed buffers);
3. fit      — AdamW with cosine decay, fixed seed. Every step takes one batch of tokens for the
              readout loss and one batch of ablation-labelled tokens for the ablation loss:
                readout:  sum over depths l < L of KL(host || readout_l) over the host's top-K
                          plus `negatives` vocabulary rows sampled per step (the tail),
                          + ce_weight * cross-entropy of the emitted token over C = top-K + y
                ablation: mean squared error of the predicted compressed drop t(drop) on every
                          (block, family), + rank_weight * a listwise ranking loss (ListNet: cross
                          entropy between softmax(t(drop)/T) and softmax(pred/T) over the 3L pairs)
4. save     — artifact with metadata (probe.artifact).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from probe.data import TokenSet
from probe.host import Host
from probe.model import ProbeConfig, ProbeModel, candidate_set, compress_drop, readout_logits

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Optimisation settings; stored in the artifact."""

    steps: int = 3000  # optimiser steps
    batch_size: int = 64  # tokens per readout batch
    ablation_batch_size: int = 32  # labelled tokens per ablation batch
    lr: float = 2e-3  # peak AdamW learning rate (cosine decay, 100 warm-up steps)
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    ce_weight: float = 0.1  # weight of the emitted-token cross-entropy beside the KL
    negatives: int = 512  # vocabulary rows sampled per step to stand in for the tail in the KL
    ablation_weight: float = 1.0  # weight of the ablation loss
    ablation_grad_to_trunk: bool = False  # let the ablation loss train the shared trunk too
    rank_weight: float = 1.0  # weight of the listwise ranking term inside the ablation loss
    rank_temperature: float = 0.5  # T of the ListNet softmax, in compressed-drop units
    seed: int = 0  # torch seed: init, batch order
    threads: int = 1  # torch CPU threads (2 is slower than 1 on a busy 2-core machine)
    max_minutes: float = 28.0  # wall-clock budget; training stops early (and says so) past it

    def to_dict(self) -> dict:
        return asdict(self)


def alpha_statistics(alpha: Tensor) -> tuple[Tensor, Tensor]:
    """alpha [N, L, 3, k] -> (mean, std) [L, 3, k]; std floored to avoid division by ~0."""
    mean = alpha.mean(0)
    std = alpha.std(0)
    return mean, std.clamp_min(std.mean() * 1e-3 + 1e-8)


def readout_loss(host: Host, model: ProbeModel, r: Tensor, batch: TokenSet, ce_weight: float,
                 negatives: Tensor) -> Tensor:
    """Depth-summed KL(host || readout) over the host's top-K plus sampled vocabulary rows
    `negatives` [S] (shared by the batch), and weighted CE of the emitted token over C, depths < L.

    The sampled rows stand in for the rest of the vocabulary: without them nothing stops the
    correction from raising tokens outside the top-K above it, which a full-vocabulary evaluation
    would (rightly) count as disagreement.
    """
    K = model.cfg.top_k
    B = batch.token_ids.shape[0]
    ids, valid = candidate_set(batch.cand_ids, batch.token_ids, K)
    neg = negatives[None].expand(B, -1)
    neg_ok = ~(neg[:, :, None] == batch.cand_ids[:, None, :K]).any(-1)  # [B, S] not already in top-K
    rows = torch.cat([ids, neg], dim=1)  # [B, K+1+S]
    logits = readout_logits(host.final_norm, r[:, :-1], host.W_U[rows])  # [B, L, K+1+S]
    with torch.no_grad():
        neg_logits = torch.einsum("bd,bsd->bs", host.final_norm(r[:, -1]), host.W_U[neg])
    mask = torch.cat([torch.ones(B, K, dtype=torch.bool), torch.zeros(B, 1, dtype=torch.bool), neg_ok], dim=1)
    target = torch.cat([batch.cand_logits[:, :K], torch.zeros(B, 1), neg_logits], dim=1)
    target = F.log_softmax(target.masked_fill(~mask, float("-inf")), dim=-1)
    q = F.log_softmax(logits.masked_fill(~mask[:, None], float("-inf")), dim=-1)
    p = target.exp()[:, None]
    kl = (p * (target[:, None] - q)).masked_fill(~mask[:, None], 0.0).sum(-1)  # [B, L]
    c_logits = logits[..., :K + 1].masked_fill(~valid[:, None], float("-inf"))
    y_pos = torch.where(valid[:, -1], K, (batch.cand_ids[:, :K] == batch.token_ids[:, None]).float().argmax(1))
    ce = -F.log_softmax(c_logits, dim=-1).gather(2, y_pos[:, None, None].expand(-1, logits.shape[1], 1)).squeeze(2)
    return (kl + ce_weight * ce).sum(1).mean()


def ablation_loss(pred: Tensor, drop: Tensor, tau: float, rank_weight: float, temperature: float) -> Tensor:
    """pred [B, L, 3] compressed drops, drop [B, L, 3] nats -> MSE + rank_weight * ListNet."""
    t = compress_drop(drop, tau).flatten(1)
    p = pred.flatten(1)
    mse = F.mse_loss(p, t)
    listnet = -(F.softmax(t / temperature, 1) * F.log_softmax(p / temperature, 1)).sum(1).mean()
    listnet = listnet + (F.softmax(t / temperature, 1) * F.log_softmax(t / temperature, 1)).sum(1).mean()
    return mse + rank_weight * listnet


def _batch(ds: TokenSet, idx: Tensor) -> TokenSet:
    return ds.subset(idx)


def train(host: Host, data: TokenSet, probe_cfg: ProbeConfig, cfg: TrainConfig,
          progress: bool = True) -> tuple[ProbeModel, dict]:
    """Fit a probe on `data`; returns (model in eval mode, summary for the artifact metadata)."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    model = ProbeModel(probe_cfg)
    mean, std = alpha_statistics(data.alpha)
    model.alpha_mean.copy_(mean)
    model.alpha_std.copy_(std)
    log.info("stats: alpha statistics from %d tokens", len(data))
    labeled = torch.nonzero(data.labeled).squeeze(1)
    use_ablation = labeled.numel() > 0 and cfg.ablation_weight > 0
    if not use_ablation:
        log.warning("fit: no ablation labels in the data; the ablation head stays untrained and the "
                    "artifact will say so")
    else:  # start the per-pair bias at the mean compressed drop, so the head fits deviations
        with torch.no_grad():
            model.abl_bias.copy_(compress_drop(data.drop[labeled], probe_cfg.drop_tau).mean(0))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = min(100, cfg.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup)) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / cfg.steps))))
    gen = torch.Generator().manual_seed(cfg.seed)
    order, pos = torch.randperm(len(data), generator=gen), 0
    l_order, l_pos = (labeled[torch.randperm(labeled.numel(), generator=gen)], 0) if use_ablation else (None, 0)
    model.train()
    bar = tqdm(range(cfg.steps), desc="train", disable=not progress)
    steps_done, stopped_early = 0, False
    ema: dict[str, float] = {}
    for step in bar:
        if pos + cfg.batch_size > len(order):
            order, pos = torch.randperm(len(data), generator=gen), 0
        b = _batch(data, order[pos:pos + cfg.batch_size])
        pos += cfg.batch_size
        r = model.corrected_resid(b.resid, model.trunk(b.resid, model.standardize(b.alpha)))
        negatives = torch.randperm(host.vocab_size, generator=gen)[:cfg.negatives]
        loss_r = readout_loss(host, model, r, b, cfg.ce_weight, negatives)
        loss = loss_r
        if use_ablation:
            if l_pos + cfg.ablation_batch_size > len(l_order):
                l_order, l_pos = labeled[torch.randperm(labeled.numel(), generator=gen)], 0
            lb = _batch(data, l_order[l_pos:l_pos + cfg.ablation_batch_size])
            l_pos += cfg.ablation_batch_size
            a = model.standardize(lb.alpha)
            with torch.set_grad_enabled(cfg.ablation_grad_to_trunk):
                states = model.trunk(lb.resid, a)
            pred = model.ablation(states, a, host.W_U[lb.token_ids])
            loss_a = ablation_loss(pred, lb.drop, probe_cfg.drop_tau, cfg.rank_weight, cfg.rank_temperature)
            loss = loss + cfg.ablation_weight * loss_a
            ema["abl"] = 0.98 * ema.get("abl", loss_a.item()) + 0.02 * loss_a.item()
        ema["readout"] = 0.98 * ema.get("readout", loss_r.item()) + 0.02 * loss_r.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        steps_done = step + 1
        if step % 20 == 0:
            bar.set_postfix({k: f"{v:.3f}" for k, v in ema.items()})
        if time.perf_counter() - start > cfg.max_minutes * 60:
            stopped_early = True
            log.warning("fit: stopped at step %d of %d: wall-clock budget of %.1f min reached",
                        steps_done, cfg.steps, cfg.max_minutes)
            break
    seconds = time.perf_counter() - start
    log.info("fit: %d steps in %.1f s (readout loss %.4f%s)", steps_done, seconds, ema["readout"],
             f", ablation loss {ema['abl']:.4f}" if "abl" in ema else "")
    summary = {"training_seconds": round(seconds, 1), "steps_done": steps_done, "stopped_early": stopped_early,
               "final_losses": {k: round(v, 5) for k, v in ema.items()},
               "ablation_head_trained": use_ablation}
    return model.eval(), summary
