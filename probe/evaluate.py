"""Evaluation of a trained probe (METHOD.md section 6) on held-out generated tokens.

Phases (log lines name them):
1. data         — held-out prompts (probe.prompts.split) generated and captured on the transformers
                  replica, cached under $ALIGNLENS_HOME/probe-eval/, or a given trace file;
2. depth        — at every depth l, over the FULL vocabulary: KL(host || readout_l) and top-1
                  agreement with the host, for the probe, its untrained null, and the logit lens
                  (final norm + unembedding on h_l); final_top1_agreement is the last depth's;
3. ablation     — for the first `ablation_tokens` tokens, the host's own drop of log p(y) when the
                  top-k singular directions of each (block, family) are projected out at the decision
                  position (probe.fast_ablation, prefix cache reused);
4. faithfulness — per token, Spearman correlation across the 3L pairs between the probe's pair
                  importance (family_attribution, unsigned) and the size of the ablation effect
                  |drop|, averaged over tokens; and top_vs_random = mean |drop| of each token's
                  top-attributed pair / mean |drop| of a uniformly random pair (the mean over pairs,
                  its expectation). Importance is unsigned by definition (METHOD.md section 4 builds
                  it from |gradient x input|), so its causal counterpart is the effect size; the same
                  numbers against the signed drop are reported as signed_*. The same for the
                  untrained null probe and for reference mechanisms: the host's own linearized
                  effect (a backward pass of the host, not available at serving time), gradient x
                  input of the probe readout (METHOD's default), the training-set mean |drop|
                  profile (no token dependence), family_importance as normalized per block.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from alignlens.probe.attribution import Attributor
from alignlens.probe.data import TokenSet, build_dataset, decision_inputs, prompt_indices, read_prompt
from alignlens.probe.fast_ablation import FastAblator
from alignlens.probe.model import ProbeModel, readout_logits
from alignlens.probe.names import RESID_MID
from alignlens.probe.paths import alignlens_home
from alignlens.probe.prompts import encode_row, read_prompts, split
from alignlens.probe.stats import spearman

log = logging.getLogger(__name__)


def faithfulness(attribution: Tensor, drop: Tensor) -> dict[str, float]:
    """attribution, drop [M, L, 3] -> spearman (mean over tokens) and top_vs_random."""
    a, d = attribution.flatten(1), drop.flatten(1)
    rho = spearman(a, d)
    top = d.gather(1, a.argmax(1, keepdim=True)).squeeze(1)
    return {"spearman": float(rho.mean()), "top_vs_random": float(top.mean() / d.mean().clamp_min(1e-12)),
            "top_drop_nats": float(top.mean()), "random_drop_nats": float(d.mean())}


@torch.no_grad()
def depth_curves(att: Attributor, model: ProbeModel, data: TokenSet, chunk: int = 64,
                 lens: bool = True) -> dict[str, list[float]]:
    """Full-vocabulary KL(host || readout_l) and top-1 agreement per depth, for `model`'s readout
    and (lens=True) for the logit lens, on `data` (rows of resid h_0..h_L)."""
    h = att.host
    L = h.n_layers
    sums = {k: torch.zeros(L + 1, dtype=torch.float64) for k in ("kl", "top1", "lens_kl", "lens_top1")}
    for s in range(0, len(data), chunk):
        resid, alpha = data.resid[s:s + chunk], data.alpha[s:s + chunk]
        r = model.corrected_resid(resid, model.trunk(resid, model.standardize(alpha)))
        host_lp = torch.log_softmax(h.logits(resid[:, L]), -1)
        host_top = host_lp.argmax(-1)
        p = host_lp.exp()
        for l in range(L + 1):
            for key, x in (("", r[:, l]), ("lens_", resid[:, l]))[:2 if lens else 1]:
                lp = torch.log_softmax(h.logits(x), -1)
                sums[key + "kl"][l] += (p * (host_lp - lp)).sum(-1).clamp_min(0).sum().double()
                sums[key + "top1"][l] += (lp.argmax(-1) == host_top).sum().double()
    return {k: (v / len(data)).tolist() for k, v in sums.items()}


def gradxinput_attribution(att: Attributor, data: TokenSet, out: dict[str, Tensor], chunk: int = 64) -> Tensor:
    """Reference mechanism: per (block, family), sum over directions of gradient x input of the mean
    over depths of the readout's log p_l(y) (over the served candidate set) w.r.t. standardized
    alpha -> [N, L, 3]. (The last depth is the host itself and contributes no gradient.)"""
    h, model = att.host, att.model
    parts = []
    for s in range(0, len(data), chunk):
        sl = slice(s, s + chunk)
        with torch.enable_grad():
            a = model.standardize(data.alpha[sl]).requires_grad_(True)
            r = model.corrected_resid(data.resid[sl], model.trunk(data.resid[sl], a))
            ro = readout_logits(h.final_norm, r, h.W_U[out["cand_ids"][sl]])
            ro = ro.masked_fill(~out["cand_valid"][sl][:, None], float("-inf"))
            lp = torch.log_softmax(ro, -1)
            y_pos = (out["cand_ids"][sl] == data.token_ids[sl, None]) & out["cand_valid"][sl]
            lp_y = (lp.masked_fill(~y_pos[:, None], 0.0)).sum(-1)  # [n, L+1]
            lp_y.mean(1).sum().backward()
        parts.append((a.grad * a).sum(-1).detach())
    return torch.cat(parts)


def eval_trace(model_tf: nn.Module, tokenizer, fingerprint: str, n_prompts: int | None, max_tokens: int,
               temperature: float, seed: int, progress: bool = True) -> Path:
    """The held-out evaluation trace for this host, generated on the replica once and cached."""
    from alignlens.probe.collect_replica import collect

    rows = split(read_prompts(), held_out=True)[:n_prompts]
    key = hashlib.sha256(json.dumps([rows, max_tokens, temperature, seed]).encode()).hexdigest()[:12]
    path = alignlens_home() / "probe-eval" / f"{fingerprint[:16]}-{key}.safetensors"
    if not path.is_file():
        log.info("data: generating %d held-out prompts on the replica -> %s", len(rows), path)
        ids = [encode_row(tokenizer, r) for r in rows]
        tmp = path.with_name(path.name + ".tmp.safetensors")
        collect(model_tf, ids, max_tokens, temperature, tmp, seed=seed, eos_token_id=tokenizer.eos_token_id,
                progress=progress, metadata={"split": "held-out"})
        tmp.replace(path)
    return path


def evaluate(att: Attributor, model_tf: nn.Module, trace_path: str | Path, tokens: int, ablation_tokens: int,
             seed: int = 0, progress: bool = True) -> dict:
    """All METHOD.md section 6 numbers for `att` (trained) against an untrained null of the same shape."""
    start = time.perf_counter()
    h = att.host
    data = build_dataset(h, att.factors, [trace_path], top_k=att.top_k, max_tokens=tokens)
    torch.manual_seed(seed)
    null = ProbeModel(att.model.cfg).eval()
    for name, buf in att.model.named_buffers():  # same fixed statistics: only training differs
        null.get_buffer(name).copy_(buf)
    null_att = Attributor(h, att.factors, null, att.metadata)

    log.info("depth: full-vocabulary curves on %d tokens", len(data))
    trained = depth_curves(att, att.model, data)
    untrained = depth_curves(att, null, data, lens=False)

    # ablation on the first positions of each prompt until ablation_tokens are reached
    log.info("ablation: host ablations of %d (block, family) pairs on up to %d tokens", 3 * h.n_layers,
             ablation_tokens)
    ablator = FastAblator(model_tf, att.factors.basis, h.attn_out_bias)
    drops, lins, rows_used = [], [], []
    offset = 0
    for i in tqdm(prompt_indices(trace_path), desc="ablation", disable=not progress):
        if sum(len(r) for r in rows_used) >= min(ablation_tokens, len(data)):
            break
        rec = read_prompt(trace_path, i)
        T = rec["token_ids"].shape[0]
        take = min(T, ablation_tokens - sum(len(r) for r in rows_used), len(data) - offset)
        if take <= 0:
            break
        t = torch.arange(take)
        inputs = decision_inputs(rec, t)
        _, drop = ablator.drops(*inputs)
        lin, _ = ablator.linearized(*inputs)
        drops.append(drop)
        lins.append(lin)
        rows_used.append(offset + t)
        offset += T
    drop, lin = torch.cat(drops), torch.cat(lins)
    idx = torch.cat(rows_used)
    sub = data.subset(idx)
    trace_rows = _resid_mid_rows(trace_path, idx, data)

    def attributions(a: Attributor) -> dict[str, Tensor]:
        return a.compute(sub.resid, trace_rows, sub.token_ids)

    log.info("faithfulness: %d tokens x %d pairs", drop.shape[0], drop[0].numel())
    out_t, out_n = attributions(att), attributions(null_att)
    mag = drop.abs()
    f_t, f_n = faithfulness(out_t["family_attribution"], mag), faithfulness(out_n["family_attribution"], mag)
    f_ts, f_ns = faithfulness(out_t["family_attribution"], drop), faithfulness(out_n["family_attribution"], drop)
    f_fi = faithfulness(out_t["family_importance"], mag)
    gxi = gradxinput_attribution(att, sub, out_t)
    f_gxi, f_gxi_s = faithfulness(gxi.abs(), mag), faithfulness(gxi, drop)
    f_lin, f_lin_s = faithfulness(lin.abs(), mag), faithfulness(lin, drop)
    result = {
        "tokens": len(data),
        "ablation_tokens": int(drop.shape[0]),
        "final_top1_agreement": trained["top1"][-1],
        "final_top1_agreement_null": untrained["top1"][-1],
        "depth_kl": trained["kl"], "logit_lens_kl": trained["lens_kl"], "null_depth_kl": untrained["kl"],
        "depth_top1": trained["top1"], "logit_lens_top1": trained["lens_top1"], "null_depth_top1": untrained["top1"],
        "depth_kl_below_logit_lens": [a < b - 1e-9 for a, b in zip(trained["kl"][:-1], trained["lens_kl"][:-1])],
        # importance (unsigned) against the size of the ablation effect |drop|
        "faithfulness_spearman": f_t["spearman"], "faithfulness_top_vs_random": f_t["top_vs_random"],
        "null_faithfulness_spearman": f_n["spearman"], "null_faithfulness_top_vs_random": f_n["top_vs_random"],
        "faithfulness_top_drop_nats": f_t["top_drop_nats"], "faithfulness_random_drop_nats": f_t["random_drop_nats"],
        "family_importance_spearman": f_fi["spearman"],
        # the same importance against the signed drop (METHOD.md 6.4 read literally)
        "signed_faithfulness_spearman": f_ts["spearman"], "signed_faithfulness_top_vs_random": f_ts["top_vs_random"],
        "null_signed_faithfulness_spearman": f_ns["spearman"],
        "null_signed_faithfulness_top_vs_random": f_ns["top_vs_random"],
        # reference mechanisms
        "host_linearized_faithfulness_spearman": f_lin["spearman"],
        "host_linearized_signed_faithfulness_spearman": f_lin_s["spearman"],
        "readout_gradxinput_faithfulness_spearman": f_gxi["spearman"],
        "readout_gradxinput_signed_faithfulness_spearman": f_gxi_s["spearman"],
        "probe_top1_rate": float(out_t["probe_top1"].float().mean()),
        "mean_crystallization_depth": float(out_t["crystallization_depth"].float().mean()),
    }
    mean_profile = att.metadata.get("data", {}).get("train_mean_abs_drop")
    if mean_profile is not None:
        f_m = faithfulness(torch.tensor(mean_profile).expand_as(drop), mag)
        result["mean_profile_faithfulness_spearman"] = f_m["spearman"]
        result["mean_profile_faithfulness_top_vs_random"] = f_m["top_vs_random"]
    result["eval_seconds"] = round(time.perf_counter() - start, 1)
    return result


def _resid_mid_rows(trace_path: str | Path, idx: Tensor, data: TokenSet) -> Tensor:
    """resid_mid rows [M, L, d] for dataset rows idx (TokenSet keeps only resid)."""
    out = []
    offset = 0
    wanted = set(idx.tolist())
    for i in prompt_indices(trace_path):
        rec = read_prompt(trace_path, i)
        T = rec["token_ids"].shape[0]
        for t in range(T):
            if offset + t in wanted:
                out.append(rec[RESID_MID][t].float())
        offset += T
        if offset > max(wanted):
            break
    return torch.stack(out)
