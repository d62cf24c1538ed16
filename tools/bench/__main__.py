"""`python -m tools.bench` (`make bench`): attribution cost against stock vLLM, measured side by side.

Run from the checkout (the benchmark is not part of the installed package). Engine-level phases:
tools/bench/engines.py; through the gRPC server (--service): tools/bench/service.py. Progress is
logged as each phase and measurement finishes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

from alignlens.service.cli.configs import add_config_args, config_from_args
from alignlens.service.engine.config import EngineConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.bench",
                                description="measure stock vLLM vs capture vs full attribution, side by side")
    p.add_argument("--probe", default=None, help="probe artifact (default: the shipped probe when --model default)")
    p.add_argument("--batch-sizes", default="1,4,8,16", help="comma-separated concurrent requests per run")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    p.add_argument("--repetitions", type=int, default=3, help="repetitions per (batch, mode), modes alternating")
    p.add_argument("--modes", default="stock,capture,attributed", help="subset of stock,capture,attributed,intervened")
    p.add_argument("--service", action="store_true",
                   help="also measure through the gRPC server: concurrent streams and Audit")
    p.add_argument("--streams", default="1,8,32", help="concurrent Generate streams (with --service)")
    p.add_argument("--audit-lengths", default="64,512", help="logged completion lengths for Audit (with --service)")
    p.add_argument("--causal-tokens", default="", help="with --service: CAUSAL Audits of this many tokens, "
                                                         "comma-separated (e.g. 1,4)")
    p.add_argument("--causal-pairs", default="0", help="with --causal-tokens: (block, family) pairs ablated per token, "
                                                        "comma-separated; 0 = all 3L, k = the probe's k largest "
                                                        "(e.g. 0,3,10,30)")
    p.add_argument("--verify-fraction", type=float, default=0.0,
                   help="with --service: also measure the largest stream count through a server with this "
                        "--verify-fraction")
    p.add_argument("--json", action="store_true", help="print the JSON report as the last line")
    p.add_argument("--out", help="write the Markdown table to this file")
    add_config_args(p, EngineConfig)
    return p


def default_probe(model: str) -> str | None:
    """The shipped probe trained for `model` (the server's `--probe auto` rule), if any."""
    from alignlens.service.modelstore import resolve_model
    from alignlens.service.server.model_info import choose_probe, host_facts

    choice = choose_probe("auto", host_facts(resolve_model(model)))
    return str(choice.path) if choice.path else None


def run(args: argparse.Namespace) -> int:
    from alignlens.service.modelstore import resolve_model
    from tools.bench.engines import bench_engines, markdown_table

    config = config_from_args(EngineConfig, args)
    modes = [m for m in args.modes.split(",") if m]
    probe = args.probe
    if probe is None and {"attributed", "intervened"} & set(modes):
        probe = default_probe(config.model)
        if probe is None:
            raise SystemExit("alignlens bench: mode 'attributed' needs --probe (no shipped probe for this model)")
    report = asyncio.run(bench_engines(config, probe, [int(b) for b in args.batch_sizes.split(",")],
                                       args.max_tokens, args.repetitions, modes))
    from tools.bench.engines import cost_model

    report["cost_model"] = cost_model(str(resolve_model(config.model)), probe)
    if args.service:
        from alignlens.service.cli.configs import config_to_args
        from alignlens.service.cli.serve import FIXED_ENGINE_FIELDS
        from tools.bench.engines import BENCH_PROMPTS
        from tools.bench.service import bench_service

        # the server runs with the same vLLM settings as the engine-level runs (bench_service adds --model)
        serve_args = config_to_args(config, exclude=("model", *FIXED_ENGINE_FIELDS))
        report["service"] = bench_service(config.model, probe, [int(n) for n in args.streams.split(",")],
                                          args.max_tokens, [int(n) for n in args.audit_lengths.split(",")],
                                          args.repetitions, BENCH_PROMPTS, serve_args,
                                          [int(n) for n in args.causal_tokens.split(",") if n],
                                          [int(k) for k in args.causal_pairs.split(",") if k])
        from tools.bench.engines import service_over_engine

        report["service"]["over_engine_direct"] = {
            n: service_over_engine(report, n) for n in report["service"]["streams"]}
        if args.verify_fraction > 0:
            from tools.bench.service import verify_cost

            n = max(int(x) for x in args.streams.split(","))
            row = verify_cost(config.model, probe, n, args.max_tokens, args.repetitions, BENCH_PROMPTS, serve_args,
                              args.verify_fraction)
            row["over_without"] = row["tokens_per_second"] / report["service"]["streams"][str(n)]["tokens_per_second"]
            stock = report["batches"].get(str(n), {}).get("stock")
            row["over_engine_stock"] = row["tokens_per_second"] / stock["tokens_per_second"] if stock else None
            report["service"]["verify"] = row
        report["service"]["none_over_engine_stock"] = {
            n: service_over_engine(report, n, "stock", "none_tokens_per_second") for n in report["service"]["streams"]}
    return emit(markdown_table(report), report, args.out, args.json)


def emit(table: str, report: dict, out: str | None, as_json: bool) -> int:
    """Print a bench's Markdown table (and write it to `out`), then its JSON report as the last line."""
    if out:
        Path(out).write_text(table + "\n")
    print(table)
    if as_json:
        print(json.dumps(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
