"""Exact causal attribution by the engine: `family_drop` (METHOD.md 6.2, issue "interventions").

For completion token t of an audited sequence (prompt P tokens + completion), its decision position
is p = P + t - 1. For every (block, family) the engine runs the sequence up to p with that family's
top-k directions ablated at position p only (an Intervention with scale 0 on [p, p+1)), plus once
without, and reads log p(y_t) from each (max_tokens 1, `allowed_token_ids` [y_t]: vLLM reports the
raw log-probability, before that mask). family_drop[l][f] = log p(y_t | clean) - log p(y_t | ablated),
exactly probe.ablation's drop.

Cost and the prefix cache. The ablation touches position p only, so the KV of positions < p is the
clean one and is shared: the clean request runs first and leaves the full blocks before p in the
prefix cache, then the 3L variants (or the `pairs` chosen for the token: probe-guided refinement,
probe/refine.py) run together and each recomputes only the block holding p. A
variant's intervened KV must never be served to anyone else: vLLM caches full blocks only, so when
p ends a block ((p + 1) % block_size == 0) the token's whole group runs under a cache salt of its
own (it then shares its prefix only within the group). Interventions of the Audit itself apply to
every request of the group, so the drops describe the intervened forward.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence

from alignlens.service.engine.async_engine import intervention_salt
from alignlens.service.engine.wire import CaptureOptions, Intervention


async def family_drops(engine, rid: str, prompt_ids: list[int], completion_ids: list[int], indices: Sequence[int],
                       n_blocks: int, base: tuple[Intervention, ...] = (),
                       gate: Callable[[], Awaitable[None]] | None = None,
                       concurrency: int | None = None,
                       pairs: Mapping[int, Sequence[int]] | None = None) -> dict[int, list[list[float]]]:
    """{completion index: [L][3] drops in nats} for `indices`, computed on `engine` (a CaptureEngine).

    `gate`, when given, is awaited before each request is submitted (the background verifier waits
    there for an idle engine); `concurrency` bounds the requests in flight (default: all 3L at once).
    `pairs`: per completion index, the pair indices 3 * (block - 1) + family to ablate (probe-guided
    refinement, probe/refine.py); the others are NaN. A token absent from it gets all 3L.
    """
    limit = asyncio.Semaphore(concurrency or 3 * n_blocks + 1)

    async def logprob(*args) -> float:
        async with limit:
            if gate is not None:
                await gate()
            return await _logprob(engine, *args)

    block_size = engine.llm.vllm_config.cache_config.block_size
    out: dict[int, list[list[float]]] = {}
    for t in indices:  # one token's group at a time: its clean request fills the cache its variants read
        p = len(prompt_ids) + t - 1
        seq, y = prompt_ids + completion_ids[:t], completion_ids[t]
        # the block holding p is cached only when p ends it: then the group keeps to itself
        salt = f"alignlens-causal-{rid}-{t}" if (p + 1) % block_size == 0 else intervention_salt(base)
        clean = await logprob(f"{rid}-c{t}", seq, y, base, salt)
        chosen = sorted(set(pairs[t])) if pairs is not None and t in pairs else range(3 * n_blocks)
        if not all(0 <= j < 3 * n_blocks for j in chosen):
            raise ValueError(f"pairs[{t}] = {list(chosen)}: pair indices are 0..{3 * n_blocks - 1}")
        ablated = await asyncio.gather(*(
            logprob(f"{rid}-c{t}-{j}", seq, y,
                    base + (Intervention(block=j // 3 + 1, family=j % 3, scale=0.0, start=p, end=p + 1),), salt)
            for j in chosen))
        drop = dict(zip(chosen, ablated))
        out[t] = [[clean - drop[3 * i + f] if 3 * i + f in drop else math.nan for f in range(3)]
                  for i in range(n_blocks)]
    return out


async def _logprob(engine, rid: str, seq: list[int], y: int, interventions: tuple[Intervention, ...],
                   salt: str) -> float:
    """log p(y | seq) under `interventions` (the raw log-probability over the full vocabulary)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, allowed_token_ids=[y], logprobs=0)
    options = CaptureOptions(rid=rid, rows=False, interventions=interventions) if interventions else None
    final = None
    async for out, _new in engine.generate(rid, seq, params, options, cache_salt=salt):
        final = out
    completion = final.outputs[0]
    return completion.logprobs[0][y].logprob
