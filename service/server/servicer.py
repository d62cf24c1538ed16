"""The AttributionService handlers: validate, admit, run in the engine, stream back.

Each RPC runs inside `_guard`, which turns any failure into a gRPC status through
service/errors.py (one mapping), counts it in alignlens_requests_total{rpc,code}, and tells
a client cancel or an expired deadline apart. Engine work runs inside an admission slot
(service/admission.py) and inside `aclosing(...)` of CaptureEngine's generator, so however
a request ends its engine request is aborted and its capture buffers are freed.

Per Generate request, the phases:
  1. validate (service/validation.py): tokenize, check every field against the model's limits;
  2. admit: wait for an engine slot (queue time) or be refused when the queue is full;
  3. stream: for each engine output, the new tokens with their text deltas
     (service/detokenize.py), vLLM's logprob, and the worker's attribution record;
  4. finish: one Finished message with finish reason, sizes and timings.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import torch

from alignlens.probe.record import Detail
from alignlens.probe.refine import refined_attribution, select_pairs
from alignlens.service.engine.async_engine import CaptureEngine, NewToken
from alignlens.service.engine.causal import family_drops
from alignlens.service.engine.wire import CaptureOptions, Intervention
from alignlens.service.protos import load
from alignlens.service.server import errors, validation
from alignlens.service.server.admission import Admission
from alignlens.service.server.convert import add_family_drop, attribution_to_proto
from alignlens.service.server.errors import Unavailable
from alignlens.service.server.metrics import ServiceMetrics
from alignlens.service.tokens import TokenText

pb2, pb2_grpc = load()
log = logging.getLogger(__name__)


class ServerState:
    """What the handlers share. `engine` is None until start-up finishes."""

    def __init__(self, limits: validation.ModelLimits, info, metrics: ServiceMetrics, admission: Admission):
        self.limits = limits
        self.info = info  # pb2.ModelInfo
        self.metrics = metrics
        self.admission = admission
        self.engine: CaptureEngine | None = None
        self.draining = False
        self.verifier = None  # server.verify.Verifier with --verify-fraction

    def engine_alive(self) -> bool:
        return self.engine is not None and not self.engine.llm.errored

    def ready_engine(self) -> CaptureEngine:
        """The engine, or Unavailable saying why requests cannot be served now."""
        if self.draining:
            raise Unavailable("the server is shutting down; send the request to another replica")
        if self.engine is None:
            raise Unavailable("the engine is still starting; retry shortly")
        if self.engine.llm.errored:
            raise Unavailable("the inference engine has died; the server must be restarted")
        return self.engine


def _finish_reason(completion) -> tuple[int, str]:
    """vLLM CompletionOutput -> (FinishReason, stop string)."""
    if completion.finish_reason == "length":
        return pb2.FINISH_REASON_LENGTH, ""
    if isinstance(completion.stop_reason, str):
        return pb2.FINISH_REASON_STOP_STRING, completion.stop_reason
    return pb2.FINISH_REASON_EOS, ""  # EOS token, or a stop token id


DEADLINE_GRACE_S = 0.05


class AttributionServicer(pb2_grpc.AttributionServiceServicer):
    """gRPC handlers over a CaptureEngine (service/engine.py)."""

    def __init__(self, state: ServerState):
        self.state = state

    @contextlib.asynccontextmanager
    async def _guard(self, rpc: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        code = grpc.StatusCode.OK
        try:
            yield
        except (asyncio.CancelledError, GeneratorExit):
            # A client whose own deadline fires cancels the call a little before the server's copy
            # of that deadline (counted from when the headers arrived) runs out: within
            # DEADLINE_GRACE_S of it, the cancellation is the deadline.
            remaining = context.time_remaining()
            code = (grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= DEADLINE_GRACE_S
                    else grpc.StatusCode.CANCELLED)
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status, in one place
            code, message, status = errors.rich_status(exc)
            if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                log.exception("%s failed", rpc)
            from grpc_status import rpc_status

            await context.abort_with_status(rpc_status.to_status(status))
        finally:
            self.state.metrics.requests.labels(rpc, code.name).inc()

    async def Generate(self, request, context):
        """Stream one GenerateResponse per emitted token, then a Finished message."""
        arrival = time.perf_counter()
        state, m = self.state, self.state.metrics
        async with self._guard("Generate", context):
            engine = state.ready_engine()
            inp = validation.generate_request(request, state.limits)
            from vllm import SamplingParams

            params = SamplingParams(**inp.sampling, logprobs=0)  # 0: the sampled token's logprob only
            rid = f"gen-{uuid.uuid4().hex[:16]}"
            log.debug("Generate %s (client id %r): %d prompt tokens", rid, inp.request_id, len(inp.prompt_ids))
            async with state.admission.slot():
                queue_s = time.perf_counter() - arrival
                m.queue_time.observe(queue_s)
                m.prompt_tokens.inc(len(inp.prompt_ids))
                text = TokenText(state.limits.tokenizer, inp.prompt_ids)
                first_s = None
                last = arrival
                final = None
                served: dict[int, list[list[float]]] = {}  # for the verifier: index -> family_attribution
                stream = engine.generate(rid, inp.prompt_ids, params,
                                         capture_options(rid, inp.detail, inp.interventions))
                async with contextlib.aclosing(stream):
                    async for out, new in stream:
                        completion = out.outputs[0]
                        now = time.perf_counter()
                        if new and first_s is not None:  # spread the gap over the tokens it brought
                            for _ in new:
                                m.itl.observe((now - last) / len(new))
                        if new:
                            last = now
                        deltas = text.step([t.token_id for t in new], completion.text)
                        for t, delta in zip(new, deltas, strict=True):
                            token = pb2.Token(index=t.index, token_id=t.token_id, text=delta)
                            if completion.logprobs:
                                token.logprob = completion.logprobs[t.index][t.token_id].logprob
                            if t.attr is not None:
                                token.attribution.CopyFrom(attribution_to_proto(t.attr))
                                m.observe_attribution(t.attr)
                                served[t.index] = t.attr.family_attribution
                            if first_s is None:
                                first_s = time.perf_counter() - arrival
                                m.ttft.observe(first_s)
                            m.generation_tokens.inc()
                            yield pb2.GenerateResponse(request_id=inp.request_id, token=token)
                        if out.finished:
                            final = out
            completion = final.outputs[0]
            reason, stop_string = _finish_reason(completion)
            e2e_s = time.perf_counter() - arrival
            yield pb2.GenerateResponse(request_id=inp.request_id, finished=pb2.Finished(
                finish_reason=reason, stop_string=stop_string, prompt_tokens=len(inp.prompt_ids),
                completion_tokens=len(completion.token_ids), prompt_token_ids=inp.prompt_ids,
                queue_seconds=queue_s, time_to_first_token_seconds=first_s or e2e_s, e2e_seconds=e2e_s))
            m.e2e.observe(e2e_s)
            if state.verifier is not None and served and not inp.interventions:
                state.verifier.offer(rid, inp.prompt_ids, list(completion.token_ids), served)

    async def Audit(self, request, context):
        """Replay prompt + completion teacher-forced in one pass; attribute every completion token."""
        arrival = time.perf_counter()
        async with self._guard("Audit", context):
            engine = self.state.ready_engine()
            inp = validation.audit_request(request, self.state.limits)
            async with contextlib.aclosing(self._audited(engine, inp, arrival)) as audited:
                done = [item async for item in audited]
            queue_s = done[0][0] if done else 0.0
            e2e_s = time.perf_counter() - arrival
            self.state.metrics.e2e.observe(e2e_s)
            return pb2.AuditResponse(request_id=inp.request_id, tokens=[t for _, t in done],
                                     prompt_tokens=len(inp.prompt_ids), queue_seconds=queue_s, e2e_seconds=e2e_s)

    async def AuditStream(self, request, context):
        """Audit, one message per token as the replay attributes it (CAUSAL tokens once their drops
        are computed), then a summary."""
        arrival = time.perf_counter()
        async with self._guard("AuditStream", context):
            engine = self.state.ready_engine()
            inp = validation.audit_request(request, self.state.limits)
            queue_s = 0.0
            async with contextlib.aclosing(self._audited(engine, inp, arrival)) as audited:
                async for queue_s, token in audited:
                    yield pb2.AuditStreamResponse(request_id=inp.request_id, token=token)
            e2e_s = time.perf_counter() - arrival
            self.state.metrics.e2e.observe(e2e_s)
            yield pb2.AuditStreamResponse(request_id=inp.request_id, summary=pb2.AuditSummary(
                prompt_tokens=len(inp.prompt_ids), completion_tokens=len(inp.completion_ids),
                queue_seconds=queue_s, e2e_seconds=e2e_s))

    async def _audited(self, engine: CaptureEngine, inp: validation.AuditInput,
                       arrival: float) -> AsyncIterator[tuple[float, "pb2.Token"]]:
        """(queue seconds, Token) per completion token, in order, as the replay attributes it: text
        filled in, and with CAUSAL the engine's exact family_drop (engine/causal.py)."""
        state = self.state
        rid = f"audit-{uuid.uuid4().hex[:16]}"
        async with state.admission.slot():
            queue_s = time.perf_counter() - arrival
            state.metrics.queue_time.observe(queue_s)
            text = TokenText(state.limits.tokenizer, inp.prompt_ids)
            causal = set(inp.causal_indices)
            stream = engine.replay_stream(rid, inp.prompt_ids, inp.completion_ids,
                                          capture_options(rid, inp.detail, inp.interventions))
            async with contextlib.aclosing(stream):
                async for new in stream:  # records arrive while the engine computes later chunks
                    token = _audit_token(new)
                    token.text = text.step([new.token_id])[0]
                    if new.index in causal:
                        score = torch.tensor(new.attr.family_attribution)
                        pairs = None
                        if inp.causal_pairs:  # probe-guided refinement: only the probe's largest pairs
                            pairs = {new.index: select_pairs(score, inp.causal_pairs).tolist()}
                        drops = await family_drops(engine, rid, inp.prompt_ids, inp.completion_ids, [new.index],
                                                   state.limits.n_blocks, inp.interventions, pairs=pairs)
                        drop = drops[new.index]
                        refined = refined_attribution(score, torch.tensor(drop)).tolist()
                        add_family_drop(token.attribution, drop, refined)
                    yield queue_s, token

    async def GetModelInfo(self, request, context):
        """The model and probe facts gathered at start-up."""
        async with self._guard("GetModelInfo", context):
            return self.state.info


def capture_options(rid: str, detail: Detail, interventions: tuple[Intervention, ...] = ()) -> CaptureOptions | None:
    """A request's options for the worker; None at detail NONE without interventions: served as stock vLLM."""
    if detail == Detail.NONE and not interventions:
        return None
    return CaptureOptions(rid=rid, detail=detail, rows=detail > Detail.NONE, interventions=interventions)


def _audit_token(new: NewToken) -> "pb2.Token":
    """One replayed completion token -> its Token message (text is filled in once all ids are known)."""
    token = pb2.Token(index=new.index, token_id=new.token_id)
    if new.attr is not None:
        token.attribution.CopyFrom(attribution_to_proto(new.attr))
        token.logprob = new.attr.host_logprob
    return token
