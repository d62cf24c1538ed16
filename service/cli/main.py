"""The `alignlens` command line (also `python -m alignlens.service.cli`). Each subcommand lives in
its own module in this folder and exposes `add_parser(subparsers)`; the parser sets `func`.

The benchmark is not a subcommand: it lives in the checkout (`python -m tools.bench`, `make bench`)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Order is the order shown in --help.
COMMAND_MODULES = [
    "alignlens.service.cli.model",
    "alignlens.service.cli.trace",
    "alignlens.service.cli.probe",
    "alignlens.service.cli.serve",
    "alignlens.service.cli.client",
    "alignlens.service.cli.harness",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="alignlens", description="vLLM serving with per-token weight-alignment attribution.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # command not built yet
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if getattr(args, "passthrough", False):  # `alignlens harness ...`: every argument is lm-eval's
        args.lm_eval_args = unknown + args.lm_eval_args
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
