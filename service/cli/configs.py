"""Dataclass-driven configuration: one definition gives CLI flags and ALIGNLENS_* env fallbacks.

Each field of a config dataclass carries its help text in `field(metadata={"help": ...})`.
`add_config_args` turns the fields into `--flag-name` options whose default is read from
`ALIGNLENS_FLAG_NAME` when set, else the dataclass default; `config_from_args` builds
the dataclass back from the parsed namespace, and `config_to_args` writes a config back out as
the flags another `alignlens` process takes.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, TypeVar, get_type_hints

T = TypeVar("T")


def _env_name(name: str) -> str:
    return "ALIGNLENS_" + name.upper()


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def add_config_args(parser: argparse.ArgumentParser, cls: type, exclude: tuple[str, ...] = ()) -> None:
    """Add one `--flag` per field of dataclass `cls` (except those in `exclude`), with env-var defaults."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        typ = hints[f.name]
        env = _env_name(f.name)
        default: Any = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        flag = "--" + f.name.replace("_", "-")
        helptext = f.metadata.get("help", "") + f" [env {env}; default {default!r}]"
        if typ is bool:
            if env in os.environ:
                default = _parse_bool(os.environ[env])
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=default, help=helptext)
            continue
        conv = typ if typ in (int, float, str) else str
        if env in os.environ:
            default = conv(os.environ[env])
        parser.add_argument(flag, dest=f.name, type=conv, default=default, help=helptext)


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Build dataclass `cls` from the parsed namespace (fields absent from it keep defaults)."""
    kwargs = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**kwargs)


def config_to_args(config: Any, exclude: tuple[str, ...] = ()) -> list[str]:
    """The `--flag value` list (`--flag` / `--no-flag` for booleans) that reproduces `config` through
    add_config_args, for every field except those in `exclude`."""
    out: list[str] = []
    for f in dataclasses.fields(config):
        if f.name in exclude:
            continue
        flag, value = f.name.replace("_", "-"), getattr(config, f.name)
        out += [f"--{flag}" if value else f"--no-{flag}"] if isinstance(value, bool) else [f"--{flag}", str(value)]
    return out
