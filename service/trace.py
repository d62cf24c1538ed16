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
import json
import logging
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from service.channel import record_tensors
from service.engine import CaptureEngine, EngineConfig, InprocCaptureEngine

log = logging.getLogger(__name__)


def encode_prompts(tokenizer, prompts: list, chat: bool = False) -> list[list[int]]:
    """Text (or chat message lists when `chat`) -> prompt token ids. Token-id lists pass through."""
    out = []
    for p in prompts:
        if isinstance(p, list) and all(isinstance(t, int) for t in p):
            out.append(list(p))
        elif chat:
            messages = p if isinstance(p, list) else [{"role": "user", "content": p}]
            out.append(list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                          return_dict=False)))
        else:
            out.append(tokenizer(p, add_special_tokens=True)["input_ids"])
    return out


def trace_tensors(prompt_ids: list[int], joined: list[tuple[dict, dict]]) -> dict[str, torch.Tensor]:
    """One prompt's four trace tensors from its records in output order."""
    pairs = [record_tensors(message, rec) for message, rec in joined]
    return {"prompt_token_ids": torch.tensor(prompt_ids, dtype=torch.int64),
            "token_ids": torch.tensor([rec["token"] for _m, rec in joined], dtype=torch.int64),
            "resid": torch.stack([p[0] for p in pairs]), "resid_mid": torch.stack([p[1] for p in pairs])}


async def trace_with_engine(engine: CaptureEngine, prompt_ids: list[list[int]], max_tokens: int,
                            temperature: float = 0.0, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Run all prompts concurrently; return per prompt its four tensors."""
    from vllm import SamplingParams

    async def one(i: int, ids: list[int]) -> dict[str, torch.Tensor]:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + i)
        joined_all: list[tuple[dict, dict]] = []
        async for _out, joined in engine.generate_captured(f"trace-{i}-{time.monotonic_ns()}", ids, params,
                                                           resid=True):
            joined_all += joined
        return trace_tensors(ids, joined_all)

    return list(await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompt_ids))))


def save_trace(results: list[dict[str, torch.Tensor]], out: Path, metadata: dict) -> None:
    tensors = {f"{i}.{name}": t.contiguous() for i, r in enumerate(results) for name, t in r.items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=meta)


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
        save_trace(results, out, {
            "format": "alignlens-trace-v1", "model": str(engine.model_path), "dtype": config.dtype,
            "vllm_version": vllm.__version__, "prompts": len(ids), "max_tokens": max_tokens,
            "temperature": temperature, "seed": seed, "chat": chat,
            "multiprocessing": config.multiprocessing, "enforce_eager": config.enforce_eager,
        })
        return out

    if not config.multiprocessing:
        engine = InprocCaptureEngine(config)
        try:
            ids = encode_prompts(AutoTokenizer.from_pretrained(str(engine.model_path)), prompts, chat=chat)
            t0 = time.perf_counter()
            results = trace_inproc(engine, ids, max_tokens, temperature, seed)
            return write(engine, ids, results, time.perf_counter() - t0)
        finally:
            engine.shutdown()

    async def main() -> Path:
        engine = await CaptureEngine.start(config)
        try:
            ids = encode_prompts(AutoTokenizer.from_pretrained(str(engine.model_path)), prompts, chat=chat)
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
    return [trace_tensors(ids, joined)
            for ids, (_out, joined) in zip(prompt_ids, engine.generate_captured(prompt_ids, params, resid=True))]
