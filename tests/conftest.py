"""Shared fixtures: tiny random hosts built once per session, and the real default model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.tiny import build_tiny_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    """Build (once) a tiny checkpoint of a Llama-shaped family: tiny_family("qwen3") -> Path."""
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            built[arch] = build_tiny_model(tmp_path_factory.mktemp(f"tiny-{arch}"), arch, layers=3, hidden=128)
        return built[arch]

    return get


@pytest.fixture(scope="session")
def default_model() -> Path:
    """The real SmolLM2-135M-Instruct checkpoint (fetched once by `alignlens model fetch`)."""
    from alignlens.service.modelstore import fetch_default_model

    return fetch_default_model(progress=False)


@pytest.fixture(scope="session", autouse=True)
def _runtime_dirs(tmp_path_factory):
    # Keep vLLM caches and IPC sockets out of the home directory and /tmp.
    os.environ.setdefault("ALIGNLENS_RUNTIME_DIR", str(tmp_path_factory.mktemp("runtime")))
