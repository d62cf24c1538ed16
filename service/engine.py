"""Hosting vLLM's AsyncLLM with the alignlens capture plugin and side channel.

Layering (as in vLLM): server/trace -> `CaptureEngine` -> AsyncLLM -> engine core ->
worker (+ AlignlensWorkerExtension) -> model runner -> capture-enabled model.

`CaptureEngine` owns the AsyncLLM, the CaptureSink that receives per-step records, and
the per-request bookkeeping that joins records to the token stream. A request is opened
in the sink before it is submitted and closed when it finishes, fails or is cancelled,
so no capture buffer outlives its request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.channel import GEN, REPLAY, CaptureSink
from service.vllm_plugin.capture import OPTIONS_KEY
from service.vllm_plugin.plugin import PLUGIN_NAME

log = logging.getLogger(__name__)

WORKER_EXTENSION = "service.vllm_plugin.worker.AlignlensWorkerExtension"
RECORD_TIMEOUT_S = 30.0  # a replay's records must all arrive this long after the engine finished it


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


def prepare_environment(config: EngineConfig) -> None:
    """Environment vLLM reads at start-up (must be set before the engine spawns)."""
    from service.modelstore import alignlens_home

    runtime = Path(os.environ.get("ALIGNLENS_RUNTIME_DIR") or alignlens_home() / "runtime")
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


def capture_options(rid: str, *, detail: int = 0, resid: bool = False,
                    replay_from: int | None = None) -> dict:
    """The `extra_args` entry that turns capture on for one request."""
    opts: dict[str, Any] = {"rid": rid, "detail": detail, "resid": resid}
    if replay_from is not None:
        opts["replay_from"] = replay_from
    return {OPTIONS_KEY: opts}


class CaptureEngine:
    """AsyncLLM + capture side channel. Create with `await CaptureEngine.start(config)`."""

    def __init__(self, config: EngineConfig, llm, sink: CaptureSink | None, model_path: Path):
        self.config = config
        self.llm = llm
        self.sink = sink
        self.model_path = model_path
        self.attach_info: dict = {}

    @classmethod
    async def start(cls, config: EngineConfig, probe_path: str | None = None,
                    on_step: Callable[[dict], None] | None = None) -> "CaptureEngine":
        from service.modelstore import resolve_model

        model_path = resolve_model(config.model)
        prepare_environment(config)
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        t0 = time.perf_counter()
        args = AsyncEngineArgs(**engine_args(config, model_path), disable_log_stats=True)
        # In a thread: construction takes 30-60 s (process spawn, load, compile) and the caller's
        # event loop must keep answering meanwhile (the server's health checks, signals).
        llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        sink = None
        engine = cls(config, llm, None, model_path)
        if config.capture:
            sink = CaptureSink(on_step=on_step)
            sink.start()
            engine.sink = sink
            try:
                info = await llm.collective_rpc(
                    "alignlens_attach", args=(sink.address, probe_path, str(model_path)))
            except BaseException:  # e.g. the probe does not load: do not orphan the engine processes
                engine.shutdown()
                raise
            engine.attach_info = info[0]
        engine.start_seconds = time.perf_counter() - t0
        log.info("engine ready in %.1f s (%s)", engine.start_seconds, engine.attach_info or "stock vLLM")
        return engine

    async def stats(self) -> dict:
        """Worker capture state plus server-side buffers (for tests and metrics)."""
        worker = (await self.llm.collective_rpc("alignlens_stats"))[0] if self.sink else {}
        sink = {"open_requests": self.sink.open_requests, "buffered_records": self.sink.buffered_records,
                "dropped_records": self.sink.dropped_records} if self.sink else {}
        return {"worker": worker, "server": sink}

    async def generate_captured(self, rid: str, prompt_token_ids: list[int], params, *,
                                detail: int = 0, resid: bool = False) -> AsyncIterator[tuple[Any, list]]:
        """Stream (RequestOutput, [(message, record) per new token]) for one request.

        The records are joined in output order; the request's sink entry is closed on
        exit, including cancellation (the engine request is aborted first).
        """
        params.extra_args = {**(params.extra_args or {}), **capture_options(rid, detail=detail, resid=resid)}
        self.sink.open(rid)
        emitted = 0
        finished = False
        try:
            async for out in self.llm.generate({"prompt_token_ids": prompt_token_ids}, params, rid):
                n = len(out.outputs[0].token_ids)
                joined = [await self.sink.take(rid, GEN, i) for i in range(emitted, n)]
                emitted = n
                finished = out.finished
                yield out, joined
        finally:
            if not finished:
                await self.llm.abort(rid)
            self.sink.close(rid)

    async def replay_captured(self, rid: str, prompt_ids: list[int], completion_ids: list[int], *,
                              detail: int = 0, resid: bool = False,
                              convert: Callable[[tuple[dict, dict]], Any] | None = None) -> list:
        """Teacher-forced pass over prompt+completion; one record per completion token, in order.

        Records are taken (and passed through `convert`, e.g. into response messages) as they
        arrive, while the engine still computes later prefill chunks; after the engine finishes,
        the remaining records must arrive within RECORD_TIMEOUT_S.
        """
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, skip_reading_prefix_cache=True,
                                extra_args=capture_options(rid, detail=detail, resid=resid,
                                                           replay_from=len(prompt_ids)))
        convert = convert or (lambda pair: pair)

        async def collect() -> list:
            return [convert(await self.sink.take(rid, REPLAY, j, timeout_s=None)) for j in range(len(completion_ids))]

        self.sink.open(rid)
        collector = asyncio.ensure_future(collect())
        finished = False
        try:
            async for out in self.llm.generate({"prompt_token_ids": prompt_ids + completion_ids}, params, rid):
                finished = out.finished
            try:
                return await asyncio.wait_for(asyncio.shield(collector), RECORD_TIMEOUT_S)
            except asyncio.TimeoutError:
                raise TimeoutError(f"capture records of replay {rid!r} missing {RECORD_TIMEOUT_S:.0f} s after "
                                   "the engine finished") from None
        finally:
            collector.cancel()
            if not finished:
                await self.llm.abort(rid)
            self.sink.close(rid)

    def shutdown(self) -> None:
        self.llm.shutdown()
        # AsyncLLM.__del__ shuts down a second time; when the last reference goes at interpreter
        # exit (module globals already None) that prints a TypeError. It is shut down: mute it.
        self.llm.__class__ = type("ShutDownAsyncLLM", (type(self.llm),), {"__del__": lambda _self: None})
        self.llm = None
        if self.sink is not None:
            self.sink.shutdown()


def engine_args(config: EngineConfig, model_path: Path) -> dict:
    """Keyword arguments shared by AsyncEngineArgs and the in-process `vllm.LLM`."""
    return dict(
        model=str(model_path), dtype=config.dtype, max_model_len=config.max_model_len,
        max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
        enable_chunked_prefill=True, enforce_eager=config.enforce_eager, seed=config.seed,
        worker_extension_cls=WORKER_EXTENSION if config.capture else "",
    )


class InprocCaptureEngine:
    """The fast configuration: `vllm.LLM` with multiprocessing off (engine in this process).

    AsyncLLM always runs its engine core in another process, so the in-process
    configuration uses the synchronous engine; records are drained after each batch.
    """

    def __init__(self, config: EngineConfig, probe_path: str | None = None):
        from service.channel import SyncCaptureSink
        from service.modelstore import resolve_model

        config.multiprocessing = False
        self.config = config
        self.model_path = resolve_model(config.model)
        prepare_environment(config)
        from vllm import LLM

        t0 = time.perf_counter()
        self.llm = LLM(**engine_args(config, self.model_path), disable_log_stats=True)
        self.sink = SyncCaptureSink() if config.capture else None
        self.attach_info = {}
        if self.sink is not None:
            self.attach_info = self.llm.collective_rpc(
                "alignlens_attach", args=(self.sink.address, probe_path, str(self.model_path)))[0]
        self.start_seconds = time.perf_counter() - t0

    def generate_captured(self, prompt_ids: list[list[int]], params_list: list, *, detail: int = 0,
                          resid: bool = False) -> list[tuple[Any, list[tuple[dict, dict]]]]:
        """Generate all prompts; per prompt (RequestOutput, records in output order)."""
        rids = [f"inproc-{i}-{time.monotonic_ns()}" for i in range(len(prompt_ids))]
        for rid, params in zip(rids, params_list):
            params.extra_args = {**(params.extra_args or {}), **capture_options(rid, detail=detail, resid=resid)}
        outs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params_list, use_tqdm=False)
        expected = sum(len(o.outputs[0].token_ids) for o in outs)
        by_rid: dict[str, dict[int, tuple[dict, dict]]] = {rid: {} for rid in rids}
        for message, rec in self.sink.drain(expected):
            by_rid[rec["rid"]][rec["index"]] = (message, rec)
        return [(o, [by_rid[rid][i] for i in range(len(o.outputs[0].token_ids))]) for o, rid in zip(outs, rids)]

    def stats(self) -> dict:
        return self.llm.collective_rpc("alignlens_stats")[0]

    def shutdown(self) -> None:
        if self.sink is not None:
            self.sink.shutdown()
        del self.llm


def run_async(coro):
    """asyncio.run with the spawn-safe loop policy vLLM expects."""
    return asyncio.run(coro)
