"""Hosting vLLM's AsyncLLM with the alignlens capture plugin and side channel.

Layering (as in vLLM): server/trace -> `CaptureEngine` -> AsyncLLM -> engine core ->
worker (+ AlignlensWorkerExtension) -> model runner -> capture-enabled model.

`CaptureEngine` owns the AsyncLLM, the CaptureSink that receives per-step records, and
the per-request bookkeeping that joins records to the token stream. A captured request is
opened in the sink before it is submitted and closed when it finishes, fails or is cancelled,
so no capture buffer outlives its request. A request without capture options (the server sends
none at detail NONE) never touches the sink: it is an AsyncLLM request exactly as stock vLLM serves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from alignlens.service.engine.channel import CaptureSink
from alignlens.service.engine.config import EngineConfig, engine_args, prepare_environment
from alignlens.service.engine.wire import CaptureOptions, Kind, StepMessage, TokenRecord

log = logging.getLogger(__name__)

RECORD_TIMEOUT_S = 30.0  # a replay's records must all arrive this long after the engine finished it


@dataclass
class NewToken:
    """One token of a request's output with what the worker sent for it (None when not captured)."""

    index: int  # output index (generation) or completion index (replay)
    token_id: int
    record: TokenRecord | None = None
    message: StepMessage | None = None  # the record's step message (dtype and shapes of bulk rows)

    @property
    def attr(self):
        """The record's TokenAttribution, or None."""
        return self.record.attr if self.record is not None else None


class CaptureEngine:
    """AsyncLLM + capture side channel. Create with `await CaptureEngine.start(config)`."""

    def __init__(self, config: EngineConfig, llm, sink: CaptureSink | None, model_path: Path):
        self.config = config
        self.llm = llm
        self.sink = sink
        self.model_path = model_path
        self.attach_info: dict = {}
        self.start_seconds = 0.0

    @classmethod
    async def start(cls, config: EngineConfig, probe_path: str | None = None,
                    on_step: Callable[[StepMessage], None] | None = None) -> "CaptureEngine":
        from alignlens.service.modelstore import resolve_model

        model_path = resolve_model(config.model)
        prepare_environment(config)
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        t0 = time.perf_counter()
        args = AsyncEngineArgs(**engine_args(config, model_path), disable_log_stats=True)
        # In a thread: construction takes 30-60 s (process spawn, load, compile) and the caller's
        # event loop must keep answering meanwhile (the server's health checks, signals).
        llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        engine = cls(config, llm, None, model_path)
        if config.capture:
            engine.sink = CaptureSink(on_step=on_step)
            engine.sink.start()
            try:
                info = await llm.collective_rpc(
                    "alignlens_attach", args=(engine.sink.address, probe_path, str(model_path)))
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

    def _captured(self, rid: str, options: CaptureOptions | None) -> CaptureOptions | None:
        """The options to send, carrying the engine request id the records are routed by (None: the
        request is served without capture, as stock vLLM)."""
        if options is None:
            return None
        if self.sink is None:
            raise RuntimeError("capture requested from an engine started without the capture plugin")
        return msgspec.structs.replace(options, rid=rid)

    async def generate(self, rid: str, prompt_token_ids: list[int], params, options: CaptureOptions | None = None,
                       cache_salt: str | None = None) -> AsyncIterator[tuple[Any, list[NewToken]]]:
        """Stream (RequestOutput, [NewToken per new token]) for one request.

        With capture, each new token carries its worker record, joined in output order; the
        request's sink entry is closed on exit, including cancellation (the engine request is
        aborted first).
        """
        options = self._captured(rid, options)
        records = options is not None and options.rows
        if options is not None:
            params.extra_args = {**(params.extra_args or {}), **options.extra_args()}
        if records:
            self.sink.open(rid)
        emitted = 0
        try:
            async with _aborting(self.llm, rid) as state:
                async for out in self.llm.generate(vllm_prompt(prompt_token_ids, options, cache_salt), params, rid):
                    ids = out.outputs[0].token_ids
                    n = len(ids)  # now: vLLM may append to this list while we wait for records below
                    if not records:
                        new = [NewToken(i, ids[i]) for i in range(emitted, n)]
                    else:
                        new = []
                        for i in range(emitted, n):
                            message, record = await self.sink.take(rid, Kind.GEN, i)
                            new.append(NewToken(i, record.token, record, message))
                    emitted = n
                    state.finished = out.finished
                    yield out, new
        finally:
            if records:
                self.sink.close(rid)

    async def replay(self, rid: str, prompt_ids: list[int], completion_ids: list[int],
                     options: CaptureOptions | None = None,
                     convert: Callable[[NewToken], Any] | None = None) -> list:
        """Teacher-forced pass over prompt+completion; one NewToken (through `convert`, e.g. into a
        response message) per completion token, in order (see `replay_stream`)."""
        convert = convert or (lambda token: token)
        async with contextlib.aclosing(self.replay_stream(rid, prompt_ids, completion_ids, options)) as stream:
            return [convert(token) async for token in stream]

    async def replay_stream(self, rid: str, prompt_ids: list[int], completion_ids: list[int],
                            options: CaptureOptions | None = None) -> AsyncIterator[NewToken]:
        """Teacher-forced pass over prompt+completion, yielding one NewToken per completion token,
        in order, as soon as its record arrives (use inside `contextlib.aclosing`).

        With capture, records arrive while the engine still computes later prefill chunks; an
        engine error ends the stream at once, and after the engine finishes the remaining records
        must arrive within RECORD_TIMEOUT_S. Without, it is one stock prefill (prefix cache allowed).
        """
        from vllm import SamplingParams

        options = self._captured(rid, options)
        if options is None or not options.rows:
            params = SamplingParams(max_tokens=1, temperature=0.0,
                                    extra_args=options.extra_args() if options is not None else None)
            async with _aborting(self.llm, rid) as state:
                async for out in self.llm.generate(vllm_prompt(prompt_ids + completion_ids, options), params, rid):
                    state.finished = out.finished
            for j, t in enumerate(completion_ids):
                yield NewToken(j, t)
            return

        # Every row must be computed to be captured: no reading of the prefix cache.
        options = msgspec.structs.replace(options, replay_from=len(prompt_ids))
        params = SamplingParams(max_tokens=1, temperature=0.0, skip_reading_prefix_cache=True,
                                extra_args=options.extra_args())

        async def run_engine() -> None:
            async with _aborting(self.llm, rid) as state:
                async for out in self.llm.generate(vllm_prompt(prompt_ids + completion_ids, options), params, rid):
                    state.finished = out.finished

        self.sink.open(rid)
        engine_run = asyncio.ensure_future(run_engine())
        take = None
        deadline = None  # set once the engine has finished: the records' last chance
        try:
            for j in range(len(completion_ids)):
                take = asyncio.ensure_future(self.sink.take(rid, Kind.REPLAY, j, timeout_s=None))
                while not take.done():
                    if engine_run.done():
                        engine_run.result()  # an engine error ends the stream here
                        deadline = deadline or time.monotonic() + RECORD_TIMEOUT_S
                        try:
                            await asyncio.wait_for(asyncio.shield(take), max(0.0, deadline - time.monotonic()))
                        except asyncio.TimeoutError:
                            raise TimeoutError(f"capture records of replay {rid!r} missing {RECORD_TIMEOUT_S:.0f} s "
                                               "after the engine finished") from None
                    else:
                        await asyncio.wait({take, engine_run}, return_when=asyncio.FIRST_COMPLETED)
                message, record = take.result()  # an error record raises here
                yield NewToken(j, record.token, record, message)
            await engine_run
        finally:
            if take is not None:
                take.cancel()
            if not engine_run.done():
                engine_run.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await engine_run  # its abort of the engine request runs to completion
            self.sink.close(rid)

    def shutdown(self) -> None:
        self.llm.shutdown()
        # AsyncLLM.__del__ shuts down a second time; when the last reference goes at interpreter
        # exit (module globals already None) that prints a TypeError. It is shut down: mute it.
        self.llm.__class__ = type("ShutDownAsyncLLM", (type(self.llm),), {"__del__": lambda _self: None})
        self.llm = None
        if self.sink is not None:
            self.sink.shutdown()


def intervention_salt(interventions) -> str:
    """The prefix-cache salt of requests with these interventions ("" for none: no salt)."""
    if not interventions:
        return ""
    return "alignlens-iv-" + hashlib.sha256(msgspec.msgpack.encode(tuple(interventions))).hexdigest()[:32]


def vllm_prompt(token_ids: list[int], options: CaptureOptions | None, cache_salt: str | None = None) -> dict:
    """vLLM's prompt dict. A request with interventions gets a prefix-cache salt naming them: its KV
    blocks are neither read by requests without the same interventions nor served to them. A caller
    that knows better (engine/causal.py: an intervention at the last position only) passes its own
    `cache_salt` ("" for none)."""
    prompt: dict[str, Any] = {"prompt_token_ids": token_ids}
    salt = intervention_salt(options.interventions if options is not None else ()) if cache_salt is None \
        else cache_salt
    if salt:
        prompt["cache_salt"] = salt
    return prompt


class _Finished:
    finished = False


class _aborting:
    """`async with _aborting(llm, rid) as state:` aborts the engine request on exit unless
    `state.finished` was set (the request ran to its end)."""

    def __init__(self, llm, rid: str):
        self.llm, self.rid, self.state = llm, rid, _Finished()

    async def __aenter__(self) -> _Finished:
        return self.state

    async def __aexit__(self, *exc) -> None:
        if not self.state.finished:
            await self.llm.abort(self.rid)
