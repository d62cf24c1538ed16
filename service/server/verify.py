"""Online faithfulness: check a sample of live attributions against exact ablations, in the background.

With `alignlens serve --verify-fraction F`, a deterministic fraction F of the tokens that Generate
streams with an attribution is verified after its request finished: the engine computes the
token's exact family_drop (engine/causal.py, 3L + 1 single-position requests) and the server
observes the Spearman correlation between the served family_attribution and |family_drop| over
the token's 3L (block, family) pairs:
    alignlens_attribution_faithfulness         histogram of that per-token Spearman
    alignlens_attribution_verified_tokens_total
Selection is deterministic (every 1/F-th attributed token, counted across requests), so a rate of
F is met exactly and runs are repeatable.

Verification runs only in the engine's idle time: one token at a time, each of its 3L + 1 engine
requests submitted (IDLE_CONCURRENCY at once) only while no client request is running or waiting.
A first version that ran a token's 91 requests beside live traffic cut 16 concurrent streams on
SmolLM2-135M (2 CPU cores) to 0.26 of their rate at --verify-fraction 0.01: one exact token costs
~730 rows of prefill, about twice the compute of the hundred tokens it samples from. Under
constant load the backlog therefore fills and selected tokens are skipped, counted in
alignlens_attribution_verify_skipped_total (bounded: MAX_BACKLOG_TOKENS).
"""

from __future__ import annotations

import asyncio
import logging
import math

import torch

from alignlens.probe.stats import spearman

log = logging.getLogger(__name__)

MAX_BACKLOG_TOKENS = 64
IDLE_CONCURRENCY = 8  # verification requests in flight while the engine has no client request
IDLE_POLL_S = 0.05


def token_spearman(served: list[list[float]], drop: list[list[float]]) -> float:
    """Spearman over a token's 3L pairs between the served family_attribution [L][3] and |family_drop|
    [L][3] (probe.stats.spearman, as in the offline evaluation); nan when either side is constant."""
    a = torch.tensor([x for row in served for x in row], dtype=torch.float64)
    b = torch.tensor([abs(x) for row in drop for x in row], dtype=torch.float64)
    if bool((a == a[0]).all()) or bool((b == b[0]).all()):
        return float("nan")
    return float(spearman(a[None], b[None])[0])


class Verifier:
    """Selects tokens, queues them, and verifies them one at a time on the engine."""

    def __init__(self, fraction: float, state, n_blocks: int):
        self.fraction = fraction
        self.state = state  # ServerState: engine, admission, metrics
        self.n_blocks = n_blocks
        self._seen = 0  # attributed tokens offered so far
        self._queue: asyncio.Queue = asyncio.Queue()
        self._backlog = 0
        self._task: asyncio.Task | None = None

    def select(self, n_tokens: int) -> list[int]:
        """Which of the next `n_tokens` attributed tokens to verify (every 1/F-th, across requests)."""
        picked = [i for i in range(n_tokens)
                  if math.floor((self._seen + i + 1) * self.fraction) > math.floor((self._seen + i) * self.fraction)]
        self._seen += n_tokens
        return picked

    def offer(self, rid: str, prompt_ids: list[int], completion_ids: list[int],
              served: dict[int, list[list[float]]]) -> None:
        """A finished generation: `served` maps completion index -> its served family_attribution [L][3]."""
        indices = sorted(served)
        picked = [indices[j] for j in self.select(len(indices))]
        for t in picked:
            if self._backlog >= MAX_BACKLOG_TOKENS:
                self.state.metrics.verify_skipped.inc()
                continue
            self._backlog += 1
            self._queue.put_nowait((rid, prompt_ids, completion_ids, t, served[t]))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="attribution-verifier")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _idle(self) -> None:
        """Return once no client request runs or waits (generation and audits go first)."""
        admission = self.state.admission
        while admission.running or admission.waiting:
            await asyncio.sleep(IDLE_POLL_S)

    async def _run(self) -> None:
        from alignlens.service.engine.causal import family_drops

        while True:
            rid, prompt_ids, completion_ids, t, served = await self._queue.get()
            try:
                engine = self.state.engine
                if engine is None or engine.llm.errored:
                    continue
                drops = await family_drops(engine, f"verify-{rid}", prompt_ids, completion_ids, [t], self.n_blocks,
                                           gate=self._idle, concurrency=IDLE_CONCURRENCY)
                rho = token_spearman(served, drops[t])
                if not math.isnan(rho):
                    self.state.metrics.faithfulness.observe(rho)
                self.state.metrics.verified_tokens.inc()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a failed verification must not stop later ones
                log.exception("verifying token %d of %s failed", t, rid)
            finally:
                self._backlog -= 1
