"""`alignlens probe collect|label|train|eval`: CLI glue around probe/ (the science lives there).

collect  generate with vLLM (the capture engine, alignlens.service.engine.trace) from the shipped prompt set or a JSONL
         file, write the trace, then compute on the transformers replica the host-gradient labels of
         every row and the ablation labels of a sample of rows (probe.collect_replica).
         `--engine replica` generates with transformers instead (no vLLM).
label    the same replica labels for an existing trace (resumable; e.g. after `collect --label-rows 0`).
train    fit a probe on one or more traces and write the artifact (probe.train.train_artifact).
eval     METHOD.md section 6 numbers on held-out generated tokens (probe.evaluate); `--json` prints one
         JSON object as the last line; `--write` stores it in the artifact and beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from alignlens.service.cli.configs import add_config_args, config_from_args
from alignlens.service.engine.config import EngineConfig

DEFAULT_STEPS = 3000  # `probe train --steps` when not given: a full training (and --head-of)
READOUT_STEPS = 2000  # ... with --readout-of (Out alone on a frozen trunk)
READOUT_ONLY_FLAGS = ("lens_steps", "lens_from", "depth_out", "balance_depths")  # meaningful with --readout-of only

log = logging.getLogger(__name__)


def _checkpoint(name: str) -> Path:
    from alignlens.service.modelstore import resolve_model

    return Path(resolve_model(name))


def _load_replica(checkpoint: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(checkpoint))


def _collect(args: argparse.Namespace) -> int:
    import torch

    from alignlens.probe.collect_replica import collect
    from alignlens.probe.prompts import encode_row, read_prompts, split

    torch.set_num_threads(args.threads)
    config = config_from_args(EngineConfig, args)
    checkpoint = _checkpoint(config.model)
    rows = read_prompts(args.prompts)
    if args.split != "all":
        rows = split(rows, held_out=args.split == "eval")
    rows = rows[:args.limit] if args.limit else rows
    if not rows:
        raise SystemExit("alignlens probe collect: no prompts selected")
    model, tokenizer = _load_replica(checkpoint)
    prompt_ids = [encode_row(tokenizer, r) for r in rows]
    out = Path(args.out)
    if args.engine == "vllm":
        from alignlens.service.engine.trace import trace_to_file

        del model  # the engine loads its own copy; free ours while it runs
        trace_to_file(str(checkpoint), prompt_ids, args.max_tokens, args.temperature, out, seed=args.seed,
                      config=config)
        model, _ = _load_replica(checkpoint)
    else:
        collect(model, prompt_ids, args.max_tokens, args.temperature, out, seed=args.seed,
                eos_token_id=tokenizer.eos_token_id, metadata={"model": str(checkpoint)})
    log.info("collect: %d prompts traced to %s", len(prompt_ids), out)
    _label_trace(model, checkpoint, out, args)
    print(out)
    return 0


def _label_trace(model, checkpoint: Path, trace: Path, args: argparse.Namespace) -> None:
    """Host-gradient labels of every row and ablation labels of `--label-rows` random rows per
    prompt (probe.collect_replica; both resumable), on the transformers replica."""
    from alignlens.probe.collect_replica import label_gradients, label_trace
    from alignlens.probe.host import Host
    from alignlens.probe.svd import load_or_compute

    host = Host.from_checkpoint(checkpoint)
    factors = load_or_compute(host, args.k)
    if args.gradients:
        grads = label_gradients(model, factors.basis, host.attn_out_bias, trace)
        log.info("label: host-gradient labels in %s", grads)
    if args.label_rows > 0:
        labels = label_trace(model, factors.basis, host.attn_out_bias, trace, args.label_rows, seed=args.seed)
        log.info("label: ablation labels in %s", labels)


def _label(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(args.threads)
    checkpoint = _checkpoint(args.model)
    model, _ = _load_replica(checkpoint)
    _label_trace(model, checkpoint, Path(args.data), args)
    print(args.data)
    return 0


def _train(args: argparse.Namespace) -> int:
    from alignlens.probe.artifact import default_artifact_path
    from alignlens.probe.train import TrainConfig, train_artifact

    given = [f"--{name.replace('_', '-')}" for name in READOUT_ONLY_FLAGS if getattr(args, name) is not None]
    if given and not args.readout_of:
        raise SystemExit(f"alignlens probe train: {', '.join(given)} only apply with --readout-of")
    if args.lens_from and args.lens_steps is not None:
        raise SystemExit("alignlens probe train: --lens-steps fits a lens; --lens-from takes one: give one")
    steps = args.steps if args.steps is not None else (READOUT_STEPS if args.readout_of else DEFAULT_STEPS)
    checkpoint = _checkpoint(args.model)
    cfg = TrainConfig(steps=steps, lr=args.lr, seed=args.seed, threads=args.threads,
                      max_minutes=args.max_minutes, rank_weight=args.rank_weight, centred_weight=args.centred_weight,
                      ablation_batch_size=args.ablation_batch_size, ce_weight=args.ce_weight)
    overrides = {"k": args.k, "width": args.width, "n_encoder_layers": args.encoder_layers, "top_k": args.top_k,
                 "alignment_features": args.alignment_features, "tuned_lens": args.tuned_lens,
                 "dla_inputs": args.dla_inputs}
    out = args.out or str(default_artifact_path(checkpoint))
    if args.head_of and args.readout_of:
        raise SystemExit("alignlens probe train: --head-of and --readout-of retrain different parts; give one")
    if args.readout_of:
        from alignlens.probe.train import retrain_readout_artifact
        from alignlens.probe.tuned_lens import TunedLensConfig

        meta = retrain_readout_artifact(str(checkpoint), args.data, args.readout_of, out,
                                        TunedLensConfig(steps=args.lens_steps or 1000), cfg, lens_from=args.lens_from,
                                        depth_out=args.depth_out is not False,
                                        balance_depths=args.balance_depths is not False)
        print(json.dumps({"artifact": out, "readout_retrained": meta["readout_retrained"]}))
        return 0
    if args.head_of:
        from alignlens.probe.train import retrain_head_artifact

        meta = retrain_head_artifact(str(checkpoint), args.data, args.head_of, out, cfg)
        print(json.dumps({"artifact": out, "head_retrained": meta["head_retrained"],
                          "ablation_labelled_tokens": meta["data"]["ablation_labelled_tokens"]}))
        return 0
    meta = train_artifact(str(checkpoint), args.data, out, overrides, cfg, max_tokens=args.max_tokens)
    print(json.dumps({"artifact": out, "training_seconds": meta["training_seconds"],
                      "tokens": meta["data"]["tokens"], "fit": meta["fit"]}))
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch

    from alignlens.probe.artifact import default_artifact_path, load_artifact, sidecar_path, update_metadata
    from alignlens.probe.attribution import Attributor
    from alignlens.probe.data import build_dataset
    from alignlens.probe.evaluate import default_eval_sets, evaluate, markdown_report
    from alignlens.probe.fingerprint import host_fingerprint
    from alignlens.probe.tuned_lens import TunedLensConfig, train_tuned_lens

    if args.depth_from and (args.tuned_lens_data or args.activation_only):
        raise SystemExit("alignlens probe eval: --depth-from takes the depth curves, tuned lens and activation-only "
                         "readout included, from the earlier evaluation: drop --tuned-lens-data / --activation-only")
    torch.set_num_threads(args.threads)
    checkpoint = _checkpoint(args.model)
    artifact = Path(args.probe or default_artifact_path(checkpoint))
    if not artifact.is_file():
        raise SystemExit(f"alignlens probe eval: no probe at {artifact}; train one with `alignlens probe train`")
    att = Attributor.load(artifact, checkpoint)
    model, tokenizer = _load_replica(checkpoint)
    if args.data:
        sets = []
        for item in args.data:
            name, sep, path = item.partition("=")
            sets.append((name, Path(path)) if sep else (Path(item).stem, Path(item)))
    else:
        sets = default_eval_sets(model, tokenizer, host_fingerprint(att.host), args.max_tokens, args.prompts or None)
    lens, lens_summary = None, None
    if args.tuned_lens_data:
        train_data = build_dataset(att.host, att.factors, args.tuned_lens_data, top_k=att.top_k,
                                   max_tokens=args.tuned_lens_tokens)
        lens, lens_summary = train_tuned_lens(att.host, train_data, TunedLensConfig(steps=args.tuned_lens_steps),
                                              top_k=att.top_k)
        lens_summary["data"] = list(args.tuned_lens_data)
        del train_data
    activation_only = None
    if args.activation_only:
        activation_only, meta = load_artifact(args.activation_only, host_fingerprint(att.host), checkpoint)
        if meta["probe_config"].get("alignment_features", True):
            raise SystemExit(f"alignlens probe eval: {args.activation_only} is not an activation-only probe "
                             "(train one with `alignlens probe train --no-alignment-features`)")
    reuse_depth = None
    if args.depth_from:
        from alignlens.probe.train import readout_state_equal

        earlier, earlier_meta = load_artifact(args.depth_from, host_fingerprint(att.host), checkpoint)
        if not readout_state_equal(att.model, earlier):
            raise SystemExit(f"alignlens probe eval: --depth-from {args.depth_from}: that probe's trunk or readout "
                             f"differs from {artifact}'s, so its depth curves are not this probe's")
        if not earlier_meta.get("evaluation"):
            raise SystemExit(f"alignlens probe eval: --depth-from {args.depth_from} carries no evaluation")
        reuse_depth = earlier_meta["evaluation"]
        lens_summary = reuse_depth.get("tuned_lens")
    result = evaluate(att, model, sets, args.ablation_per_prompt, tuned_lens=lens, activation_only=activation_only,
                      tokens_per_set=args.tokens_per_set, n_boot=args.boot, reuse_depth=reuse_depth)
    result["probe"] = str(artifact)
    result["tuned_lens"] = lens_summary
    result["activation_only_probe"] = args.activation_only if reuse_depth is None else reuse_depth.get(
        "activation_only_probe")
    if reuse_depth is not None:
        result["depth_reused_from"] = str(args.depth_from)
    if args.write:
        update_metadata(artifact, evaluation=result)
        eval_path = sidecar_path(artifact).with_suffix(".eval.json")
        eval_path.write_text(json.dumps(result, indent=2) + "\n")
        log.info("eval: written to %s and the artifact metadata", eval_path)
    if not args.json:
        print(markdown_report(result))
    print(json.dumps(result), file=sys.stdout)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `probe` with its `collect`, `label`, `train` and `eval` subcommands."""
    parser = subparsers.add_parser("probe", help="collect data for, train and evaluate the attribution probe")
    sub = parser.add_subparsers(dest="probe_command", required=True)

    c = sub.add_parser("collect", help="generate + capture training data, with replica ablation labels")
    c.add_argument("--prompts", help="JSONL of {'prompt': str, 'chat': bool} (default: the shipped set)")
    c.add_argument("--split", choices=["train", "eval", "all"], default="train",
                   help="which part of the prompt set (every 10th prompt is held out for eval)")
    c.add_argument("--limit", type=int, default=0, help="use only the first N prompts (0 = all)")
    c.add_argument("--max-tokens", type=int, default=32, help="tokens generated per prompt")
    c.add_argument("--temperature", type=float, default=0.8, help="sampling temperature")
    c.add_argument("--label-rows", type=int, default=6, help="ablation-labelled rows per prompt (0 = none)")
    c.add_argument("--gradients", action=argparse.BooleanOptionalAction, default=True,
                   help="host-gradient labels for every row (one replica backward pass per sequence)")
    c.add_argument("--k", type=int, default=32, help="singular directions per (block, family)")
    c.add_argument("--engine", choices=["vllm", "replica"], default="vllm", help="generator")
    c.add_argument("--threads", type=int, default=1, help="torch threads for the replica")
    c.add_argument("--out", required=True, help="trace file to write (.safetensors)")
    add_config_args(c, EngineConfig)
    c.set_defaults(func=_collect)

    lb = sub.add_parser("label", help="add (or finish) replica labels on an existing trace: host gradients of every "
                                      "row, ablations of a sample of rows (resumable)")
    lb.add_argument("--model", default="default", help="'default' or a local checkpoint folder")
    lb.add_argument("--data", required=True, help="trace file (.safetensors)")
    lb.add_argument("--label-rows", type=int, default=6, help="ablation-labelled rows per prompt (0 = none)")
    lb.add_argument("--gradients", action=argparse.BooleanOptionalAction, default=True,
                    help="host-gradient labels for every row")
    lb.add_argument("--k", type=int, default=32, help="singular directions per (block, family)")
    lb.add_argument("--seed", type=int, default=0, help="which rows are ablated")
    lb.add_argument("--threads", type=int, default=1, help="torch threads for the replica")
    lb.set_defaults(func=_label)

    t = sub.add_parser("train", help="train a probe on traces and write its artifact")
    t.add_argument("--model", default="default", help="'default' or a local checkpoint folder")
    t.add_argument("--data", action="append", required=True, help="trace file (repeatable)")
    t.add_argument("--out", help="artifact path (default: the shipped location for this model)")
    t.add_argument("--steps", type=int, default=None,
                   help=f"optimiser steps (default {DEFAULT_STEPS}; {READOUT_STEPS} with --readout-of)")
    t.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    t.add_argument("--k", type=int, default=32, help="singular directions per (block, family)")
    t.add_argument("--width", type=int, default=128, help="probe width")
    t.add_argument("--encoder-layers", type=int, default=2, help="encoder layers over depth")
    t.add_argument("--top-k", type=int, default=32, help="host candidates scored per token")
    t.add_argument("--max-tokens", type=int, default=None, help="use at most N tokens of the data")
    t.add_argument("--seed", type=int, default=0, help="training seed")
    t.add_argument("--threads", type=int, default=1, help="torch threads")
    t.add_argument("--max-minutes", type=float, default=28.0, help="wall-clock budget")
    t.add_argument("--alignment-features", action=argparse.BooleanOptionalAction, default=True,
                   help="feed the alignment features to the trunk (--no-alignment-features: the activation-only "
                        "probe the evaluation compares with)")
    t.add_argument("--tuned-lens", action=argparse.BooleanOptionalAction, default=False,
                   help="start the readout from a tuned lens fitted on the same data (L*d*d more per token)")
    t.add_argument("--dla-inputs", action=argparse.BooleanOptionalAction, default=False,
                   help="the importance head also reads each (block, family)'s direct logit attribution")
    t.add_argument("--rank-weight", type=float, default=0.0, help="weight of the ListNet ranking term")
    t.add_argument("--centred-weight", type=float, default=0.0,
                   help="weight of the per-token centred term of the ablation loss (the profile's shape)")
    t.add_argument("--ablation-batch-size", type=int, default=32, help="ablation-labelled tokens per step")
    t.add_argument("--readout-of", metavar="ARTIFACT",
                   help="give this probe the tuned-lens readout: fit a tuned lens on --data (--lens-steps) and "
                        "retrain only Out on top of it (2,000 steps unless --steps); trunk and importance head "
                        "stay bit-identical (the architecture flags and --max-tokens are ignored)")
    t.add_argument("--ce-weight", type=float, default=0.1,
                   help="weight of the emitted token's cross-entropy beside the readout's KL to the host")
    t.add_argument("--depth-out", action=argparse.BooleanOptionalAction, default=None,
                   help="with --readout-of: one Out matrix per depth (the default; --no-depth-out: one shared by "
                        "all depths)")
    t.add_argument("--balance-depths", action=argparse.BooleanOptionalAction, default=None,
                   help="with --readout-of: weight each depth's loss term by 1 / the lens's KL there (the default)")
    t.add_argument("--lens-steps", type=int, default=None,
                   help="with --readout-of: tuned-lens Adam steps (default 1000, the evaluation baseline's recipe)")
    t.add_argument("--lens-from", metavar="ARTIFACT",
                   help="with --readout-of: take the tuned lens from this probe instead of fitting one")
    t.add_argument("--head-of", metavar="ARTIFACT",
                   help="retrain only the importance head of this probe on --data's labels (trunk, readout and "
                        "input statistics kept bit-identical; the architecture flags are ignored)")
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="evaluate a probe (METHOD.md section 6)")
    e.add_argument("--probe", help="artifact (default: the shipped probe for --model)")
    e.add_argument("--model", default="default", help="'default' or a local checkpoint folder")
    e.add_argument("--data", action="append", metavar="[NAME=]TRACE",
                   help="evaluation trace (repeatable; default: held-out prompt kinds at temperature 0 and 0.8 "
                        "and the in-distribution held-out split, generated on the replica and cached)")
    e.add_argument("--prompts", type=int, default=0, help="use only the first N prompts of each default set (0 = all)")
    e.add_argument("--max-tokens", type=int, default=32, help="tokens per prompt when generating the default sets")
    e.add_argument("--tokens-per-set", type=int, default=None, help="use at most N tokens of each set")
    e.add_argument("--ablation-per-prompt", type=int, default=8, help="positions per prompt with exact ablations")
    e.add_argument("--tuned-lens-data", action="append", metavar="TRACE",
                   help="training trace(s) to fit the tuned-lens baseline on (repeatable; the probe's own data)")
    e.add_argument("--tuned-lens-tokens", type=int, default=8000, help="at most N tokens of it for the tuned lens")
    e.add_argument("--tuned-lens-steps", type=int, default=400, help="tuned-lens Adam steps")
    e.add_argument("--activation-only", metavar="ARTIFACT",
                   help="an activation-only probe (probe train --no-alignment-features) to compare readouts with")
    e.add_argument("--depth-from", metavar="ARTIFACT",
                   help="take the depth curves (probe, logit lens, tuned lens, activation-only) from this probe's "
                        "stored evaluation; refused unless its trunk and readout equal --probe's (e.g. after "
                        "`probe train --head-of`); faithfulness is measured anew")
    e.add_argument("--boot", type=int, default=1000, help="bootstrap resamples over prompts")
    e.add_argument("--threads", type=int, default=1, help="torch threads")
    e.add_argument("--json", action="store_true", help="print only the JSON object")
    e.add_argument("--write", action="store_true", help="store the result in the artifact and beside it")
    e.set_defaults(func=_eval)
