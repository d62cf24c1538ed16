"""How vLLM is started for alignlens: the engine's settings and the environment it reads.

`EngineConfig` is the one definition of the engine's settings: its fields are the `--flags` of
`alignlens serve` / `trace` and their `ALIGNLENS_*` variables (alignlens.service.cli.configs).
The plugin and the worker extension are named here by string, so the server process never
imports worker code: vLLM loads them in its own processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from alignlens.probe.paths import alignlens_home

PLUGIN_NAME = "alignlens_capture"  # entry-point name (pyproject.toml); VLLM_PLUGINS selects plugins by it
WORKER_EXTENSION = "alignlens.service.vllm_plugin.worker.AlignlensWorkerExtension"


@dataclass
class EngineConfig:
    """How vLLM is started. Field names double as `--flags` / ALIGNLENS_* variables."""

    model: str = field(default="default", metadata={"help": "model: 'default' or a local transformers checkpoint dir"})
    dtype: str = field(default="float32", metadata={"help": "model dtype (float32 is fastest on AVX2 CPUs)"})
    max_model_len: int = field(default=2048, metadata={"help": "context length (prompt + generated tokens)"})
    max_num_seqs: int = field(default=32, metadata={"help": "most requests the engine batches in one step"})
    # 256, not vLLM's larger defaults: a long prefill (an Audit replay) then runs in chunks, and the
    # worker's background emitter attributes chunk c while the engine computes chunk c+1; it also
    # bounds how long one prefill step stalls the other streams' decoding (~1 s on 2 CPU cores).
    # Measured, 520-token Audit replay on SmolLM2-135M, engine direct: 3.3-3.4 s at 2048, 2.6 s at
    # 256, 2.6-2.7 s at 128 (prefill alone: 1.99 / 1.95 / 2.16 s). docs/benchmarks/attribution-cost.md.
    max_num_batched_tokens: int = field(default=256, metadata={"help": "token budget of one engine step (prefills are chunked to fit)"})
    kv_cache_gib: int = field(default=2, metadata={"help": "CPU KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE)"})
    enforce_eager: bool = field(default=False, metadata={"help": "skip torch.compile (faster start, slower steps)"})
    multiprocessing: bool = field(default=True, metadata={"help": "run the engine core in its own process (vLLM default)"})
    capture: bool = field(default=True, metadata={"help": "load the alignlens capture plugin (off = stock vLLM)"})
    seed: int = field(default=0, metadata={"help": "engine seed"})


def runtime_dir() -> Path:
    """Where IPC sockets go: ALIGNLENS_RUNTIME_DIR, else <alignlens home>/runtime (a server claims a
    private folder under it, engine/runtime.py)."""
    return Path(os.environ.get("ALIGNLENS_RUNTIME_DIR") or alignlens_home() / "runtime")


def prepare_environment(config: EngineConfig) -> None:
    """Environment vLLM reads at start-up (must be set before the engine spawns)."""
    runtime = runtime_dir()
    runtime.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("ALIGNLENS_RUNTIME_DIR", str(runtime))
    os.environ.setdefault("VLLM_CACHE_ROOT", str(alignlens_home() / "vllm-cache"))
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(alignlens_home() / "inductor-cache"))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.kv_cache_gib))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if config.multiprocessing else "0"
    if not config.multiprocessing:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    plugins = [p for p in os.environ.get("VLLM_PLUGINS", "").split(",") if p and p != PLUGIN_NAME]
    if config.capture:
        plugins.append(PLUGIN_NAME)
    # VLLM_PLUGINS unset loads every plugin; set it explicitly so stock mode is really stock.
    os.environ["VLLM_PLUGINS"] = ",".join(plugins) if plugins else "none"


def engine_args(config: EngineConfig, model_path: Path) -> dict:
    """Keyword arguments shared by AsyncEngineArgs and the in-process `vllm.LLM`."""
    return dict(
        model=str(model_path), dtype=config.dtype, max_model_len=config.max_model_len,
        max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
        enable_chunked_prefill=True, enforce_eager=config.enforce_eager, seed=config.seed,
        worker_extension_cls=WORKER_EXTENSION if config.capture else "",
    )


