"""Training the probe (METHOD.md section 4) and writing its artifact (section 5).

Phases (log lines name them):
1. data     — traces -> TokenSet (alignment features, output gradients, host top-K targets, host
              gradient labels; probe.data);
2. stats    — fixed buffers: per-(block, family, direction) mean/std of alpha and std of g_out from
              the training tokens, the host's singular values, each pair's typical attribution size;
3. fit      — AdamW with cosine decay and a fixed seed. Every step takes one batch of tokens, and
              one batch of ablation-labelled tokens:
                readout:  sum over depths l < L of KL(host || readout_l) over the host's top-K
                          plus `negatives` vocabulary rows sampled per step (the tail),
                          + ce_weight * cross-entropy of the emitted token over C = top-K + y;
                linearized (all tokens): squared error of v against log(|lin| + eps), lin the host's
                          linearized ablation effect (probe.collect_replica.label_gradients);
                ablation (labelled tokens): squared error of u against log(|drop| + eps), drop the
                          host's real ablation effect, + rank_weight * ListNet (cross entropy between
                          softmax(target/T) and softmax(u/T) over the 3L pairs: the evaluation is a
                          rank correlation over pairs);
4. save     — artifact with metadata (probe.artifact).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from alignlens.probe.data import TokenSet, build_dataset, component_scale
from alignlens.probe.host import Host
from alignlens.probe.model import ProbeConfig, ProbeModel, candidate_set, readout_logits, token_features
from alignlens.probe.svd import SvdFactors
from alignlens.probe.tuned_lens import TunedLens, TunedLensConfig, subset_kl, train_tuned_lens

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Optimisation settings; stored in the artifact."""

    steps: int = 3000  # optimiser steps
    batch_size: int = 64  # tokens per step (readout and linearized losses)
    lr: float = 2e-3  # peak AdamW learning rate (cosine decay, 100 warm-up steps)
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    ce_weight: float = 0.1  # weight of the emitted-token cross-entropy beside the KL
    negatives: int = 512  # vocabulary rows sampled per step to stand in for the tail in the KL
    ablation_batch_size: int = 32  # ablation-labelled tokens per step
    ablation_weight: float = 1.0  # weight of the ablation (u) loss
    linearized_weight: float = 0.5  # weight of the auxiliary linearized-effect (v) loss
    rank_weight: float = 0.0  # weight of the ListNet term inside the ablation loss (0: it did not help on SmolLM2)
    rank_temperature: float = 0.5  # T of the ListNet softmax, in log-nats
    centred_weight: float = 0.0  # weight of the per-token centred term inside the ablation loss (see ablation_loss)
    ablation_grad_to_trunk: bool = False  # let the (few) ablation labels train the shared trunk too
    seed: int = 0  # torch seed: init, batch order, negatives
    threads: int = 1  # torch CPU threads (2 is slower than 1 on a busy 2-core machine)
    max_minutes: float = 28.0  # wall-clock budget; training stops early (and says so) past it

    def to_dict(self) -> dict:
        return asdict(self)


def alpha_statistics(alpha: Tensor) -> tuple[Tensor, Tensor]:
    """alpha [N, L, 3, k] -> (mean, std) [L, 3, k]; std floored to avoid division by ~0."""
    mean = alpha.mean(0)
    std = alpha.std(0)
    return mean, std.clamp_min(std.mean() * 1e-3 + 1e-8)


def set_statistics(model: ProbeModel, data: TokenSet, factors: SvdFactors) -> None:
    """Fixed buffers from the training data and the host's singular values (no learning), and the
    importance head's per-pair bias started at the mean targets."""
    mean, std = alpha_statistics(data.alpha)
    model.alpha_mean.copy_(mean)
    model.alpha_std.copy_(std)
    g_std = data.g_out.std(0)
    model.g_out_std.copy_(g_std.clamp_min(g_std.mean() * 1e-3 + 1e-12))
    model.comp_scale.copy_(component_scale(factors))
    init_head_bias(model, data)


def init_head_bias(model: ProbeModel, data: TokenSet) -> None:
    """The importance head's per-pair bias started at the mean log-magnitude targets: u at the
    ablation labels', v at the linearized labels' (each where the data carry them)."""
    with torch.no_grad():
        if data.drop is not None:
            model.i_bias[..., 0] = model.log_magnitude(data.drop[data.labeled]).mean(0)
        if data.lin is not None:
            model.i_bias[..., 1] = model.log_magnitude(data.lin[data.has_lin]).mean(0)


def readout_loss(host: Host, model: ProbeModel, r: Tensor, batch: TokenSet, ce_weight: float,
                 negatives: Tensor, depth_weights: Tensor | None = None) -> Tensor:
    """Depth-summed KL(host || readout) over the host's top-K plus sampled vocabulary rows
    `negatives` [S] (shared by the batch), and weighted CE of the emitted token over C, depths < L.

    The sampled rows stand in for the rest of the vocabulary: without them nothing stops the
    correction from raising tokens outside the top-K above it, which a full-vocabulary evaluation
    would (rightly) count as disagreement. `depth_weights` [L]: each depth's term is multiplied by
    its weight before the sum over depths (None: all 1).
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
    per_depth = kl + ce_weight * ce  # [B, L]
    if depth_weights is not None:
        per_depth = per_depth * depth_weights
    return per_depth.sum(1).mean()


def ablation_loss(u: Tensor, target: Tensor, rank_weight: float, temperature: float,
                  centred_weight: float = 0.0) -> Tensor:
    """u [B, L, 3] predicted log-magnitudes, target [B, L, 3] = log_magnitude(drop) ->
    MSE + rank_weight * ListNet + centred_weight * MSE of both centred per token (each minus its mean
    over the 3L pairs: the token's profile shape without its overall scale, which is what the
    per-token and share-centered rank correlations score)."""
    t = target.flatten(1)
    p = u.flatten(1)
    soft = F.softmax(t / temperature, 1)
    listnet = -(soft * F.log_softmax(p / temperature, 1)).sum(1) + (soft * F.log_softmax(t / temperature, 1)).sum(1)
    loss = F.mse_loss(p, t) + rank_weight * listnet.mean()
    if centred_weight:
        loss = loss + centred_weight * F.mse_loss(p - p.mean(1, keepdim=True), t - t.mean(1, keepdim=True))
    return loss


def _optimiser(model: ProbeModel, cfg: TrainConfig):
    """AdamW over the trainable parameters, linear warm-up then cosine decay over cfg.steps."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    warmup = min(100, cfg.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup)) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / cfg.steps))))
    return opt, sched


def _over_budget(start: float, cfg: TrainConfig, steps_done: int, what: str) -> bool:
    """Whether a fit that began at `start` (perf_counter) has used its wall-clock budget; logs it."""
    if time.perf_counter() - start <= cfg.max_minutes * 60:
        return False
    log.warning("fit: %s stopped at step %d of %d: wall-clock budget of %.1f min reached", what, steps_done,
                cfg.steps, cfg.max_minutes)
    return True


@torch.no_grad()
def _trunk_states(model: ProbeModel, data: TokenSet, chunk: int = 256) -> Tensor:
    """The trunk's depth states [N, L+1, w] for every token of `data` (a frozen trunk's, computed once)."""
    return torch.cat([model.trunk(data.resid[s:s + chunk], model.standardize(data.alpha[s:s + chunk]))
                      for s in range(0, len(data), chunk)])


def _step(model: ProbeModel, opt, sched, loss: Tensor) -> None:
    """One optimiser step: backward, gradient norm clipped at 1, update, schedule."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()


def train(host: Host, data: TokenSet, factors: SvdFactors, probe_cfg: ProbeConfig, cfg: TrainConfig,
          progress: bool = True) -> tuple[ProbeModel, dict]:
    """Fit a probe on `data`; returns (model in eval mode, summary for the artifact metadata)."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    model = ProbeModel(probe_cfg)
    set_statistics(model, data, factors)
    log.info("stats: input statistics from %d tokens", len(data))
    lens_summary = None
    if model.lens is not None:  # the readout starts from a tuned lens fitted on the same tokens, kept
        # frozen: the probe learns a correction on top of it (training the L*d*d translators jointly
        # made each step 4x slower on this CPU)
        lens, lens_summary = train_tuned_lens(host, data, top_k=probe_cfg.top_k)
        model.lens.load_state_dict(lens.state_dict())
        model.lens.requires_grad_(False)
    use_lin = data.lin is not None and cfg.linearized_weight > 0
    labeled = torch.nonzero(data.labeled).squeeze(1)
    use_ablation = labeled.numel() > 0 and cfg.ablation_weight > 0
    if not use_ablation:
        log.warning("fit: no ablation labels in the data; the importance head is not trained on real "
                    "ablations and the artifact will say so")
    rows = torch.nonzero(data.has_lin).squeeze(1) if use_lin else torch.arange(len(data))
    opt, sched = _optimiser(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    order, pos = rows[torch.randperm(rows.numel(), generator=gen)], 0
    l_order, l_pos = (labeled[torch.randperm(labeled.numel(), generator=gen)], 0) if use_ablation else (None, 0)
    model.train()
    bar = tqdm(range(cfg.steps), desc="train", disable=not progress)
    steps_done, stopped_early = 0, False
    ema: dict[str, float] = {}

    def track(name: str, value: Tensor) -> None:
        ema[name] = 0.98 * ema.get(name, value.item()) + 0.02 * value.item()

    for step in bar:
        if pos + cfg.batch_size > len(order):
            order, pos = rows[torch.randperm(rows.numel(), generator=gen)], 0
        b = data.subset(order[pos:pos + cfg.batch_size])
        pos += cfg.batch_size
        r, pred = model(b.resid, b.alpha, b.g_out, host.W_U[b.token_ids], token_features(b.host_logprob, b.cand_logits),
                        b.dla)
        negatives = torch.randperm(host.vocab_size, generator=gen)[:cfg.negatives]
        loss = readout_loss(host, model, r, b, cfg.ce_weight, negatives)
        track("readout", loss)
        if use_lin:
            loss_lin = F.mse_loss(pred[..., 1], model.log_magnitude(b.lin))
            loss = loss + cfg.linearized_weight * loss_lin
            track("linearized", loss_lin)
        if use_ablation:
            if l_pos + cfg.ablation_batch_size > len(l_order):
                l_order, l_pos = labeled[torch.randperm(labeled.numel(), generator=gen)], 0
            lb = data.subset(l_order[l_pos:l_pos + cfg.ablation_batch_size])
            l_pos += cfg.ablation_batch_size
            with torch.set_grad_enabled(cfg.ablation_grad_to_trunk):
                states = model.trunk(lb.resid, model.standardize(lb.alpha))
            feats = model.pair_features(lb.alpha, lb.g_out, token_features(lb.host_logprob, lb.cand_logits), lb.dla)
            u = model.importance(states, feats, host.W_U[lb.token_ids])[..., 0]
            loss_abl = ablation_loss(u, model.log_magnitude(lb.drop), cfg.rank_weight, cfg.rank_temperature,
                                     cfg.centred_weight)
            loss = loss + cfg.ablation_weight * loss_abl
            track("ablation", loss_abl)
        _step(model, opt, sched, loss)
        steps_done = step + 1
        if step % 20 == 0:
            bar.set_postfix({k: f"{v:.3f}" for k, v in ema.items()})
        if time.perf_counter() - start > cfg.max_minutes * 60:
            stopped_early = True
            log.warning("fit: stopped at step %d of %d: wall-clock budget of %.1f min reached",
                        steps_done, cfg.steps, cfg.max_minutes)
            break
    seconds = time.perf_counter() - start
    log.info("fit: %d steps in %.1f s (losses %s)", steps_done, seconds,
             ", ".join(f"{k} {v:.4f}" for k, v in ema.items()))
    summary = {"training_seconds": round(seconds, 1), "steps_done": steps_done, "stopped_early": stopped_early,
               "final_losses": {k: round(v, 5) for k, v in ema.items()},
               "importance_head_trained_on_ablations": use_ablation, "linearized_auxiliary": use_lin,
               "tuned_lens_init": lens_summary}
    return model.eval(), summary


def train_artifact(checkpoint_dir: str, trace_paths: list[str], out_path: str, probe_overrides: dict | None = None,
                   cfg: TrainConfig | None = None, max_tokens: int | None = None, progress: bool = True) -> dict:
    """The whole `alignlens probe train`: host + SVD factors, data, fit, artifact. Returns the metadata."""
    from alignlens.probe.artifact import save_artifact
    from alignlens.probe.data import trace_metadata
    from alignlens.probe.fingerprint import host_fingerprint
    from alignlens.probe.svd import load_or_compute

    cfg = cfg or TrainConfig()
    torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    host = Host.from_checkpoint(checkpoint_dir)
    fingerprint = host_fingerprint(host)
    probe_cfg = ProbeConfig(n_layers=host.n_layers, d_model=host.d_model, **(probe_overrides or {}))
    factors = load_or_compute(host, probe_cfg.k)
    log.info("data: reading %s", ", ".join(map(str, trace_paths)))
    data = build_dataset(host, factors, trace_paths, top_k=probe_cfg.top_k, max_tokens=max_tokens)
    model, summary = train(host, data, factors, probe_cfg, cfg, progress=progress)
    labeled = data.labeled
    meta = {
        "host_fingerprint": fingerprint,
        "host_spec": host.spec.to_dict(),
        "family_map": host.describe(),
        "k": probe_cfg.k,
        "train_config": cfg.to_dict(),
        "data": {"traces": [{"file": str(p), "metadata": trace_metadata(p)} for p in trace_paths],
                 "tokens": len(data), "prompts": int(data.prompt_index.unique().numel()),
                 "gradient_labelled_tokens": int(data.has_lin.sum()),
                 "ablation_labelled_tokens": int(labeled.sum()),
                 "train_mean_abs_drop": data.drop[labeled].abs().mean(0).tolist() if labeled.any() else None},
        "training_seconds": round(time.perf_counter() - start, 1),
        "fit": summary,
        "evaluation": None,
    }
    save_artifact(out_path, model, meta)
    log.info("save: %s (%.1f s in all)", out_path, meta["training_seconds"])
    return meta


HEAD_PREFIX = "i_"  # the importance head's parameters (probe.model.ProbeModel: i_in, i_depth, ... i_lin)


def retrain_head(host: Host, data: TokenSet, model: ProbeModel, cfg: TrainConfig,
                 progress: bool = True) -> tuple[ProbeModel, dict]:
    """Retrain only the importance head of a trained probe on `data`'s ablation labels (and, as in
    `train`, the auxiliary linearized-effect labels); the trunk, readout and input statistics stay
    bit-identical, so the depth readout and its evaluation do not change.

    The head restarts from a fresh seeded initialisation (its per-pair bias at the new mean targets),
    as in `train`: the result depends on the labels, not on the head it replaces. This is the lever
    "more ablation labels" at a fraction of a full training's cost (the head is ~2 % of the probe's
    multiply-adds, and the trunk's states need no gradient)."""
    labeled = torch.nonzero(data.labeled).squeeze(1)
    if labeled.numel() == 0 or data.drop is None:
        raise ValueError("retrain_head: the data carry no ablation labels (run `alignlens probe label`)")
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    fresh = ProbeModel(model.cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(HEAD_PREFIX):
                p.copy_(fresh.get_parameter(name))
    init_head_bias(model, data)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith(HEAD_PREFIX))
    use_lin = data.lin is not None and cfg.linearized_weight > 0
    opt, sched = _optimiser(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.eval()  # no dropout anywhere; eval keeps the frozen trunk's behaviour exactly
    states = _trunk_states(model, data)  # the trunk is frozen: its states once, for every token
    tok = token_features(data.host_logprob, data.cand_logits)
    lin_rows = torch.nonzero(data.has_lin).squeeze(1) if use_lin else None

    def head(rows: Tensor) -> Tensor:
        """The head's [u, v] log-magnitudes [B, L, 3, 2] for `rows` of the data."""
        return model.importance(states[rows], model.pair_features(data.alpha[rows], data.g_out[rows], tok[rows],
                                                                  None if data.dla is None else data.dla[rows]),
                                host.W_U[data.token_ids[rows]])
    ema: dict[str, float] = {}
    steps_done, stopped_early = 0, False
    for step in tqdm(range(cfg.steps), desc="train head", disable=not progress):
        b = labeled[torch.randint(0, labeled.numel(), (cfg.ablation_batch_size,), generator=gen)]
        u = head(b)[..., 0]
        loss = cfg.ablation_weight * ablation_loss(u, model.log_magnitude(data.drop[b]), cfg.rank_weight,
                                                   cfg.rank_temperature, cfg.centred_weight)
        ema["ablation"] = 0.98 * ema.get("ablation", loss.item()) + 0.02 * loss.item()
        if use_lin:
            c = lin_rows[torch.randint(0, lin_rows.numel(), (cfg.batch_size,), generator=gen)]
            v = head(c)[..., 1]
            loss_lin = F.mse_loss(v, model.log_magnitude(data.lin[c]))
            loss = loss + cfg.linearized_weight * loss_lin
            ema["linearized"] = 0.98 * ema.get("linearized", loss_lin.item()) + 0.02 * loss_lin.item()
        _step(model, opt, sched, loss)
        steps_done = step + 1
        if _over_budget(start, cfg, steps_done, "head"):
            stopped_early = True
            break
    for p in model.parameters():
        p.requires_grad_(True)
    seconds = time.perf_counter() - start
    log.info("fit: head, %d steps in %.1f s on %d labelled tokens (losses %s)", steps_done, seconds,
             labeled.numel(), ", ".join(f"{k} {v:.4f}" for k, v in ema.items()))
    return model.eval(), {"training_seconds": round(seconds, 1), "steps_done": steps_done,
                          "stopped_early": stopped_early, "final_losses": {k: round(v, 5) for k, v in ema.items()},
                          "importance_head_trained_on_ablations": True, "linearized_auxiliary": use_lin,
                          "head_only": True}


def _state_equal_except(a: ProbeModel, b: ProbeModel, prefixes: tuple[str, ...]) -> bool:
    """Whether two probes have the same tensors (names and values) outside the names with `prefixes`."""
    sa, sb = a.state_dict(), b.state_dict()
    keys = {k for k in sa if not k.startswith(prefixes)}
    return keys == {k for k in sb if not k.startswith(prefixes)} and all(torch.equal(sa[k], sb[k]) for k in keys)


def readout_state_equal(a: ProbeModel, b: ProbeModel) -> bool:
    """Whether two probes share every tensor outside the importance head (trunk, readout, lens and
    input statistics): then their depth readouts are identical and so is that part of an evaluation."""
    return _state_equal_except(a, b, (HEAD_PREFIX,))


def _load_base(checkpoint_dir: str, trace_paths: list[str], base_artifact: str,
               threads: int) -> tuple[Host, ProbeModel, dict, TokenSet]:
    """(host, the trained probe at `base_artifact`, its metadata, the traces' TokenSet) for the
    `--head-of` / `--readout-of` retrainings."""
    from alignlens.probe.artifact import load_artifact
    from alignlens.probe.fingerprint import host_fingerprint
    from alignlens.probe.svd import load_or_compute

    torch.set_num_threads(threads)
    host = Host.from_checkpoint(checkpoint_dir)
    model, base_meta = load_artifact(base_artifact, host_fingerprint(host), checkpoint_dir)
    factors = load_or_compute(host, model.cfg.k)
    log.info("data: reading %s", ", ".join(map(str, trace_paths)))
    return host, model, base_meta, build_dataset(host, factors, trace_paths, top_k=model.cfg.top_k)


def retrain_head_artifact(checkpoint_dir: str, trace_paths: list[str], base_artifact: str, out_path: str,
                          cfg: TrainConfig | None = None, progress: bool = True) -> dict:
    """`alignlens probe train --head-of BASE`: `retrain_head` of the probe at `base_artifact` on the
    traces' labels, written to `out_path` with the base's metadata, the new data summary (its
    ablation-labelled token count and mean |drop| profile, the evaluation's null) and no
    evaluation. Returns the metadata."""
    from alignlens.probe.artifact import save_artifact
    from alignlens.probe.data import trace_metadata

    cfg = cfg or TrainConfig()
    start = time.perf_counter()
    host, model, base_meta, data = _load_base(checkpoint_dir, trace_paths, base_artifact, cfg.threads)
    model, summary = retrain_head(host, data, model, cfg, progress=progress)
    labeled = data.labeled
    meta = {k: v for k, v in base_meta.items() if k not in ("format_version", "probe_config")}
    meta["data"] = {**base_meta.get("data", {}),
                    "traces": [{"file": str(p), "metadata": trace_metadata(p)} for p in trace_paths],
                    "ablation_labelled_tokens": int(labeled.sum()),
                    "train_mean_abs_drop": data.drop[labeled].abs().mean(0).tolist()}
    meta["head_retrained"] = {"from": str(base_artifact), "from_fit": base_meta.get("fit"),
                              "from_ablation_labelled_tokens":
                                  base_meta.get("data", {}).get("ablation_labelled_tokens"),
                              "train_config": cfg.to_dict(), "fit": summary,
                              "seconds": round(time.perf_counter() - start, 1)}
    meta["evaluation"] = None
    save_artifact(out_path, model, meta)
    log.info("save: %s (importance head retrained on %d labelled tokens)", out_path, int(labeled.sum()))
    return meta


READOUT_PREFIXES = ("lens.", "out.")  # the depth readout's own parameters: the tuned lens and Out


def faithfulness_state_equal(a: ProbeModel, b: ProbeModel) -> bool:
    """Whether two probes share every tensor outside the depth readout (trunk, importance head and
    input statistics): then their family attributions are identical, and so are the evaluation's
    faithfulness numbers of the served fields (the untrained-head baseline is built from the trunk-
    and readout-independent part of the config: probe.evaluate.evaluate)."""
    return _state_equal_except(a, b, READOUT_PREFIXES)


def retrain_readout(host: Host, data: TokenSet, model: ProbeModel, lens_cfg: TunedLensConfig, cfg: TrainConfig,
                    validation_every: int = 10, lens: TunedLens | None = None, depth_out: bool = True,
                    balance_depths: bool = True, progress: bool = True) -> tuple[ProbeModel, dict]:
    """Give a trained probe the tuned-lens readout: r_l = h_l + A_l h_l + b_l + Out(y_l).

    1. A tuned lens is fitted on all of `data` by the published recipe (`lens_cfg`, the same recipe
       `probe eval --tuned-lens-data` trains its baseline with) and frozen.
    2. Out restarts at zero (so the readout starts exactly at the tuned lens) and is trained alone
       with the probe's readout loss (probe.train.readout_loss) on the frozen trunk's states. The
       trunk, the importance head and the input statistics stay bit-identical, so the family
       attributions, and that part of the evaluation, do not change (`faithfulness_state_equal`).
    Out is trained on the prompts whose index is not a multiple of `validation_every`; those are
    kept to report, per depth, the subset KL of the lens alone and of lens + Out (the summary's
    `validation`), the in-distribution check that the correction adds something on prompts Out did
    not see (the lens was fitted on all of `data`, so its column there is in-sample and flatters it).
    `lens`: a lens fitted before (e.g. another probe's, `--lens-from`) instead of step 1.
    `depth_out`: Out gets one matrix per depth (ProbeConfig.depth_out). `balance_depths`: each
    depth's loss term is weighted by 1 / (the lens's mean KL there), normalised to mean 1, so the late
    depths, where the lens is already close (0.1 nats against 3 at depth 0), count as much as the
    early ones. Measured on SmolLM2 (2026-11-30, in-distribution validation prompts): one shared Out
    and plain depth-summed KL gave lower KL than the lens at depths 0-24 and higher at 25-29.
    Returns (a new probe with ProbeConfig.tuned_lens set, summary)."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    val = data.prompt_index % validation_every == 0
    rows, val_rows = torch.nonzero(~val).squeeze(1), torch.nonzero(val).squeeze(1)
    if rows.numel() == 0:
        raise ValueError(f"retrain_readout: every prompt of the data is a validation prompt (prompt index a "
                         f"multiple of {validation_every}); give more prompts")
    new = ProbeModel(replace(model.cfg, tuned_lens=True, depth_out=depth_out))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(READOUT_PREFIXES)}
    missing, unexpected = new.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith(READOUT_PREFIXES) for k in missing), (missing, unexpected)
    if lens is None:
        lens, lens_summary = train_tuned_lens(host, data, lens_cfg, top_k=model.cfg.top_k)
    else:
        lens_summary = {"given": True}
    new.lens.load_state_dict(lens.state_dict())
    start = time.perf_counter()  # cfg.max_minutes is Out's budget, the lens's fit not counted
    for name, p in new.named_parameters():
        p.requires_grad_(name.startswith("out."))
    new.eval()
    states = _trunk_states(new, data)  # the trunk is frozen: its states once, for every token
    opt, sched = _optimiser(new, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    weights = None
    if balance_depths:
        with torch.no_grad():  # the lens's mean KL per depth on up to 2,048 training rows, 256 at a time
            probe_rows = rows[torch.randperm(rows.numel(), generator=gen)[:2048]]
            negatives = torch.randperm(host.vocab_size, generator=gen)[:cfg.negatives]
            lens_kl = sum(subset_kl(host, new.lens(b.resid), b, model.cfg.top_k, negatives).sum(0)
                          for b in (data.subset(probe_rows[s:s + 256]) for s in range(0, probe_rows.numel(), 256)))
            lens_kl = lens_kl / probe_rows.numel()
        weights = 1 / lens_kl.clamp_min(1e-3)
        weights = weights / weights.mean()
    order, pos = rows[torch.randperm(rows.numel(), generator=gen)], 0
    ema, steps_done, stopped_early = None, 0, False
    for step in tqdm(range(cfg.steps), desc="train readout", disable=not progress):
        if pos + cfg.batch_size > len(order):
            order, pos = rows[torch.randperm(rows.numel(), generator=gen)], 0
        idx = order[pos:pos + cfg.batch_size]
        pos += cfg.batch_size
        b = data.subset(idx)
        r = new.corrected_resid(b.resid, states[idx])
        negatives = torch.randperm(host.vocab_size, generator=gen)[:cfg.negatives]
        loss = readout_loss(host, new, r, b, cfg.ce_weight, negatives, weights)
        _step(new, opt, sched, loss)
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        steps_done = step + 1
        if _over_budget(start, cfg, steps_done, "readout"):
            stopped_early = True
            break
    for p in new.parameters():
        p.requires_grad_(True)
    validation = None
    if val_rows.numel():
        kl_lens, kl_probe = torch.zeros(model.cfg.n_layers), torch.zeros(model.cfg.n_layers)
        vgen = torch.Generator().manual_seed(cfg.seed + 1)
        with torch.no_grad():
            for s in range(0, val_rows.numel(), 256):
                idx = val_rows[s:s + 256]
                b = data.subset(idx)
                negatives = torch.randperm(host.vocab_size, generator=vgen)[:cfg.negatives]
                kl_lens += subset_kl(host, new.lens(b.resid), b, model.cfg.top_k, negatives).sum(0)
                kl_probe += subset_kl(host, new.corrected_resid(b.resid, states[idx]), b, model.cfg.top_k,
                                              negatives).sum(0)
        n = val_rows.numel()
        validation = {"tokens": n, "prompts": int(data.prompt_index[val_rows].unique().numel()),
                      "subset_kl_tuned_lens": (kl_lens / n).tolist(), "subset_kl_probe": (kl_probe / n).tolist()}
        log.info("validation (%d tokens): subset KL at depth 1 / L-1, tuned lens %.3f / %.3f, probe %.3f / %.3f",
                 n, validation["subset_kl_tuned_lens"][1], validation["subset_kl_tuned_lens"][-1],
                 validation["subset_kl_probe"][1], validation["subset_kl_probe"][-1])
    seconds = time.perf_counter() - start
    return new.eval(), {"training_seconds": round(seconds, 1), "steps_done": steps_done, "stopped_early": stopped_early,
                        "final_losses": {"readout": round(ema or 0.0, 5)}, "readout_only": True,
                        "depth_out": depth_out,
                        "depth_weights": None if weights is None else [round(w, 4) for w in weights.tolist()],
                        "tuned_lens": lens_summary, "validation": validation}


def retrain_readout_artifact(checkpoint_dir: str, trace_paths: list[str], base_artifact: str, out_path: str,
                             lens_cfg: TunedLensConfig | None = None, cfg: TrainConfig | None = None,
                             lens_from: str | None = None, depth_out: bool = True, balance_depths: bool = True,
                             progress: bool = True) -> dict:
    """`alignlens probe train --readout-of BASE`: `retrain_readout` of the probe at `base_artifact`,
    written to `out_path` with the base's metadata (its data summary, including the training mean
    |drop| profile, stays: the attributions are unchanged) and no evaluation. Returns the metadata."""
    from alignlens.probe.artifact import load_artifact, save_artifact
    from alignlens.probe.fingerprint import host_fingerprint

    lens_cfg = lens_cfg or TunedLensConfig(steps=1000)
    cfg = cfg or TrainConfig(steps=2000)
    start = time.perf_counter()
    host, model, base_meta, data = _load_base(checkpoint_dir, trace_paths, base_artifact, cfg.threads)
    lens = None
    if lens_from:
        donor, donor_meta = load_artifact(lens_from, host_fingerprint(host), checkpoint_dir)
        if donor.lens is None:
            raise ValueError(f"--lens-from {lens_from}: that probe has no tuned lens")
        lens = donor.lens
    new, summary = retrain_readout(host, data, model, lens_cfg, cfg, lens=lens, depth_out=depth_out,
                                   balance_depths=balance_depths, progress=progress)
    if lens_from:
        donor_fit = donor_meta.get("readout_retrained", {}).get("fit") or donor_meta.get("fit") or {}
        donor_lens = donor_fit.get("tuned_lens") or donor_fit.get("tuned_lens_init") or {}
        summary["tuned_lens"] = {**{k: v for k, v in donor_lens.items() if k != "from"}, "from": str(lens_from),
                                 "donor_from": donor_lens.get("from")}
    meta = {k: v for k, v in base_meta.items() if k not in ("format_version", "probe_config")}
    meta["readout_retrained"] = {"from": str(base_artifact), "train_config": cfg.to_dict(), "fit": summary,
                                 "traces": [str(p) for p in trace_paths],
                                 "data_tokens": len(data), "seconds": round(time.perf_counter() - start, 1)}
    meta["evaluation"] = None
    save_artifact(out_path, new, meta)
    log.info("save: %s (tuned-lens readout; trunk and importance head unchanged)", out_path)
    return meta
