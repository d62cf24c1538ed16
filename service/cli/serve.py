"""`alignlens serve`: the gRPC attribution server (service/server.py)."""

from __future__ import annotations

import argparse

from alignlens.service.cli.configs import add_config_args, config_from_args
from alignlens.service.engine.config import EngineConfig

# AsyncLLM always runs its engine core in another process, and serving needs capture: not flags.
FIXED_ENGINE_FIELDS = ("multiprocessing", "capture")


def add_parser(sub: argparse._SubParsersAction) -> None:
    from alignlens.service.server.app import ServeConfig

    p = sub.add_parser("serve", help="serve generation with per-token attribution over gRPC (+ /metrics)",
                       description="Serve the model over gRPC (alignlens.v1.AttributionService, health, "
                                   "reflection) with Prometheus metrics. Every flag also reads ALIGNLENS_<NAME>.")
    add_config_args(p.add_argument_group("server"), ServeConfig)
    add_config_args(p.add_argument_group("engine"), EngineConfig, exclude=FIXED_ENGINE_FIELDS)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from alignlens.service.server.app import ServeConfig, serve

    return serve(config_from_args(ServeConfig, args), config_from_args(EngineConfig, args))
