"""Dataclass configs <-> CLI flags (service/configs.py), as `alignlens bench` hands its engine
settings to the `alignlens serve` it starts."""

import argparse

from alignlens.service.cli.configs import add_config_args, config_from_args, config_to_args
from alignlens.service.cli.serve import FIXED_ENGINE_FIELDS
from alignlens.service.engine.config import EngineConfig


def test_config_to_args_round_trips_through_the_serve_flags():
    config = EngineConfig(model="/m", dtype="bfloat16", max_num_batched_tokens=64, enforce_eager=True, seed=3)
    args = config_to_args(config, exclude=FIXED_ENGINE_FIELDS)
    assert "--enforce-eager" in args and "--multiprocessing" not in args
    parser = argparse.ArgumentParser()
    add_config_args(parser, EngineConfig, exclude=FIXED_ENGINE_FIELDS)
    assert config_from_args(EngineConfig, parser.parse_args(args)) == config
    off = config_to_args(EngineConfig(enforce_eager=False), exclude=("model", *FIXED_ENGINE_FIELDS))
    assert "--no-enforce-eager" in off and "--model" not in off
