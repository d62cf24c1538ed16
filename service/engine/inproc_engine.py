"""The fast configuration: `vllm.LLM` with multiprocessing off (engine in this process).

AsyncLLM always runs its engine core in another process, so the in-process configuration uses
the synchronous engine; the side channel's records are drained after each batch.
"""

from __future__ import annotations

import time
from typing import Any

from alignlens.probe.record import Detail
from alignlens.service.engine.async_engine import NewToken, vllm_prompt
from alignlens.service.engine.channel import SyncCaptureSink
from alignlens.service.engine.config import EngineConfig, engine_args, prepare_environment
from alignlens.service.engine.wire import CaptureOptions, Intervention


class InprocCaptureEngine:
    """`vllm.LLM` in this process with the capture plugin and a blocking side-channel sink."""

    def __init__(self, config: EngineConfig, probe_path: str | None = None):
        from alignlens.service.modelstore import resolve_model

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

    def generate(self, prompt_ids: list[list[int]], params_list: list, *, detail: Detail = Detail.NONE,
                 resid: bool = False, interventions: list[tuple[Intervention, ...]] | None = None,
                 ) -> list[tuple[Any, list[NewToken]]]:
        """Generate all prompts, captured; per prompt (RequestOutput, NewToken per output token).
        `interventions[i]`: prompt i's interventions (none by default)."""
        rids = [f"inproc-{i}-{time.monotonic_ns()}" for i in range(len(prompt_ids))]
        prompts = []
        for i, (rid, params) in enumerate(zip(rids, params_list)):
            options = CaptureOptions(rid=rid, detail=detail, resid=resid,
                                     interventions=tuple(interventions[i]) if interventions else ())
            params.extra_args = {**(params.extra_args or {}), **options.extra_args()}
            prompts.append(vllm_prompt(prompt_ids[i], options))
        outs = self.llm.generate(prompts, params_list, use_tqdm=False)
        expected = sum(len(o.outputs[0].token_ids) for o in outs)
        by_rid: dict[str, dict[int, NewToken]] = {rid: {} for rid in rids}
        for message, rec in self.sink.drain(expected):
            by_rid[rec.rid][rec.index] = NewToken(rec.index, rec.token, rec, message)
        return [(o, [by_rid[rid][i] for i in range(len(o.outputs[0].token_ids))]) for o, rid in zip(outs, rids)]

    def stats(self) -> dict:
        return self.llm.collective_rpc("alignlens_stats")[0]

    def shutdown(self) -> None:
        if self.sink is not None:
            self.sink.shutdown()
        del self.llm
