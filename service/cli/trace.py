"""`alignlens trace`: generate with vLLM and dump resid / resid_mid per emitted token."""

from __future__ import annotations

import argparse
import json

from alignlens.service.cli.configs import add_config_args, config_from_args
from alignlens.service.engine.config import EngineConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("trace", help="generate and dump the residual stream of every emitted token")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    p.add_argument("--prompts-file", help="JSONL with {'prompt': ...} per line (added after --prompt)")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template to each prompt")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens to generate per prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--out", required=True, help="output .safetensors file")
    add_config_args(p, EngineConfig)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from alignlens.service.engine.trace import trace_to_file

    prompts = list(args.prompt)
    if args.prompts_file:
        with open(args.prompts_file) as fh:
            prompts += [json.loads(line)["prompt"] for line in fh if line.strip()]
    if not prompts:
        raise SystemExit("alignlens trace: give at least one --prompt or --prompts-file")
    if args.max_tokens < 1:
        raise SystemExit(f"alignlens trace: --max-tokens must be >= 1, got {args.max_tokens}")
    config = config_from_args(EngineConfig, args)
    out = trace_to_file(config.model, prompts, args.max_tokens, args.temperature, args.out,
                        chat=args.chat, seed=config.seed, config=config)
    print(out)
    return 0
