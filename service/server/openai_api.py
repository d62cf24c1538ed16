"""The OpenAI-compatible HTTP API (`--http-port`): /v1/models, /v1/completions, /v1/chat/completions.

Same process, engine, admission queue, metrics and bearer tokens as the gRPC server; what SDKs and
evaluation harnesses (the `openai` package, lm-evaluation-harness's `local-completions`) speak.

- **Shapes follow vLLM's own OpenAI server.** Requests are parsed by vLLM's protocol models
  (vllm.entrypoints.openai.*.protocol), extended by one optional field; responses are built in
  the same shapes (tests validate them against vLLM's response models). Streaming is SSE with a
  final `data: [DONE]`. Completions take one prompt or a batch (each prompt is one choice, index
  = its position), `echo` returns the prompt with its log-probabilities, and `max_tokens = 0` with
  `echo` scores the prompt without generating (what harnesses use for log-likelihood tasks).
- **Attribution is opt-in**: `"alignlens": {"detail": "summary" | "full"}` in the request adds,
  beside each token's logprobs entry, that token's attribution in the record layout the CLI's JSON
  uses (probe/record.py TokenAttribution): for completions `choices[i].logprobs.alignlens[j]`
  parallel to `tokens[j]`, for chat `choices[i].logprobs.content[j].alignlens`. Such a request
  always gets logprobs (the sampled token's, when the request asked for none). With `echo`, the
  prompt's tokens after the first are attributed too, by a teacher-forced replay of the prompt (the
  decision of a log-likelihood task lies in the prompt's continuation). Without the field, responses
  are plain OpenAI and the request runs as stock vLLM (no capture).
- **Errors** are OpenAI-style JSON, `{"error": {"message", "type", "param", "code"}}`, with the
  offending parameter named and the status: 400 bad input, 401 no or wrong token, 404 unknown
  model, 429 queue or token limit full, 503 starting / draining / engine dead, 500 otherwise. One
  mapping, from the same service errors the gRPC handlers raise (server/errors.py).
- Requests and results are counted in `alignlens_requests_total{rpc, code}` with rpc
  `http_completions`, `http_chat_completions`, `http_models` and the gRPC code names, so one
  alert rule covers both front ends.
"""

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc
import msgspec
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict

from alignlens.probe.prompts import encode_prompt
from alignlens.probe.record import Detail, TokenAttribution
from alignlens.service.server import errors, security, validation
from alignlens.service.server.errors import InvalidArgument
from alignlens.service.server.servicer import ServerState, capture_options

log = logging.getLogger(__name__)

MAX_PROMPTS = 32  # prompts in one /v1/completions batch (each takes an engine slot)
MAX_LOGPROBS = 20  # vLLM's default max_logprobs: top alternatives per token
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's and vLLM's default max_tokens for /v1/completions
HTTP_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400,
               grpc.StatusCode.UNAUTHENTICATED: 401, grpc.StatusCode.NOT_FOUND: 404,
               grpc.StatusCode.RESOURCE_EXHAUSTED: 429, grpc.StatusCode.UNAVAILABLE: 503}
ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 429: "RateLimitError",
               500: "InternalServerError", 503: "ServiceUnavailableError"}


class AlignlensExtension(BaseModel):
    """The request field that turns attribution on (`"alignlens": {"detail": "summary"}`)."""

    model_config = ConfigDict(extra="forbid")
    detail: Literal["none", "summary", "full"] = "summary"


def _request_models():
    """vLLM's request models, each with the `alignlens` field (imported late: vLLM is heavy)."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    class Completion(CompletionRequest):
        alignlens: AlignlensExtension | None = None

    class Chat(ChatCompletionRequest):
        alignlens: AlignlensExtension | None = None

    return Completion, Chat


class HTTPError(Exception):
    """An error response: HTTP status, message, and the request parameter it concerns."""

    def __init__(self, status: int, message: str, param: str | None = None, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.grpc_code = code or next((c for c, s in HTTP_STATUS.items() if s == status), grpc.StatusCode.INTERNAL)

    @classmethod
    def of(cls, exc: BaseException) -> "HTTPError":
        """Any failure as an error response, through the service's one status mapping."""
        if isinstance(exc, HTTPError):
            return exc
        code, message = errors.status_for(exc)
        param = exc.field if isinstance(exc, InvalidArgument) else getattr(exc, "parameter", None)
        return cls(HTTP_STATUS.get(code, 500), message, param, code)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "BadRequestError"),
                          "param": self.param, "code": self.status}}


@dataclass
class Job:
    """One prompt of a request, validated: what the engine runs and what the response shows."""

    index: int
    prompt_ids: list[int]
    params: Any  # vllm.SamplingParams
    detail: Detail
    top: int | None  # alternatives per token in logprobs (None: no logprobs)
    echo: bool = False
    score_only: bool = False  # echo with max_tokens = 0: the generated token is dropped
    prompt_text: str = ""


@dataclass
class TokenOut:
    token_id: int
    text: str  # the token's own text (logprobs `tokens`)
    logprob: float | None
    top: dict[int, tuple[str, float]] | None = None  # token id -> (text, logprob)
    attribution: TokenAttribution | None = None


@dataclass
class Piece:
    """What one engine step adds to a choice: text, tokens, and at the end the finish."""

    index: int
    text: str = ""
    tokens: list[TokenOut] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    completion_tokens: int = 0


def _check_extension(ext: AlignlensExtension | None, limits: validation.ModelLimits) -> Detail:
    if ext is None or ext.detail == "none":
        return Detail.NONE
    if not limits.probe_loaded:
        raise HTTPError(400, f"alignlens.detail {ext.detail!r} needs a probe, and none is loaded: "
                             f"{limits.probe_missing_reason}; leave out the alignlens field", "alignlens.detail")
    return Detail.FULL if ext.detail == "full" else Detail.SUMMARY


def _unsupported(req, names: tuple[str, ...]) -> None:
    """400 for request features this server does not serve (named, rather than silently ignored)."""
    for name in names:
        value = getattr(req, name, None)
        if name == "response_format" and value is not None and getattr(value, "type", "text") == "text":
            continue
        if name == "tool_choice" and value in (None, "none"):
            continue
        if value not in (None, False, [], "", 0):
            raise HTTPError(400, f"{name} is not supported by this server", name)


def _engine_logprobs(top: int | None, detail: Detail, echo: bool) -> int | None:
    """What vLLM's sampler is asked for. An attributed request that wants only the chosen token's
    logprob (top 0, no echo) takes it from its attribution record instead (`host_logprob`: the same
    raw log-probability, from the same logits before temperature or penalties, as the gRPC API
    serves it), so the sampler skips its full-vocabulary log-softmax and rank on the worker's
    core (docs/benchmarks/http-vs-vllm.md)."""
    return None if top == 0 and detail > Detail.NONE and not echo else top


def _sampling(req, n_prompt: int, max_tokens: int | None, max_name: str, limits: validation.ModelLimits,
              logprobs: int | None, echo: bool):
    """vllm.SamplingParams for one prompt, every field checked first (400 naming the parameter)."""
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import RequestOutputKind

    if req.n != 1:
        raise HTTPError(400, f"n = {req.n}: this server returns one choice per prompt (n = 1)", "n")
    room = limits.max_model_len - n_prompt
    if max_tokens is None:
        max_tokens = room
    if max_tokens < 0 or (max_tokens == 0 and not echo):
        raise HTTPError(400, f"{max_name} = {max_tokens} must be >= 1 (0 only with echo, to score the prompt)",
                        max_name)
    if n_prompt + max(max_tokens, 1) > limits.max_model_len:
        raise HTTPError(400, f"prompt tokens ({n_prompt}) + {max_name} ({max_tokens}) must be <= "
                             f"{limits.max_model_len} (max_model_len)", max_name)
    if req.temperature is not None and not 0.0 <= req.temperature <= validation.MAX_TEMPERATURE:
        raise HTTPError(400, f"temperature = {req.temperature} must be in [0, {validation.MAX_TEMPERATURE}]",
                        "temperature")
    if req.top_p is not None and not 0.0 < req.top_p <= 1.0:
        raise HTTPError(400, f"top_p = {req.top_p} must be in (0, 1]", "top_p")
    if req.top_k is not None and not (req.top_k in (0, -1) or 1 <= req.top_k <= limits.vocab_size):
        raise HTTPError(400, f"top_k = {req.top_k} must be -1, 0 (off) or 1..{limits.vocab_size}", "top_k")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > validation.MAX_STOP_STRINGS:
        raise HTTPError(400, f"stop has {len(stop)} strings; the limit is {validation.MAX_STOP_STRINGS}", "stop")
    for i, s in enumerate(stop):
        if not 1 <= len(s) <= validation.MAX_STOP_CHARS:
            raise HTTPError(400, f"stop[{i}] has {len(s)} characters; must be 1..{validation.MAX_STOP_CHARS}",
                            "stop")
    if req.prompt_logprobs is not None and not 0 <= req.prompt_logprobs <= MAX_LOGPROBS:
        raise HTTPError(400, f"prompt_logprobs = {req.prompt_logprobs} must be in 0..{MAX_LOGPROBS}",
                        "prompt_logprobs")
    try:
        params = req.to_sampling_params(max_tokens if max_tokens > 0 else 1, {})
    except (VLLMValidationError, ValueError) as exc:
        raise HTTPError(400, str(exc), getattr(exc, "parameter", None)) from None
    params.output_kind = RequestOutputKind.CUMULATIVE  # CaptureEngine joins records by output index
    params.logprobs = logprobs
    if echo:
        params.prompt_logprobs = logprobs if logprobs is not None else 0
    return params


class OpenAIFrontEnd:
    """The route handlers over the server's shared state (ServerState)."""

    def __init__(self, state: ServerState, model_names: tuple[str, ...], gate: security.Gate | None = None):
        self.state = state
        self.model_id = model_names[0]
        self.model_names = set(model_names)
        self.gate = gate
        self.created = int(time.time())
        self.Completion, self.Chat = _request_models()

    # -- requests -> jobs -------------------------------------------------------------------------

    def _check_model(self, name: str | None) -> None:
        if name is not None and name not in self.model_names:
            raise HTTPError(404, f"The model `{name}` does not exist: this server serves `{self.model_id}`", "model",
                            grpc.StatusCode.NOT_FOUND)

    def _prompt_ids(self, prompt, i: int | None) -> list[int]:
        where = "prompt" if i is None else f"prompt[{i}]"
        limits = self.state.limits
        if isinstance(prompt, str):
            if not prompt:
                raise HTTPError(400, f"{where} must not be empty", "prompt")
            return encode_prompt(limits.tokenizer, prompt)
        try:
            return validation.token_ids(prompt, where, limits)
        except InvalidArgument as exc:
            raise HTTPError(400, str(exc), "prompt") from None

    def completion_jobs(self, req) -> list[Job]:
        self._check_model(req.model)
        _unsupported(req, ("suffix", "use_beam_search", "prompt_embeds", "response_format", "structured_outputs"))
        limits = self.state.limits
        prompt = req.prompt
        if prompt is None or (isinstance(prompt, list) and not prompt):
            raise HTTPError(400, "prompt must be a string, a list of token ids, or a batch of either", "prompt")
        batch = prompt if isinstance(prompt, list) and isinstance(prompt[0], (str, list)) else [prompt]
        if len(batch) > MAX_PROMPTS:
            raise HTTPError(400, f"prompt is a batch of {len(batch)}; the limit is {MAX_PROMPTS}", "prompt")
        if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
            raise HTTPError(400, f"logprobs = {req.logprobs} must be in 0..{MAX_LOGPROBS}", "logprobs")
        detail = _check_extension(req.alignlens, limits)
        top = req.logprobs if req.logprobs is not None else (0 if detail > Detail.NONE else None)
        jobs = []
        for i, p in enumerate(batch):
            ids = self._prompt_ids(p, i if len(batch) > 1 else None)
            max_tokens = DEFAULT_COMPLETION_TOKENS if req.max_tokens is None else req.max_tokens
            params = _sampling(req, len(ids), max_tokens, "max_tokens", limits, _engine_logprobs(top, detail, req.echo),
                               bool(req.echo))
            text = p if isinstance(p, str) else limits.tokenizer.decode(ids)
            jobs.append(Job(i, ids, params, detail, top, bool(req.echo), bool(req.echo) and max_tokens == 0, text))
        return jobs

    def chat_job(self, req) -> Job:
        self._check_model(req.model)
        _unsupported(req, ("use_beam_search", "response_format", "structured_outputs", "tools", "tool_choice",
                           "continue_final_message"))
        limits = self.state.limits
        if not req.messages:
            raise HTTPError(400, "messages must not be empty", "messages")
        if not getattr(limits.tokenizer, "chat_template", None):
            raise HTTPError(400, "this model has no chat template; use /v1/completions", "messages")
        turns = []
        for i, m in enumerate(req.messages):
            role, content = m.get("role"), m.get("content")
            if role not in validation.CHAT_ROLES:
                raise HTTPError(400, f"messages[{i}].role = {role!r}; must be one of "
                                     f"{', '.join(validation.CHAT_ROLES)}", f"messages[{i}].role")
            if not isinstance(content, str):  # a list of parts: text parts only
                parts = list(content or [])
                if any(part.get("type") != "text" for part in parts):
                    raise HTTPError(400, f"messages[{i}].content: only text parts are supported",
                                    f"messages[{i}].content")
                content = "".join(part.get("text", "") for part in parts)
            turns.append({"role": role, "content": content})
        ids = encode_prompt(limits.tokenizer, turns)
        if req.top_logprobs is not None and not 0 <= req.top_logprobs <= MAX_LOGPROBS:
            raise HTTPError(400, f"top_logprobs = {req.top_logprobs} must be in 0..{MAX_LOGPROBS}", "top_logprobs")
        detail = _check_extension(req.alignlens, limits)
        top = (req.top_logprobs or 0) if (req.logprobs or detail > Detail.NONE) else None
        name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        return Job(0, ids, _sampling(req, len(ids), max_tokens, name, limits, _engine_logprobs(top, detail, False), False),
                   detail, top)

    # -- running ----------------------------------------------------------------------------------

    def _token(self, token_id: int, entry: dict | None, top: int | None, as_ids: bool) -> TokenOut:
        """A token with its logprob and `top` alternatives from vLLM's {token id: Logprob}."""
        from vllm.tokenizers.detokenizer_utils import convert_ids_list_to_tokens  # vLLM's own token text

        tok = self.state.limits.tokenizer

        def text(tid: int, lp) -> str:
            if as_ids:
                return f"token_id:{tid}"
            decoded = getattr(lp, "decoded_token", None)
            return decoded if decoded is not None else convert_ids_list_to_tokens(tok, [tid])[0]

        if entry is None:
            return TokenOut(token_id, text(token_id, None), None)
        chosen = entry.get(token_id)
        alternatives = None
        if top:  # the top alternatives and the token itself, as vLLM returns them
            ranked = sorted(entry.items(), key=lambda kv: -kv[1].logprob)[:top]
            if chosen is not None and token_id not in dict(ranked):
                ranked.append((token_id, chosen))
            alternatives = {tid: (text(tid, lp), lp.logprob) for tid, lp in ranked}
        return TokenOut(token_id, text(token_id, chosen), chosen.logprob if chosen is not None else None,
                        alternatives)

    async def run(self, job: Job, as_ids: bool = False) -> AsyncIterator[Piece]:
        """Pieces of one choice as the engine produces them; the last carries the finish."""
        state, m = self.state, self.state.metrics
        arrival = time.perf_counter()
        engine = state.ready_engine()
        rid = f"http-{uuid.uuid4().hex[:16]}"
        async with state.admission.slot():
            m.queue_time.observe(time.perf_counter() - arrival)
            m.prompt_tokens.inc(len(job.prompt_ids))
            options = capture_options(rid, job.detail)
            prompt_attrs = await self._prompt_attributions(job, engine, rid, options) if job.echo else {}
            sent_text, final, first, echoed = "", None, True, False
            # score-only: the one generated token is dropped, so it is not attributed either
            stream = engine.generate(rid, job.prompt_ids, job.params, None if job.score_only else options)
            async with contextlib.aclosing(stream):
                async for out, new in stream:
                    completion = out.outputs[0]
                    final = completion
                    if job.echo and not echoed:
                        echoed = True
                        yield self._echo(job, out.prompt_logprobs, prompt_attrs, as_ids)
                    if job.score_only:
                        continue
                    piece = Piece(job.index, text=completion.text[len(sent_text):])
                    sent_text = completion.text
                    for t in new:
                        entry = completion.logprobs[t.index] if completion.logprobs else None
                        token = self._token(t.token_id, entry, job.top, as_ids)
                        if t.attr is not None and token.logprob is None and job.top is not None:
                            token.logprob = t.attr.host_logprob  # _engine_logprobs: vLLM was not asked
                        if t.attr is not None:
                            token.attribution = t.attr  # a Struct: msgspec encodes it as the record layout
                            m.observe_attribution(t.attr)
                        piece.tokens.append(token)
                        m.generation_tokens.inc()
                    if first and piece.tokens:
                        m.ttft.observe(time.perf_counter() - arrival)
                        first = False
                    if piece.text or piece.tokens:
                        yield piece
        done = Piece(job.index, completion_tokens=0 if job.score_only else len(final.token_ids))
        if job.score_only:
            done.finish_reason = "length"
        else:
            done.finish_reason = final.finish_reason or "stop"
            done.stop_reason = final.stop_reason
        m.e2e.observe(time.perf_counter() - arrival)
        yield done

    async def _prompt_attributions(self, job: Job, engine, rid: str, options) -> dict[int, TokenAttribution]:
        """With attribution and echo: prompt position -> attribution of that prompt token, for every
        position after the first, from a teacher-forced replay of the prompt (in the same slot)."""
        attrs: dict[int, TokenAttribution] = {}
        if options is None or len(job.prompt_ids) < 2:
            return attrs
        replay = engine.replay_stream(f"{rid}-echo", job.prompt_ids[:1], job.prompt_ids[1:], options)
        async with contextlib.aclosing(replay):
            async for new in replay:
                if new.attr is not None:
                    attrs[new.index + 1] = new.attr
                    self.state.metrics.observe_attribution(new.attr)
        return attrs

    def _echo(self, job: Job, prompt_logprobs, attrs: dict[int, TokenAttribution], as_ids: bool) -> Piece:
        """The prompt as the first piece of an echo request: its text and tokens, with the prompt
        log-probabilities vLLM computed in the same request (none for the first token)."""
        piece = Piece(job.index, text=job.prompt_text)
        for i, tid in enumerate(job.prompt_ids):
            entry = prompt_logprobs[i] if prompt_logprobs and i < len(prompt_logprobs) else None
            token = self._token(tid, entry, job.top, as_ids)
            token.attribution = attrs.get(i)
            if i == 0:
                token.logprob, token.top = None, None
            piece.tokens.append(token)
        return piece


# -- response shapes (vLLM's: CompletionResponse, ChatCompletionResponse and their stream chunks) ----------


class _Logprobs:
    """The completions `logprobs` object of one choice, grown piece by piece."""

    def __init__(self, attributed: bool, top: int | None):
        self.attributed, self.top = attributed, top
        self.offset = 0
        self.value = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
        if attributed:
            self.value["alignlens"] = []

    def add(self, tokens: list[TokenOut]) -> dict:
        part = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
        if self.attributed:
            part["alignlens"] = []
        for t in tokens:
            part["text_offset"].append(self.offset)
            self.offset += len(t.text)
            part["token_logprobs"].append(t.logprob)
            part["tokens"].append(t.text)
            part["top_logprobs"].append(None if t.top is None else {text: lp for text, lp in t.top.values()})
            if self.attributed:
                part["alignlens"].append(t.attribution)
        for key, values in part.items():
            self.value[key].extend(values)
        return part


def _chat_logprobs(tokens: list[TokenOut], attributed: bool) -> list[dict]:
    out = []
    for t in tokens:
        entry = {"token": t.text, "logprob": t.logprob if t.logprob is not None else -9999.0,
                 "bytes": list(t.text.encode("utf-8", errors="replace")),
                 "top_logprobs": [{"token": text, "logprob": lp, "bytes": list(text.encode("utf-8", errors="replace"))}
                                  for text, lp in (t.top or {}).values()]}
        if attributed:
            entry["alignlens"] = t.attribution
        out.append(entry)
    return out


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _merged(streams: list[AsyncIterator[Piece]]) -> AsyncIterator[Piece]:
    """Pieces of several choices as they come; every stream is closed on exit (cancel included)."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:
            async for piece in only:
                yield piece
        return
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(stream):
        try:
            async with contextlib.aclosing(stream):
                async for piece in stream:
                    await queue.put(piece)
            await queue.put(end)
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, who raises it
            await queue.put(exc)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is end:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Responses:
    """Builds the response bodies of one request from its pieces."""

    def __init__(self, front: OpenAIFrontEnd, chat: bool, jobs: list[Job], token_ids: bool = False):
        self.front, self.chat, self.jobs, self.token_ids = front, chat, jobs, token_ids
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.attributed = any(j.detail > Detail.NONE for j in jobs)
        self.logprobs = [_Logprobs(self.attributed, j.top) for j in jobs]
        self.completion_tokens = [0] * len(jobs)

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.front.model_id}

    def usage(self) -> dict:
        return _usage(sum(len(j.prompt_ids) for j in self.jobs), sum(self.completion_tokens))

    def chunk(self, piece: Piece) -> dict:
        """One SSE chunk for a piece."""
        job = self.jobs[piece.index]
        self.completion_tokens[piece.index] = max(self.completion_tokens[piece.index], piece.completion_tokens)
        if self.chat:
            delta = {"content": piece.text} if piece.text or piece.tokens else {}
            choice = {"index": piece.index, "delta": delta, "logprobs": None, "finish_reason": piece.finish_reason}
            if job.top is not None and piece.tokens:
                choice["logprobs"] = {"content": _chat_logprobs(piece.tokens, self.attributed)}
            if piece.finish_reason is not None:
                choice["stop_reason"] = piece.stop_reason
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": piece.index, "text": piece.text, "logprobs": None, "finish_reason": piece.finish_reason}
        if self.token_ids and piece.tokens:
            choice["token_ids"] = [t.token_id for t in piece.tokens]
        if job.top is not None and piece.tokens:
            choice["logprobs"] = self.logprobs[piece.index].add(piece.tokens)
        if piece.finish_reason is not None:
            choice["stop_reason"] = piece.stop_reason
        return {**self._head("text_completion"), "choices": [choice]}

    def role_chunk(self) -> dict:
        return {**self._head("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}]}

    def usage_chunk(self) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": self.usage()}

    def whole(self, pieces: list[Piece]) -> dict:
        """The non-streaming body from all pieces."""
        texts = [""] * len(self.jobs)
        tokens: list[list[TokenOut]] = [[] for _ in self.jobs]
        finish: dict[int, Piece] = {}
        for p in pieces:
            texts[p.index] += p.text
            tokens[p.index] += p.tokens
            if p.finish_reason is not None:
                finish[p.index] = p
                self.completion_tokens[p.index] = p.completion_tokens
        choices = []
        for job in self.jobs:
            i, done = job.index, finish[job.index]
            if self.chat:
                choice = {"index": i, "message": {"role": "assistant", "content": texts[i]},
                          "logprobs": ({"content": _chat_logprobs(tokens[i], self.attributed)}
                                       if job.top is not None else None),
                          "finish_reason": done.finish_reason, "stop_reason": done.stop_reason}
            else:
                choice = {"index": i, "text": texts[i],
                          "logprobs": self.logprobs[i].add(tokens[i]) if job.top is not None else None,
                          "finish_reason": done.finish_reason, "stop_reason": done.stop_reason}
            if self.token_ids:  # vLLM's return_token_ids: the prompt's ids and the generated ids
                choice["prompt_token_ids"] = job.prompt_ids
                echoed = len(job.prompt_ids) if job.echo else 0
                choice["token_ids"] = [t.token_id for t in tokens[i][echoed:]]
            choices.append(choice)
        return {**self._head("chat.completion" if self.chat else "text_completion"), "choices": choices,
                "usage": self.usage()}


_JSON = msgspec.json.Encoder()  # encodes the attribution Structs in place, ~10x json.dumps on a summary chunk


def _sse(obj) -> bytes:
    return b"data: " + _JSON.encode(obj) + b"\n\n"


def _json_response(obj) -> Response:
    return Response(_JSON.encode(obj), media_type="application/json")


def build_app(front: OpenAIFrontEnd):
    """The FastAPI application of the HTTP port (annotations are real objects here, not strings:
    FastAPI reads them to parse bodies, hence no `from __future__ import annotations`)."""
    app = FastAPI(title="alignlens OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)
    state, gate = front.state, front.gate

    def count(rpc: str, code: grpc.StatusCode) -> None:
        state.metrics.requests.labels(rpc, code.name).inc()

    def error(exc: BaseException, rpc: str) -> JSONResponse:
        err = HTTPError.of(exc)
        if err.status == 500:
            log.error("%s failed: %s", rpc, err.message, exc_info=exc)
        count(rpc, err.grpc_code)
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        # the field path, without pydantic's union-branch tags ("str", "list[int]", "function-after[...]")
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        loc = loc[:next((i for i, p in enumerate(loc) if _TYPE_TAG.match(p)), len(loc))]
        message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}"
        return error(HTTPError(400, message, ".".join(loc) or None), _RPCS.get(request.url.path, "http_other"))

    @contextlib.asynccontextmanager
    async def authorized(request: Request):
        """The bearer token checked and its calls in flight counted (security.Gate's rules)."""
        token = None
        if gate is not None and gate.tokens:
            token = gate.authenticate([("authorization", request.headers.get("authorization", ""))])
            if token is None:
                raise HTTPError(401, security.UNAUTHENTICATED_MESSAGE)
            if not gate.enter(token):
                raise HTTPError(429, security.limit_message(token))
        try:
            yield
        finally:
            if token is not None:
                gate.leave(token)

    @app.get("/health")
    async def health():
        return JSONResponse({"status": "ok" if state.engine_alive() and not state.draining else "unavailable"},
                            status_code=200 if state.engine_alive() and not state.draining else 503)

    @app.get("/v1/models")
    async def models(request: Request):
        try:
            async with authorized(request):
                count("http_models", grpc.StatusCode.OK)
                return {"object": "list", "data": [{
                    "id": front.model_id, "object": "model", "created": front.created, "owned_by": "alignlens",
                    "root": str(state.info.name), "max_model_len": state.limits.max_model_len}]}
        except Exception as exc:  # noqa: BLE001 - every failure is an error body
            return error(exc, "http_models")

    async def serve(request: Request, body, chat: bool):
        rpc = "http_chat_completions" if chat else "http_completions"
        stack = contextlib.AsyncExitStack()
        try:
            await stack.enter_async_context(authorized(request))
            jobs = [front.chat_job(body)] if chat else front.completion_jobs(body)
            state.ready_engine()
        except Exception as exc:  # noqa: BLE001
            await stack.aclose()
            return error(exc, rpc)
        as_ids = bool(getattr(body, "return_tokens_as_token_ids", False))
        out = Responses(front, chat, jobs, bool(getattr(body, "return_token_ids", False)))
        pieces = _merged([front.run(j, as_ids) for j in jobs])
        if not body.stream:
            try:
                async with stack, contextlib.aclosing(pieces):
                    result = out.whole([p async for p in pieces])
            except Exception as exc:  # noqa: BLE001
                return error(exc, rpc)
            count(rpc, grpc.StatusCode.OK)
            return _json_response(result)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events():
            code = grpc.StatusCode.OK
            try:
                async with stack, contextlib.aclosing(pieces):
                    if chat:
                        yield _sse(out.role_chunk())
                    async for piece in pieces:
                        yield _sse(out.chunk(piece))
                if include_usage:
                    yield _sse(out.usage_chunk())
            except (asyncio.CancelledError, GeneratorExit):
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:  # noqa: BLE001 - the status is sent; the error goes in the stream
                err = HTTPError.of(exc)
                code = err.grpc_code
                if err.status == 500:
                    log.error("%s failed: %s", rpc, err.message, exc_info=exc)
                yield _sse(err.body())
            finally:
                count(rpc, code)
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request, body: front.Completion):  # type: ignore[name-defined]
        return await serve(request, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: front.Chat):  # type: ignore[name-defined]
        return await serve(request, body, chat=True)

    return app


_TYPE_TAG = re.compile(r"^(str|int|float|bool|bytes|none|[\w-]+\[.*\])$")
_RPCS = {"/v1/completions": "http_completions", "/v1/chat/completions": "http_chat_completions",
         "/v1/models": "http_models"}


class HTTPServer:
    """uvicorn serving the app inside the server's event loop (no signal handlers of its own: the
    gRPC server's drain decides when it stops)."""

    def __init__(self, app, host: str, port: int, tls_cert: str = "", tls_key: str = "", tls_client_ca: str = ""):
        import ssl

        import uvicorn

        class _Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):
                yield

        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off", access_log=False,
                                ssl_certfile=tls_cert or None, ssl_keyfile=tls_key or None,
                                ssl_ca_certs=tls_client_ca or None,
                                ssl_cert_reqs=ssl.CERT_REQUIRED if tls_client_ca else ssl.CERT_NONE,
                                timeout_graceful_shutdown=1)
        self.server = _Server(config)
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self.server.serve(), name="http")
        while not self.server.started:
            if self.task.done():
                self.task.result()  # raises the bind error
                raise RuntimeError("the HTTP server stopped during start-up")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        if self.task is None:
            return
        self.server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.task, 5.0)
