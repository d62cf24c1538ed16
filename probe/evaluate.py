"""Evaluation of a trained probe (METHOD.md section 6): every figure beside its strongest baseline,
with bootstrap 95 % intervals over prompts, on data the probe never saw.

Phases (log lines name them):
1. data         — evaluation sets generated on the transformers replica and cached under
                  $ALIGNLENS_HOME/probe-eval/ (or given trace files): by default prompt KINDS absent
                  from training plus natural text not written from templates
                  (probe/data/heldout_prompts.jsonl) at temperature 0 and 0.8, and the
                  in-distribution held-out split of the training prompt set (every 10th prompt);
2. depth        — per token and depth, over the FULL vocabulary: KL(host || readout_l) and top-1
                  agreement with the host, for the probe, its untrained null (= the logit lens),
                  the logit lens, a tuned lens trained on the given training tokens (probe.tuned_lens)
                  and an activation-only probe (ProbeConfig.alignment_features = False) when given;
3. ablation     — on up to `ablation_per_prompt` random positions of every prompt, the host's own
                  drop of log p(y) when the top-k singular directions of each (block, family) are
                  projected out at the decision position (probe.fast_ablation), and the host's
                  linearized effect (one backward, attribution patching);
4. faithfulness — each scorer of (block, family) pairs against |drop| (`faithfulness_report`):
                  the two served fields (family_attribution, family_importance) and the baselines
                  on the same tokens: the training mean-|drop| profile (the null that matters), that
                  profile scaled by the host's uncertainty 1 - p(y), the host's linearized effect,
                  DLA-derived importance (probe.dla) and the untrained head.

Interval: 95 % percentile bootstrap over prompts (prompts resampled with replacement, all of a
prompt's tokens kept together), `n_boot` resamples, fixed seed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm import tqdm

from alignlens.probe.attribution import Attributor
from alignlens.probe.data import TokenSet, build_dataset, decision_inputs, prompt_indices, read_prompt
from alignlens.probe.dla import dla_pair_importance
from alignlens.probe.fast_ablation import FastAblator
from alignlens.probe.model import ProbeModel
from alignlens.probe.names import RESID_MID
from alignlens.probe.paths import alignlens_home
from alignlens.probe.prompts import encode_row, heldout_prompt_path, read_prompts, split
from alignlens.probe.refine import refine_with
from alignlens.probe.stats import spearman
from alignlens.probe.tuned_lens import TunedLens

log = logging.getLogger(__name__)

# The default evaluation sets: (name, prompts file or None for the shipped set's held-out split, temperature)
EVAL_SETS = (("heldout_kinds_t0", "heldout", 0.0), ("heldout_kinds_t08", "heldout", 0.8),
             ("in_distribution_t08", "split", 0.8))
HEADLINE_SETS = ("heldout_kinds_t0", "heldout_kinds_t08")  # the numbers README and ProbeInfo report
REFINE_BUDGETS = (3, 10, 30)  # exact ablations per token of the refinement scorers (of 3L = 90 on SmolLM2)
FAITHFULNESS_METRICS = ("per_token_spearman", "token_resolved_spearman", "share_centered_spearman",
                        "top_pair_hit", "top_vs_random")
REFINE_METRICS = ("per_token_spearman", "share_centered_spearman", "top_pair_hit")  # issue 13's three targets


# ---- statistics ---------------------------------------------------------------------------------
def _shares(x: Tensor) -> Tensor:
    """Each row [M, P] normalised to sum 1."""
    return x / x.sum(1, keepdim=True).clamp_min(1e-12)


def _per_token(pred: Tensor, mag: Tensor, centre_pred: Tensor, centre_mag: Tensor) -> dict[str, Tensor]:
    """Per-token quantities [M] behind the token-wise metrics (pred, mag [M, P])."""
    def centred(x: Tensor, centre: Tensor) -> Tensor:
        # exact zeros where a share equals its centre up to float32 rounding (a token-independent
        # profile, or one scaled per token, minus its own mean; shares are ~1/3L, rounding ~1e-9):
        # Spearman would otherwise rank the rounding noise
        c = _shares(x) - centre
        return c.masked_fill(c.abs() < 1e-7, 0.0)
    top = pred.argmax(1)
    return {"per_token_spearman": spearman(pred, mag),
            "share_centered_spearman": spearman(centred(pred, centre_pred), centred(mag, centre_mag)),
            "top_pair_hit": (top == mag.argmax(1)).float(),
            "top_drop": mag.gather(1, top[:, None]).squeeze(1), "mean_drop": mag.mean(1)}


def _token_resolved(pred: Tensor, mag: Tensor) -> float:
    """Per pair, Spearman across tokens, averaged over pairs (a constant pair scores 0)."""
    return float(spearman(pred.T.contiguous(), mag.T.contiguous()).mean())


def _interval(samples: list[float]) -> list[float]:
    t = torch.tensor(samples, dtype=torch.float64)
    return [float(t.quantile(0.025)), float(t.quantile(0.975))]


def bootstrap_groups(groups: Tensor, n_boot: int, seed: int) -> list[Tensor]:
    """`n_boot` resamples of row indices, prompts (`groups` [M] ids) drawn with replacement."""
    ids, inv = torch.unique(groups, return_inverse=True)
    members = [torch.nonzero(inv == g).squeeze(1) for g in range(ids.numel())]
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_boot):
        pick = torch.randint(0, len(members), (len(members),), generator=gen)
        out.append(torch.cat([members[i] for i in pick.tolist()]))
    return out


def faithfulness_report(pred: Tensor, drop: Tensor, groups: Tensor, resamples: list[Tensor],
                        centre_drop: Tensor | None = None) -> dict[str, dict]:
    """One scorer of (block, family) pairs against the exact ablation effect (METHOD.md 6.3).

    pred, drop [M, L, 3]; groups [M] prompt ids; resamples from bootstrap_groups. Metrics (each
    {"value", "ci"}): per_token_spearman (across the 3L pairs, mean over tokens),
    token_resolved_spearman (per pair across tokens, mean over pairs), share_centered_spearman (per
    token, both profiles as shares centred by their mean shares: `centre_drop` [3L] for the drops,
    the training mean when known, and the scorer's own mean over these tokens, so a
    token-independent profile scores 0), top_pair_hit, top_vs_random (|drop| of the top pair over
    the mean |drop|)."""
    p = pred.flatten(1).double()
    m = drop.flatten(1).abs().double()
    c_pred = _shares(p).mean(0)
    c_mag = _shares(m).mean(0) if centre_drop is None else centre_drop.double() / centre_drop.double().sum()
    tok = _per_token(p, m, c_pred, c_mag)

    def point(idx: Tensor | None) -> dict[str, float]:
        t = {k: (v if idx is None else v[idx]) for k, v in tok.items()}
        pp, mm = (p, m) if idx is None else (p[idx], m[idx])
        return {"per_token_spearman": float(t["per_token_spearman"].mean()),
                "token_resolved_spearman": _token_resolved(pp, mm),
                "share_centered_spearman": float(t["share_centered_spearman"].mean()),
                "top_pair_hit": float(t["top_pair_hit"].mean()),
                "top_vs_random": float(t["top_drop"].mean() / t["mean_drop"].mean().clamp_min(1e-12))}

    value = point(None)
    boots = [point(idx) for idx in resamples]
    return {k: {"value": value[k], "ci": _interval([b[k] for b in boots])} for k in FAITHFULNESS_METRICS}


def paired_faithfulness(pred: Tensor, baseline: Tensor, drop: Tensor, resamples: list[Tensor],
                        centre_drop: Tensor | None = None) -> dict[str, dict]:
    """`pred` minus `baseline` on the same tokens for REFINE_METRICS (the per-token ones), each
    {"value", "ci"}: the mean per-token difference and its bootstrap interval over prompts. The two
    scorers' own intervals overlap where tokens vary more than the gap; this one does not."""
    m = drop.flatten(1).abs().double()
    c_mag = _shares(m).mean(0) if centre_drop is None else centre_drop.double() / centre_drop.double().sum()
    tok = []
    for scorer in (pred, baseline):
        p = scorer.flatten(1).double()
        tok.append(_per_token(p, m, _shares(p).mean(0), c_mag))
    out = {}
    for metric in REFINE_METRICS:
        diff = (tok[0][metric] - tok[1][metric])[:, None]
        value, ci = mean_interval(diff, resamples)
        out[metric] = {"value": value[0], "ci": ci[0]}
    return out


def mean_interval(per_token: Tensor, resamples: list[Tensor]) -> tuple[list[float], list[list[float]]]:
    """per_token [M, D] -> (mean [D], 95 % bootstrap interval [D][2])."""
    mean = per_token.double().mean(0)
    boots = torch.stack([per_token[idx].double().mean(0) for idx in resamples])  # [B, D]
    lo, hi = boots.quantile(0.025, dim=0), boots.quantile(0.975, dim=0)
    return mean.tolist(), torch.stack([lo, hi], 1).tolist()


# ---- depth readouts -----------------------------------------------------------------------------
@torch.no_grad()
def depth_per_token(att: Attributor, readouts: dict[str, object], data: TokenSet,
                    chunk: int = 64) -> dict[str, tuple[Tensor, Tensor]]:
    """{name: (KL [M, L+1], top-1 [M, L+1])} over the full vocabulary, for each readout:
    a ProbeModel (its corrected residuals), a TunedLens, or None (the logit lens on h_l)."""
    h = att.host
    L = h.n_layers
    out = {name: ([], []) for name in readouts}
    for s in range(0, len(data), chunk):
        resid, alpha = data.resid[s:s + chunk], data.alpha[s:s + chunk]
        host_lp = torch.log_softmax(h.logits(resid[:, L]), -1)
        host_top = host_lp.argmax(-1)
        p = host_lp.exp()
        for name, ro in readouts.items():
            if isinstance(ro, ProbeModel):
                r = ro.corrected_resid(resid, ro.trunk(resid, ro.standardize(alpha)))
            elif isinstance(ro, TunedLens):
                r = ro(resid)
            else:
                r = resid
            kl, top1 = torch.empty(resid.shape[0], L + 1), torch.empty(resid.shape[0], L + 1)
            for l in range(L + 1):
                lp = torch.log_softmax(h.logits(r[:, l]), -1)
                kl[:, l] = (p * (host_lp - lp)).sum(-1).clamp_min(0)
                top1[:, l] = (lp.argmax(-1) == host_top).float()
            out[name][0].append(kl)
            out[name][1].append(top1)
    return {k: (torch.cat(a), torch.cat(b)) for k, (a, b) in out.items()}


# ---- data ---------------------------------------------------------------------------------------
def eval_trace(model_tf: nn.Module, tokenizer, fingerprint: str, source: str, max_tokens: int, temperature: float,
               seed: int, n_prompts: int | None = None, progress: bool = True) -> Path:
    """One evaluation trace for this host, generated on the replica once and cached. source:
    "heldout" (probe/data/heldout_prompts.jsonl, kinds absent from training) or "split" (the
    shipped prompt set's held-out split)."""
    from alignlens.probe.collect_replica import collect

    rows = read_prompts(heldout_prompt_path()) if source == "heldout" else split(read_prompts(), held_out=True)
    rows = rows[:n_prompts]
    key = hashlib.sha256(json.dumps([rows, max_tokens, temperature, seed]).encode()).hexdigest()[:12]
    path = alignlens_home() / "probe-eval" / f"{fingerprint[:16]}-{key}.safetensors"
    if not path.is_file():
        log.info("data: generating %d %s prompts at temperature %g on the replica -> %s", len(rows), source,
                 temperature, path)
        path.parent.mkdir(parents=True, exist_ok=True)
        ids = [encode_row(tokenizer, r) for r in rows]
        tmp = path.with_name(path.name + ".tmp.safetensors")
        collect(model_tf, ids, max_tokens, temperature, tmp, seed=seed, eos_token_id=tokenizer.eos_token_id,
                progress=progress, metadata={"split": source, "kinds": sorted({r.get("kind", "") for r in rows})})
        tmp.replace(path)
    return path


def default_eval_sets(model_tf: nn.Module, tokenizer, fingerprint: str, max_tokens: int = 32,
                      n_prompts: int | None = None, progress: bool = True) -> list[tuple[str, Path]]:
    """EVAL_SETS as (name, cached trace path)."""
    return [(name, eval_trace(model_tf, tokenizer, fingerprint, source, max_tokens, temp, seed=1,
                              n_prompts=n_prompts, progress=progress))
            for name, source, temp in EVAL_SETS]


def cached_ablations(ablator: FastAblator, trace_path: Path, per_prompt: int, seed: int,
            progress: bool) -> tuple[list[Tensor], Tensor, Tensor, Tensor]:
    """Ablations of up to `per_prompt` random rows of every prompt of a trace:
    (row indices into the trace's token order per prompt, drop [A, L, 3], lin [A, L, 3], resid_mid [A, L, d]).

    They depend only on the host, the trace and the basis, not on the probe: cached beside the
    trace (keyed by a hash of the basis, per_prompt and seed), so evaluating a second probe on the
    same sets reuses them."""
    from safetensors.torch import load_file, save_file

    key = hashlib.sha256(ablator.basis.numpy().tobytes()).hexdigest()[:12]
    cache = Path(trace_path).with_name(f"{Path(trace_path).stem}.ablations-{key}-{per_prompt}-{seed}.safetensors")
    if cache.is_file():
        t = load_file(str(cache))
        counts = t["counts"].tolist()
        rows = list(torch.split(t["rows"], counts))
        return rows, t["drop"], t["lin"], t["resid_mid"]
    rows, drop, lin, mid = _ablate_uncached(ablator, trace_path, per_prompt, seed, progress)
    tmp = cache.with_name(cache.name + ".tmp")
    save_file({"counts": torch.tensor([r.numel() for r in rows]), "rows": torch.cat(rows), "drop": drop,
               "lin": lin, "resid_mid": mid}, str(tmp))
    tmp.replace(cache)
    return rows, drop, lin, mid


def ablated_rows(data: TokenSet, rows: list[Tensor]) -> Tensor:
    """Indices into `data` of cached_ablations' per-prompt row indices; len(data) for a prompt that
    `data` does not hold. A trace prompt's rows are contiguous in `data`, in prompt order (prompts
    past a token limit are absent, and the last one present may be cut short)."""
    order = torch.unique(data.prompt_index)
    first = {int(p): int(torch.nonzero(data.prompt_index == p)[0]) for p in order}
    return torch.cat([first[int(order[j])] + r if j < order.numel() else torch.full_like(r, len(data))
                      for j, r in enumerate(rows)])


def _ablate_uncached(ablator: FastAblator, trace_path: Path, per_prompt: int, seed: int,
                     progress: bool) -> tuple[list[Tensor], Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    rows, drops, lins, mids = [], [], [], []
    for i in tqdm(prompt_indices(trace_path), desc="ablation", disable=not progress):
        rec = read_prompt(trace_path, i)
        T = rec["token_ids"].shape[0]
        t = torch.randperm(T, generator=gen)[:per_prompt].sort().values
        inputs = decision_inputs(rec, t)
        _, drop = ablator.drops(*inputs)
        lin, _ = ablator.linearized(*inputs)
        rows.append(t)
        drops.append(drop.float())
        lins.append(lin.float())
        mids.append(rec[RESID_MID][t].float())
    return rows, torch.cat(drops), torch.cat(lins), torch.cat(mids)


# ---- the evaluation -----------------------------------------------------------------------------
def evaluate(att: Attributor, model_tf: nn.Module, sets: list[tuple[str, Path]], ablation_per_prompt: int = 8,
             tuned_lens: TunedLens | None = None, activation_only: ProbeModel | None = None,
             tokens_per_set: int | None = None, n_boot: int = 1000, seed: int = 0, progress: bool = True,
             reuse_depth: dict | None = None) -> dict:
    """All METHOD.md section 6 numbers for `att` on the evaluation `sets` (name, trace path).

    The headline (flat keys, ProbeInfo, README) pools the sets named in HEADLINE_SETS that are
    present (all sets when none is); `by_set` has every set on its own. `reuse_depth`: an earlier
    result of the same probe on the same sets whose depth curves (the slow part: full-vocabulary
    readouts at every depth) are taken as they are; faithfulness is recomputed."""
    start = time.perf_counter()
    h = att.host
    L = h.n_layers
    torch.manual_seed(seed)
    # the untrained head: the same seed and a config with the readout options at their defaults, so
    # that its random draws (which nn.Linear's initialisation makes and DepthLinear's does not) do
    # not depend on how the probe reads out depth
    null = ProbeModel(replace(att.model.cfg, tuned_lens=False, depth_out=False)).eval()
    null_buffers = dict(null.named_buffers())
    for name, buf in att.model.named_buffers():  # same fixed statistics: only training differs
        if name in null_buffers:
            null_buffers[name].copy_(buf)
    null_att = Attributor(h, att.factors, null, att.metadata)
    ablator = FastAblator(model_tf, att.factors.basis, h.attn_out_bias)
    readouts: dict[str, object] = {"probe": att.model, "logit_lens": None}
    if tuned_lens is not None:
        readouts["tuned_lens"] = tuned_lens
    if activation_only is not None:
        readouts["activation_only"] = activation_only
    mean_profile = att.metadata.get("data", {}).get("train_mean_abs_drop")
    centre = None if mean_profile is None else torch.tensor(mean_profile).flatten()

    per_set: dict[str, dict] = {}
    for set_index, (name, path) in enumerate(sets):
        log.info("data: %s (%s)", name, path)
        data = build_dataset(h, att.factors, [path], top_k=att.top_k, max_tokens=tokens_per_set)
        log.info("depth: %s, full-vocabulary curves on %d tokens%s", name, len(data),
                 " (reused)" if reuse_depth else "")
        depth = {} if reuse_depth else depth_per_token(att, readouts, data)
        log.info("ablation: %s, %d pairs at up to %d positions per prompt", name, 3 * L, ablation_per_prompt)
        rows, drop, lin, mid = cached_ablations(ablator, path, ablation_per_prompt, seed, progress)
        idx = ablated_rows(data, rows)
        keep = idx < len(data)
        idx, drop, lin, mid = idx[keep], drop[keep], lin[keep], mid[keep]
        sub = data.subset(idx)
        out_t = att.compute(sub.resid, mid, sub.token_ids)
        out_n = null_att.compute(sub.resid, mid, sub.token_ids)
        p_y = sub.host_logprob.exp()
        scorers = {"family_attribution": out_t["family_attribution"], "family_importance": out_t["family_importance"],
                   "host_linearized": lin.abs(), "dla": dla_pair_importance(out_t),
                   "untrained_head": out_n["family_attribution"]}
        if mean_profile is not None:
            prof = torch.tensor(mean_profile).expand_as(drop)
            scorers["mean_profile"] = prof
            scorers["mean_profile_uncertainty"] = prof * (1 - p_y)[:, None, None]
        # probe-guided causal refinement (probe/refine.py): k exact ablations where the scorer ranks
        # first, its own prediction elsewhere; the same budget spent by the null and by the host's
        # linearized effect are its baselines
        proposers = {"refined_family_attribution": out_t["family_attribution"], "refined_host_linearized": lin.abs()}
        if mean_profile is not None:
            proposers["refined_mean_profile"] = scorers["mean_profile"]
        for k in (k for k in REFINE_BUDGETS if k < 3 * L):  # 3L ablations are exact by construction
            for prefix, score in proposers.items():
                scorers[f"{prefix}_k{k}"] = refine_with(score, drop, k)
        per_set[name] = {"tokens": len(data), "prompts": int(torch.unique(data.prompt_index).numel()),
                         "depth": depth, "drop": drop,
                         "scorers": scorers, "groups": set_index * 1_000_000 + sub.prompt_index,
                         "depth_groups": set_index * 1_000_000 + data.prompt_index,
                         "crystallization": out_t["crystallization_depth"].float()}

    def summarise(names: list[str]) -> dict:
        parts = [per_set[n] for n in names]
        groups = torch.cat([p["groups"] for p in parts])
        d_groups = torch.cat([p["depth_groups"] for p in parts])
        res = bootstrap_groups(groups, n_boot, seed)
        d_res = bootstrap_groups(d_groups, n_boot, seed)
        drop = torch.cat([p["drop"] for p in parts])
        out: dict = {"tokens": sum(p["tokens"] for p in parts), "prompts": sum(p["prompts"] for p in parts),
                     "ablation_tokens": int(drop.shape[0]), "faithfulness": {}, "depth": {}}
        for scorer in parts[0]["scorers"]:
            pred = torch.cat([p["scorers"][scorer] for p in parts])
            out["faithfulness"][scorer] = faithfulness_report(pred, drop, groups, res, centre)
            # against the signed drop (METHOD.md 6.4 read literally), point value only
            out["faithfulness"][scorer]["signed_per_token_spearman"] = float(
                spearman(pred.flatten(1), drop.flatten(1)).mean())
        for readout in parts[0]["depth"]:
            kl = torch.cat([p["depth"][readout][0] for p in parts])
            top1 = torch.cat([p["depth"][readout][1] for p in parts])
            kl_m, kl_ci = mean_interval(kl, d_res)
            t1_m, t1_ci = mean_interval(top1, d_res)
            out["depth"][readout] = {"kl": kl_m, "kl_ci": kl_ci, "top1": t1_m, "top1_ci": t1_ci}
        # paired: the probe's KL minus each baseline's on the same tokens, with its own interval (the
        # two readouts' separate intervals overlap where the tokens' difficulty varies more than the gap)
        if "probe" in parts[0]["depth"]:
            probe_kl = torch.cat([p["depth"]["probe"][0] for p in parts])
            out["depth_paired"] = {}
            for readout in parts[0]["depth"]:
                if readout != "probe":
                    diff = probe_kl - torch.cat([p["depth"][readout][0] for p in parts])
                    m_, ci_ = mean_interval(diff, d_res)
                    out["depth_paired"][readout] = {"probe_minus_kl": m_, "probe_minus_kl_ci": ci_}
        # the refinement at each budget minus the same budget spent by each baseline proposer, paired
        def pooled(scorer: str) -> Tensor:
            return torch.cat([p["scorers"][scorer] for p in parts])

        scorers = parts[0]["scorers"]
        out["refinement_paired"] = {
            str(k): {base: paired_faithfulness(pooled(f"refined_family_attribution_k{k}"),
                                               pooled(f"refined_{base}_k{k}"), drop, res, centre)
                     for base in ("mean_profile", "host_linearized") if f"refined_{base}_k{k}" in scorers}
            for k in REFINE_BUDGETS if f"refined_family_attribution_k{k}" in scorers}
        out["mean_crystallization_depth"] = float(torch.cat([p["crystallization"] for p in parts]).mean())
        return out

    by_set = {n: summarise([n]) for n in per_set}
    head_names = [n for n in HEADLINE_SETS if n in per_set] or list(per_set)
    head = summarise(head_names)
    if reuse_depth:
        same_tokens = all(reuse_depth["by_set"].get(n, {}).get("tokens") == by_set[n]["tokens"] for n in by_set)
        if reuse_depth["headline_sets"] != head_names or set(reuse_depth["by_set"]) != set(by_set) or not same_tokens:
            raise ValueError("reuse_depth: the earlier result was measured on other sets "
                             "(names or token counts differ)")
        # summarise computed no depth part here (per-set depth is empty): take the earlier one whole
        for target, source in ((head, reuse_depth["headline"]),
                               *((by_set[n], reuse_depth["by_set"][n]) for n in by_set)):
            target["depth"] = source["depth"]
            if "depth_paired" in source:
                target["depth_paired"] = source["depth_paired"]
    result = headline_keys(head, L)
    result.update({"headline_sets": head_names, "headline": head, "by_set": by_set,
                   "sets": {n: str(p) for n, p in sets}, "ablation_per_prompt": ablation_per_prompt,
                   "bootstrap": {"resamples": n_boot, "unit": "prompt", "interval": "95% percentile"},
                   "eval_seconds": round(time.perf_counter() - start, 1)})
    return result


def headline_keys(head: dict, L: int) -> dict:
    """The flat keys ProbeInfo, the README and earlier artifacts read, from a pooled summary."""
    f, d = head["faithfulness"], head["depth"]
    out = {"tokens": head["tokens"], "ablation_tokens": head["ablation_tokens"],
           "depth_kl": d["probe"]["kl"], "depth_top1": d["probe"]["top1"],
           "logit_lens_kl": d["logit_lens"]["kl"], "logit_lens_top1": d["logit_lens"]["top1"],
           "readout_top1_agreement": d["probe"]["top1"][L - 1],
           "depth_kl_below_logit_lens": [a < b - 1e-9 for a, b in zip(d["probe"]["kl"][:-1], d["logit_lens"]["kl"][:-1])],
           "faithfulness_spearman": f["family_attribution"]["per_token_spearman"]["value"],
           "faithfulness_top_vs_random": f["family_attribution"]["top_vs_random"]["value"],
           "null_faithfulness_spearman": f["untrained_head"]["per_token_spearman"]["value"],
           "null_faithfulness_top_vs_random": f["untrained_head"]["top_vs_random"]["value"],
           "mean_crystallization_depth": head["mean_crystallization_depth"]}
    refinement = {}  # per budget k: the three target metrics of refined_{proposer}_k{k} (probe/refine.py)
    for k in REFINE_BUDGETS:
        row = {name: {m: f[f"refined_{name}_k{k}"][m]["value"] for m in REFINE_METRICS}
               for name in ("family_attribution", "mean_profile", "host_linearized") if f"refined_{name}_k{k}" in f}
        if row:
            refinement[str(k)] = row
    if refinement:
        out["refinement"] = refinement
        out["refinement_paired"] = head.get("refinement_paired", {})  # probe minus each baseline, same budget
    for readout, prefix in (("tuned_lens", "tuned_lens"), ("activation_only", "activation_only")):
        if readout in d:
            out[f"{prefix}_kl"], out[f"{prefix}_top1"] = d[readout]["kl"], d[readout]["top1"]
            out[f"depth_kl_below_{prefix}"] = [a < b - 1e-9 for a, b in zip(d["probe"]["kl"][:-1], d[readout]["kl"][:-1])]
            paired = head.get("depth_paired", {}).get(readout)
            if paired:  # the probe's KL minus the baseline's, per depth, and its paired 95 % interval
                out[f"depth_kl_minus_{prefix}"] = paired["probe_minus_kl"]
                out[f"depth_kl_minus_{prefix}_ci"] = paired["probe_minus_kl_ci"]
    return out


def markdown_report(result: dict, depths: tuple[int, ...] = (1, 10, 20, 25)) -> str:
    """The headline as two Markdown tables: faithfulness of every scorer, and the depth readouts at
    a few depths (and L-1) beside their baselines. Values with their 95 % intervals."""
    head = result["headline"]
    lines = [f"Evaluation sets: {', '.join(result['headline_sets'])}; {head['tokens']} tokens, "
             f"{head['ablation_tokens']} with exact ablations, {head['prompts']} prompts; "
             f"95% bootstrap intervals over prompts ({result['bootstrap']['resamples']} resamples).", "",
             "| scorer | " + " | ".join(FAITHFULNESS_METRICS) + " |", "|---" * (len(FAITHFULNESS_METRICS) + 1) + "|"]
    for scorer, m in head["faithfulness"].items():
        cells = [f"{m[k]['value']:.3f} [{m[k]['ci'][0]:.3f}, {m[k]['ci'][1]:.3f}]" for k in FAITHFULNESS_METRICS]
        lines.append(f"| {scorer} | " + " | ".join(cells) + " |")
    L = len(head["depth"]["probe"]["kl"]) - 1
    shown = sorted({d for d in depths if d < L} | {L - 1})
    lines += ["", "| readout | " + " | ".join(f"KL depth {d}" for d in shown) + " | "
              + " | ".join(f"top-1 depth {d}" for d in shown) + " |", "|---" * (2 * len(shown) + 1) + "|"]
    for readout, m in head["depth"].items():
        kl = [f"{m['kl'][d]:.2f} [{m['kl_ci'][d][0]:.2f}, {m['kl_ci'][d][1]:.2f}]" for d in shown]
        t1 = [f"{m['top1'][d]:.3f}" for d in shown]
        lines.append(f"| {readout} | " + " | ".join(kl + t1) + " |")
    for readout, m in head.get("depth_paired", {}).items():
        kl = [f"{m['probe_minus_kl'][d]:+.3f} [{m['probe_minus_kl_ci'][d][0]:+.3f}, {m['probe_minus_kl_ci'][d][1]:+.3f}]"
              for d in shown]
        lines.append(f"| probe - {readout} (paired) | " + " | ".join(kl + [""] * len(shown)) + " |")
    return "\n".join(lines)
