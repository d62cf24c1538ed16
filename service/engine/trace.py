"""`alignlens trace`: vLLM-speed activation dumping.

Generates with the capture engine and writes, per prompt i, the safetensors tensors
    i.prompt_token_ids [P]            int64
    i.token_ids        [T]            int64, emitted tokens
    i.resid            [T, L+1, d]    model dtype; row t decides token t (h_0..h_L)
    i.resid_mid        [T, L, d]      model dtype; m_1..m_L
with metadata {model, dtype, vllm_version, prompts, max_tokens, temperature, ...}.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import torch

from alignlens.probe.data import write_trace
from alignlens.probe.names import RESID, RESID_MID
from alignlens.probe.prompts import encode_prompt
from alignlens.service.engine.async_engine import CaptureEngine, NewToken
from alignlens.service.engine.config import EngineConfig
from alignlens.service.engine.inproc_engine import InprocCaptureEngine
from alignlens.service.engine.wire import CaptureOptions

log = logging.getLogger(__name__)


def trace_tensors(prompt_ids: list[int], tokens: list[NewToken]) -> dict[str, torch.Tensor]:
    """One prompt's four trace tensors from its captured tokens in output order."""
    rows = [t.message.tensors(t.record) for t in tokens]
    return {"prompt_token_ids": torch.tensor(prompt_ids, dtype=torch.int64),
            "token_ids": torch.tensor([t.token_id for t in tokens], dtype=torch.int64),
            RESID: torch.stack([torch.from_numpy(r[RESID]) for r in rows]),
            RESID_MID: torch.stack([torch.from_numpy(r[RESID_MID]) for r in rows])}


async def trace_with_engine(engine: CaptureEngine, prompt_ids: list[list[int]], max_tokens: int,
                            temperature: float = 0.0, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Run all prompts concurrently; return per prompt its four tensors."""
    from vllm import SamplingParams

    async def one(i: int, ids: list[int]) -> dict[str, torch.Tensor]:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + i)
        rid = f"trace-{i}-{time.monotonic_ns()}"
        tokens: list[NewToken] = []
        async for _out, new in engine.generate(rid, ids, params, CaptureOptions(rid=rid, resid=True)):
            tokens += new
        return trace_tensors(ids, tokens)

    return list(await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompt_ids))))


def trace_to_file(model: str, prompts: list, max_tokens: int, temperature: float, out_path: str | Path,
                  chat: bool = False, seed: int = 0, config: EngineConfig | None = None) -> Path:
    """Start an engine, trace `prompts`, write `out_path`, shut the engine down."""
    import vllm
    from transformers import AutoTokenizer

    config = config or EngineConfig(model=model)
    config.model = model
    out = Path(out_path)

    def write(engine, ids: list[list[int]], results: list[dict[str, torch.Tensor]], seconds: float) -> Path:
        n_tok = sum(len(r["token_ids"]) for r in results)
        log.info("traced %d prompts, %d tokens in %.2f s (%.1f tokens/s)", len(ids), n_tok, seconds,
                 n_tok / max(seconds, 1e-9))
        write_trace(results, out, {
            "format": "alignlens-trace-v1", "model": str(engine.model_path), "dtype": config.dtype,
            "vllm_version": vllm.__version__, "prompts": len(ids), "max_tokens": max_tokens,
            "temperature": temperature, "seed": seed, "chat": chat,
            "multiprocessing": config.multiprocessing, "enforce_eager": config.enforce_eager,
        })
        return out

    if not config.multiprocessing:
        engine = InprocCaptureEngine(config)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(engine.model_path))
            ids = [encode_prompt(tokenizer, p, chat=chat) for p in prompts]
            t0 = time.perf_counter()
            results = trace_inproc(engine, ids, max_tokens, temperature, seed)
            return write(engine, ids, results, time.perf_counter() - t0)
        finally:
            engine.shutdown()

    async def main() -> Path:
        engine = await CaptureEngine.start(config)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(engine.model_path))
            ids = [encode_prompt(tokenizer, p, chat=chat) for p in prompts]
            t0 = time.perf_counter()
            results = await trace_with_engine(engine, ids, max_tokens, temperature, seed)
            return write(engine, ids, results, time.perf_counter() - t0)
        finally:
            engine.shutdown()

    return asyncio.run(main())


def trace_inproc(engine: InprocCaptureEngine, prompt_ids: list[list[int]], max_tokens: int,
                 temperature: float = 0.0, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """The in-process (multiprocessing off) equivalent of `trace_with_engine`."""
    from vllm import SamplingParams

    params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + i)
              for i in range(len(prompt_ids))]
    return [trace_tensors(ids, tokens)
            for ids, (_out, tokens) in zip(prompt_ids, engine.generate(prompt_ids, params, resid=True))]
