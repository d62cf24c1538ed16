"""`alignlens harness ...` (lm-eval with the `alignlens` model type) and `alignlens harness-report`."""

from __future__ import annotations

import argparse
import json
import sys


def _run(args: argparse.Namespace) -> int:
    try:
        import lm_eval  # noqa: F401 - the extra's presence, checked before anything runs

        from alignlens.service import harness
    except ModuleNotFoundError as exc:
        raise SystemExit(f"alignlens harness: {exc.name} is not installed: pip install 'alignlens[harness]'") from None
    return harness.run(args.lm_eval_args)


def _report(args: argparse.Namespace) -> int:
    from alignlens.service import harness

    try:
        decided, missing = harness.join(args.samples, args.attributions)
    except (FileNotFoundError, OSError) as exc:
        raise SystemExit(f"alignlens harness-report: {exc}") from None
    if not decided:
        raise SystemExit("alignlens harness-report: no sample found its tokens in the attributions file "
                         f"({missing} samples without): were both made by the same `alignlens harness` run?")
    summary = harness.summarise(decided)
    text = harness.markdown(summary, missing)
    sys.stdout.write(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "samples": len(decided), "missing": missing}, f, indent=1)
    if args.png:
        harness.plot(summary, args.png)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    run = subparsers.add_parser(
        "harness", help="lm-evaluation-harness with the `alignlens` model type (attribution per sample)",
        description="Runs `lm_eval run ARGS` with the model type `alignlens` registered: lm-eval's local-completions "
                    "against an alignlens HTTP API (--http-port), recording the attribution of every request's "
                    "deciding tokens in OUTPUT_PATH/alignlens-attributions.jsonl (or attributions=PATH in "
                    "--model_args). Example: alignlens harness --model alignlens --model_args "
                    "base_url=http://127.0.0.1:8000/v1/completions,model=SmolLM2-135M-Instruct,tokenizer=PATH "
                    "--tasks hellaswag --log_samples --output_path out/")
    run.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="lm_eval's own arguments")
    run.set_defaults(func=_run, passthrough=True)

    report = subparsers.add_parser("harness-report", help="summarise an `alignlens harness` run's attribution "
                                                          "by outcome (table and plot)")
    report.add_argument("--samples", required=True, help="lm-eval's --output_path folder (run with --log_samples)")
    report.add_argument("--attributions", required=True, help="the run's alignlens-attributions.jsonl")
    report.add_argument("--out", default="", help="also write the Markdown table here")
    report.add_argument("--json", default="", help="write the summary as JSON here")
    report.add_argument("--png", default="", help="write the figure here")
    report.set_defaults(func=_report)
