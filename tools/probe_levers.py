"""Importance-head levers, measured fast: the probe's trunk held fixed, only the head retrained.

The shipped probe's trunk and readout stay as they are (so the depth readout is unchanged); each
variant retrains the importance head from a fresh seeded initialisation on the training trace's
ablation labels and is scored against the exact ablations of the evaluation sets
(`alignlens probe eval`'s cached sets), with the same metrics as the evaluation
(probe.evaluate.faithfulness_report; 200 bootstrap resamples over prompts here, 1,000 there). One
variant takes about a minute on two cores, against ~20 minutes for a whole `probe train` plus a
faithfulness evaluation. What it measured on SmolLM2 is in docs/benchmarks/probe-levers.md.

    python -m tools.probe_levers prep --trace TRAIN.safetensors --out levers.pt   # ~5 min, ~3 GB RAM
    python -m tools.probe_levers run --data levers.pt base frac34 centred1 ...    # ~1 min per variant
    python -m tools.probe_levers prep-attention --trace TRAIN.safetensors --data levers.pt  # ~7 min
    python -m tools.probe_levers run --data levers.pt head_writes attention_stats
    python -m tools.probe_levers lens-propagated    # ~5 min: the evaluation's cached sets only

`prep` reads the evaluation's own cached sets and ablations (probe.evaluate.default_eval_sets and
cached_ablations: made, slowly, when `alignlens probe eval` never ran) and the trace's labels
(`alignlens probe label`); `run` prints one JSON line per variant: held-out kinds
(the evaluation's headline sets) and the in-distribution split (use that one to choose, so the
headline stays a test). Variants: VARIANTS below, plus `gradient` (an amortized host gradient:
gamma = d log p(y)/d(family vector) regressed on the output gradient, ridge, then gamma . comp as
the linearized effect) and `linearized_upper` (the head's prediction times the EXACT linearized
effect, which the server cannot compute: an upper bound for any amortized gradient).

Per-block attention statistics (METHOD.md's lever list; `prep-attention` computes them on the
transformers replica with eager attention, for exactly the rows `prep` packed, into
`<data>.attention.pt`): per block and head at the decision position, the attention pattern's
entropy, its weight on the first position (the attention sink), on the position itself and its
largest weight, and the log-norm of the head's write W_O[:, h] z_h. Variants: `head_writes` (the
write norms only: the engine captures the heads' outputs, so these could be served) and
`attention_stats` (all five; the pattern statistics would need the attention probabilities, which
vLLM's attention kernels never materialise). Each enters the head as extra per-pair inputs,
standardized on the training rows and shared by the block's three families.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from alignlens.probe.artifact import default_artifact_path
from alignlens.probe.attribution import Attributor
from alignlens.probe.data import build_dataset, component_scale, prompt_indices
from alignlens.probe.evaluate import (
    ablated_rows,
    bootstrap_groups,
    cached_ablations,
    default_eval_sets,
    faithfulness_report,
)
from alignlens.probe.fast_ablation import FastAblator
from alignlens.probe.features import output_gradient
from alignlens.probe.model import ProbeModel, token_features
from alignlens.probe.train import HEAD_PREFIX
from alignlens.service.modelstore import resolve_model

# name: (fraction of the labelled tokens, steps, ablation batch, centred weight, ListNet weight)
VARIANTS = {
    "base": dict(),
    "frac25": dict(frac=0.25),
    "frac34": dict(frac=0.337),  # as many labels as the first shipped probe had (3,727 of 11,054)
    "frac50": dict(frac=0.5),
    "rank1": dict(rank_weight=1.0),
    "centred1": dict(centred=1.0),
    "centred3": dict(centred=3.0),
    "centred1_bs64": dict(centred=1.0, bs=64, steps=4000),
    "centred1_rank05": dict(centred=1.0, rank_weight=0.5),
}
# name: the shipped recipe (centred1_bs64) plus per-block statistics of prep-attention
STAT_VARIANTS = {"head_writes": dict(stats="writes", centred=1.0, bs=64, steps=4000),
                 "attention_stats": dict(stats="all", centred=1.0, bs=64, steps=4000)}
HEADLINE = ("heldout_kinds_t0", "heldout_kinds_t08")
N_PATTERN_STATS = 4  # per head: entropy, weight on position 0, on the position itself, largest weight


@torch.no_grad()
def attention_statistics(replica, seq: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[R, L, 5H] per-block statistics at `positions` [R] of `seq` [T] (see the module docstring):
    H entropies, H sink weights, H self weights, H largest weights, then H log write norms."""
    from alignlens.probe.replica import decoder_layers

    layers, arch = decoder_layers(replica)
    if arch != "llama":
        raise SystemExit("prep-attention reads Llama-style attention modules (self_attn.o_proj)")
    z: list[torch.Tensor | None] = [None] * len(layers)

    def keep(i):
        def hook(_m, args):
            z[i] = args[0][0]
        return hook

    handles = [layer.self_attn.o_proj.register_forward_pre_hook(keep(i)) for i, layer in enumerate(layers)]
    try:
        out = replica(input_ids=seq.view(1, -1), use_cache=False, output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    stats = []
    for i, layer in enumerate(layers):
        a = out.attentions[i][0][:, positions]  # [H, R, T]
        H = a.shape[0]
        ent = -(a * torch.log(a.clamp_min(1e-12))).sum(-1)
        own = a.gather(2, positions.view(1, -1, 1).expand(H, -1, 1)).squeeze(2)
        W_O = layer.self_attn.o_proj.weight  # [d, H * head_dim]
        zh = z[i][positions].view(len(positions), H, -1)  # [R, H, head_dim]
        writes = torch.einsum("rhe,dhe->rhd", zh, W_O.view(W_O.shape[0], H, -1)).norm(dim=-1)  # [R, H]
        stats.append(torch.cat([ent.T, a[:, :, 0].T, own.T, a.amax(-1).T, torch.log(writes + 1e-6)], dim=1))
    return torch.stack(stats, dim=1).float()


def prep_attention(args: argparse.Namespace) -> None:
    """attention_statistics for every row `prep` packed into --data, in the same order."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignlens.probe.data import decision_inputs, labels_path, read_prompt

    torch.set_num_threads(args.threads)
    ck = resolve_model("default")
    att = Attributor.load(args.base or default_artifact_path(ck), ck)
    replica = AutoModelForCausalLM.from_pretrained(str(ck), dtype=torch.float32, attn_implementation="eager").eval()
    D = torch.load(args.data)

    def rows_of(trace, per_prompt: list[torch.Tensor]) -> torch.Tensor:
        out = []
        for i, r in zip(prompt_indices(trace), per_prompt):
            if r.numel():
                seq, pos, _ = decision_inputs(read_prompt(trace, i), r)
                out.append(attention_statistics(replica, seq, pos))
        return torch.cat(out)

    labels = load_file(str(labels_path(args.trace)))
    T = {i: read_prompt(args.trace, i)["token_ids"].shape[0] for i in prompt_indices(args.trace)}
    train_rows = [labels[f"{i}.rows"].sort().values if f"{i}.rows" in labels else torch.zeros(0, dtype=torch.long)
                  for i in prompt_indices(args.trace)]
    train_rows = [r[r < T[i]] for i, r in zip(prompt_indices(args.trace), train_rows)]
    stats = {"train": rows_of(args.trace, train_rows)}
    tokenizer = AutoTokenizer.from_pretrained(str(ck))
    ablator = FastAblator(replica, att.factors.basis, att.host.attn_out_bias)
    for name, trace in default_eval_sets(replica, tokenizer, att.metadata["host_fingerprint"]):
        if name in D:
            rows, *_ = cached_ablations(ablator, trace, 8, 0, progress=False)
            stats[name] = rows_of(trace, rows)
    for name, t in stats.items():
        if t.shape[0] != D[name]["drop"].shape[0]:
            raise SystemExit(f"{name}: {t.shape[0]} rows of statistics for {D[name]['drop'].shape[0]} packed rows")
        print(name, tuple(t.shape), flush=True)
    out = Path(args.data).with_suffix(".attention.pt")
    torch.save(stats, out)
    print("saved", out)


@torch.no_grad()
def prep(args: argparse.Namespace) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    ck = resolve_model("default")
    att = Attributor.load(args.base or default_artifact_path(ck), ck)
    h, m = att.host, att.model
    replica = AutoModelForCausalLM.from_pretrained(str(ck), dtype=torch.float32).eval()
    scale = component_scale(att.factors)

    def pack(ds, idx):
        s = ds.subset(idx)
        states = torch.cat([m.trunk(s.resid[i:i + 256], m.standardize(s.alpha[i:i + 256]))
                            for i in range(0, len(s), 256)])
        return dict(states=states, g_last=output_gradient(h, s.resid[:, -1], s.token_ids, s.cand_ids, s.cand_logits),
                    alpha=s.alpha, comp=s.alpha / scale, g_out=s.g_out,
                    tok=token_features(s.host_logprob, s.cand_logits),
                    dla=s.dla, token_ids=s.token_ids, groups=s.prompt_index, lin=s.lin, drop=s.drop)

    out: dict = {}
    tr = build_dataset(h, att.factors, [args.trace], top_k=att.top_k)
    out["train"] = pack(tr, torch.nonzero(tr.labeled).squeeze(1))
    out["train_mean_abs_drop"] = tr.drop[tr.labeled].abs().mean(0)
    grads = Path(args.trace).with_name(Path(args.trace).stem + ".gradients.safetensors")
    if grads.is_file():  # every row: the amortized-gradient variant's regression data
        out["train_all"] = pack(tr, torch.arange(len(tr)))
        G = load_file(str(grads))
        out["train_all"]["gamma"] = torch.cat([G[f"{i}.gamma"].float() for i in prompt_indices(args.trace)])
    del tr
    ablator = FastAblator(replica, att.factors.basis, h.attn_out_bias)
    # the evaluation's own sets and cached ablations (made, slowly, if `probe eval` never ran)
    tokenizer = AutoTokenizer.from_pretrained(str(ck))
    for name, trace in default_eval_sets(replica, tokenizer, att.metadata["host_fingerprint"]):
        ds = build_dataset(h, att.factors, [trace], top_k=att.top_k)
        rows, drop, lin, _ = cached_ablations(ablator, trace, 8, 0, progress=True)
        idx = ablated_rows(ds, rows)
        ds.drop, ds.lin = None, None
        out[name] = pack(ds, idx)
        out[name]["drop"], out[name]["lin"] = drop, lin
        print(name, len(idx), "ablated tokens", flush=True)
    torch.save(out, args.out)
    print("saved", args.out)


def _pool(D: dict, names: tuple[str, ...]) -> dict:
    parts = [D[n] for n in names if n in D]
    return {k: torch.cat([p[k] + j * 10**6 if k == "groups" else p[k] for j, p in enumerate(parts)])
            for k in parts[0]}


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    ck = resolve_model("default")
    att = Attributor.load(args.base or default_artifact_path(ck), ck)
    W_U = att.host.W_U
    D = torch.load(args.data)
    centre = D["train_mean_abs_drop"].flatten()
    attention = Path(args.data).with_suffix(".attention.pt")
    if attention.is_file():  # prep-attention's per-block statistics, standardized on the training rows
        S = torch.load(attention)
        mu, sd = S["train"].mean(0), S["train"].std(0).clamp_min(1e-4)
        for name, t in S.items():
            D[name]["stats"] = (t - mu) / sd
    sets = {"heldout_kinds": _pool(D, HEADLINE), "in_distribution": D["in_distribution_t08"]}

    def feats(model: ProbeModel, d: dict, b=slice(None), stats: str | None = None):
        phi, s = model.pair_features(d["alpha"][b], d["g_out"][b], d["tok"][b], d["dla"][b])
        if stats is not None:
            if "stats" not in d:
                raise SystemExit(f"no {attention}: run prep-attention first")
            x = d["stats"][b]
            if stats == "writes":
                x = x[..., N_PATTERN_STATS * (x.shape[-1] // (N_PATTERN_STATS + 1)):]
            phi = torch.cat([phi, x[:, :, None].expand(-1, -1, 3, -1)], dim=-1)
        return phi, s

    def predict(model: ProbeModel, d: dict, stats: str | None = None) -> torch.Tensor:
        with torch.no_grad():
            u = model.importance(d["states"], feats(model, d, stats=stats), W_U[d["token_ids"]])[..., 0]
        return model.attribution(u)

    def score(pred: torch.Tensor, d: dict) -> dict:
        r = faithfulness_report(pred, d["drop"], d["groups"], bootstrap_groups(d["groups"], 200, 0), centre)
        return {k: [round(v["value"], 3), [round(x, 3) for x in v["ci"]]] for k, v in r.items()
                if k in ("per_token_spearman", "share_centered_spearman", "top_pair_hit")}

    def train_head(frac=1.0, steps=3000, rank_weight=0.0, centred=0.0, lr=2e-3, seed=0, lin_weight=0.5, bs=32,
                   stats: str | None = None):
        from alignlens.probe.train import ablation_loss

        torch.manual_seed(seed)
        model = copy.deepcopy(att.model)
        fresh = ProbeModel(model.cfg)
        tr = D["train"]
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.startswith(HEAD_PREFIX) and n != "i_bias":
                    p.copy_(fresh.get_parameter(n))
            model.i_bias[..., 0] = model.log_magnitude(tr["drop"]).mean(0)
        if stats is not None:  # wider input map A_f for the extra per-pair inputs
            n_in = feats(model, tr, slice(0, 1), stats)[0].shape[-1]
            extra = torch.randn(3, n_in - model.i_in.shape[1], model.i_in.shape[2], generator=torch.Generator()
                                .manual_seed(seed)) / n_in ** 0.5
            model.i_in = torch.nn.Parameter(torch.cat([model.i_in.detach(), extra], dim=1))
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith(HEAD_PREFIX))
        g = torch.Generator().manual_seed(seed)
        keep = torch.randperm(tr["drop"].shape[0], generator=g)[:int(tr["drop"].shape[0] * frac)]
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (
            1 + math.cos(math.pi * min(1.0, s / steps))))
        for _ in range(steps):
            b = keep[torch.randint(0, keep.numel(), (bs,), generator=g)]
            out = model.importance(tr["states"][b], feats(model, tr, b, stats), W_U[tr["token_ids"][b]])
            loss = ablation_loss(out[..., 0], model.log_magnitude(tr["drop"][b]), rank_weight, 0.5, centred)
            if lin_weight:
                loss = loss + lin_weight * F.mse_loss(out[..., 1], model.log_magnitude(tr["lin"][b]))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
        return model.eval()

    for name in args.variants:
        t0 = time.time()
        if name in VARIANTS or name == "as_loaded":
            model = att.model if name == "as_loaded" else train_head(**VARIANTS[name])
            res = {s: score(predict(model, d), d) for s, d in sets.items()}
        elif name in STAT_VARIANTS:
            model = train_head(**STAT_VARIANTS[name])
            res = {s: score(predict(model, d, STAT_VARIANTS[name]["stats"]), d) for s, d in sets.items()}
        elif name == "gradient":
            A = D["train_all"]
            X = torch.cat([A["g_last"], torch.ones(len(A["g_last"]), 1)], 1).double()
            XtX = X.T @ X
            R = torch.linalg.solve(XtX + 1e-4 * XtX.diagonal().mean() * torch.eye(X.shape[1], dtype=X.dtype),
                                   X.T @ A["gamma"].flatten(1).double())

            def lin_hat(d):
                Xd = torch.cat([d["g_last"], torch.ones(len(d["g_last"]), 1)], 1).double()
                return ((Xd @ R).float().view(d["comp"].shape) * d["comp"]).sum(-1)
            res = {s: {**score(lin_hat(d).abs(), d),
                       "corr_with_exact_linearized": round(float(torch.corrcoef(torch.stack(
                           [lin_hat(d).flatten(), d["lin"].flatten()]))[0, 1]), 3)} for s, d in sets.items()}
        elif name == "linearized_upper":
            res = {s: score(predict(att.model, d) * (d["lin"].abs() + 1e-4) ** 0.5, d) for s, d in sets.items()}
        elif name in ("mean_profile", "host_linearized"):
            res = {s: score(D["train_mean_abs_drop"].expand_as(d["drop"]) if name == "mean_profile"
                            else d["lin"].abs(), d) for s, d in sets.items()}
        else:
            known = [*VARIANTS, *STAT_VARIANTS, "as_loaded", "gradient", "linearized_upper", "mean_profile",
                     "host_linearized"]
            raise SystemExit(f"unknown variant {name!r}: {', '.join(known)}")
        print(json.dumps({"variant": name, **res, "seconds": round(time.time() - t0)}), flush=True)


@torch.no_grad()
def lens_propagated(args: argparse.Namespace) -> None:
    """Lens-propagated local ablation, scored against the evaluation's exact drops: each (block j,
    family) ablation is run exactly through block j alone (FastAblator._block on the decision row,
    the prefix's keys/values shared), and the rest of the network is replaced by the probe's tuned
    lens at depth j+1; the estimate is that lens's drop in log p(y) (full vocabulary). Block L is
    exact (the host's own readout), which checks the plumbing. Prints one JSON line per split."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignlens.probe.ablation import full_cache
    from alignlens.probe.data import decision_inputs, read_prompt
    from alignlens.probe.fingerprint import host_fingerprint

    torch.set_num_threads(args.threads)
    ck = resolve_model("default")
    att = Attributor.load(args.base or default_artifact_path(ck), ck)
    lens = att.model.lens
    if lens is None:
        raise SystemExit("lens-propagated: the probe has no tuned lens (ProbeConfig.tuned_lens)")
    replica = AutoModelForCausalLM.from_pretrained(str(ck), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(ck))
    fab = FastAblator(replica, att.factors.basis, att.host.attn_out_bias)
    L = fab.L

    def logp(h: torch.Tensor, depth: int, ys: torch.Tensor) -> torch.Tensor:
        r = h if depth == L else h + h @ lens.weight[depth] + lens.bias[depth]
        return torch.log_softmax(fab.lm_head(fab.final_norm(r)).float(), -1).gather(1, ys[:, None]).squeeze(1)

    sets = default_eval_sets(replica, tok, host_fingerprint(att.host), 32, None)
    centre = torch.tensor(att.metadata["data"]["train_mean_abs_drop"]).flatten()
    per_set = {}
    for si, (name, path) in enumerate(sets):
        rows, drop, _, _ = cached_ablations(fab, path, 8, 0, False)
        est = []
        for i, t in zip(prompt_indices(path), rows):
            ids, positions, ys = decision_inputs(read_prompt(path, i), t)
            o = replica(input_ids=ids.view(1, -1), past_key_values=full_cache(), use_cache=True,
                        output_hidden_states=True)
            hidden = [h[0, positions] for h in o.hidden_states[:-1]]  # h_0..h_{L-1}; the last is normed
            kv = [(layer.keys[0], layer.values[0]) for layer in o.past_key_values.layers]
            c = positions.shape[0]
            e = torch.empty(c, L, 3)
            for j in range(L):
                ablated = fab._block(j, hidden[j].repeat_interleave(3, 0), positions.repeat_interleave(3),
                                     torch.arange(3).repeat(c), torch.ones(3 * c, dtype=torch.bool), *kv[j])
                clean = hidden[j + 1] if j + 1 < L else fab._block(j, hidden[j], positions,
                                                                   torch.zeros(c, dtype=torch.long),
                                                                   torch.zeros(c, dtype=torch.bool), *kv[j])
                e[:, j] = logp(clean, j + 1, ys)[:, None] - logp(ablated, j + 1, ys.repeat_interleave(3)).view(c, 3)
            est.append(e)
        groups = si * 1_000_000 + torch.cat([torch.full((r.numel(),), k) for k, r in enumerate(rows)])
        per_set[name] = (torch.cat(est), drop, groups)
        corr = [round(float(torch.corrcoef(torch.stack([per_set[name][0][:, j].flatten(), drop[:, j].flatten()]))[0, 1]),
                      4) for j in range(L)]  # per block, over tokens and families; block L is exact: 1.0
        print(json.dumps({"set": name, "tokens": int(drop.shape[0]), "block_correlation": corr}), flush=True)
    splits = {"heldout_kinds": [n for n in HEADLINE if n in per_set],
              "in_distribution": [n for n in per_set if n not in HEADLINE]}
    for split, names in splits.items():
        if names:
            pred, drop, groups = (torch.cat([per_set[n][k] for n in names]) for k in range(3))
            rep = faithfulness_report(pred.abs(), drop, groups, bootstrap_groups(groups, 200, 0), centre)
            print(json.dumps({"split": split, "variant": "lens_propagated",
                              **{k: [round(v["value"], 4), [round(x, 4) for x in v["ci"]]] for k, v in rep.items()}}),
                  flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prep")
    a.add_argument("--trace", required=True, help="training trace with .labels (and .gradients) beside it")
    a.add_argument("--out", required=True)
    c = sub.add_parser("prep-attention")
    c.add_argument("--trace", required=True, help="the training trace prep read")
    c.add_argument("--data", required=True, help="prep's output; writes <data>.attention.pt beside it")
    b = sub.add_parser("run")
    b.add_argument("--data", required=True, help="prep's output")
    b.add_argument("variants", nargs="+")
    d = sub.add_parser("lens-propagated")
    for q in (a, b, c, d):
        q.add_argument("--base", help="probe whose trunk is used (default: the shipped one)")
        q.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    {"prep": prep, "prep-attention": prep_attention, "run": run, "lens-propagated": lens_propagated}[args.cmd](args)


if __name__ == "__main__":
    main()
