"""Request validation: proto request -> engine inputs, or an error naming field and limit.

Everything a request can get wrong is caught here, before the engine sees it, so a bad
request costs no engine time and never reaches vLLM's own (less specific) checks. The
functions tokenize prompts (the context check needs the token count), so their results are
the engine inputs themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from alignlens.probe.prompts import encode_prompt
from alignlens.probe.record import Detail
from alignlens.service.engine.wire import Intervention
from alignlens.service.server.convert import DETAIL_FROM_PROTO, FAMILY_FROM_PROTO
from alignlens.service.server.errors import FailedPrecondition, InvalidArgument

DEFAULT_MAX_TOKENS = 64
MAX_TEMPERATURE = 2.0  # vLLM's own bound
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_REQUEST_ID_CHARS = 128
MAX_SEED = 2**63 - 1
MAX_INTERVENTIONS = 64  # per request
# completion tokens one CAUSAL Audit explains (each costs causal_pairs + 1 engine requests, 3L + 1 by default)
MAX_CAUSAL_TOKENS = 16
MAX_ABS_SCALE = 100.0  # |Intervention.scale|
CHAT_ROLES = ("system", "user", "assistant")



@dataclass
class ModelLimits:
    """What requests are checked against; built at start-up (intervention_k once the engine is up)."""

    tokenizer: object  # transformers tokenizer of the served model
    max_model_len: int  # context length, prompt + generated tokens
    vocab_size: int  # token ids must be < this
    probe_loaded: bool  # attribution available
    probe_missing_reason: str = ""  # why not, for FAILED_PRECONDITION messages
    n_blocks: int = 0  # L: blocks are 1..L
    intervention_k: int = 0  # directions per (block, family) an intervention may name; 0: interventions off


@dataclass
class GenerateInput:
    """A validated Generate request."""

    request_id: str
    prompt_ids: list[int]
    sampling: dict = field(default_factory=dict)  # keyword arguments of vllm.SamplingParams
    detail: Detail = Detail.NONE
    interventions: tuple[Intervention, ...] = ()


@dataclass
class AuditInput:
    """A validated Audit request."""

    request_id: str
    prompt_ids: list[int]
    completion_ids: list[int]
    detail: Detail = Detail.NONE
    interventions: tuple[Intervention, ...] = ()
    causal_indices: tuple[int, ...] = ()  # at Detail.CAUSAL: completion indices whose family_drop to compute
    causal_pairs: int = 0  # at Detail.CAUSAL: pairs ablated per token, the probe's largest first; 0 = all 3L


def request_id(value: str) -> str:
    if len(value) > MAX_REQUEST_ID_CHARS:
        raise InvalidArgument("request_id", f"request_id has {len(value)} characters; the limit is "
                                            f"{MAX_REQUEST_ID_CHARS}")
    if not all(" " <= ch <= "~" for ch in value):
        raise InvalidArgument("request_id", "request_id must be printable ASCII")
    return value


def detail(req, limits: ModelLimits) -> Detail:
    """Engine detail level for the request's `detail`; FAILED_PRECONDITION without a probe."""
    value = req.detail
    if value == 0:  # UNSPECIFIED: the best the server can do
        return Detail.SUMMARY if limits.probe_loaded else Detail.NONE
    if value not in DETAIL_FROM_PROTO:
        raise InvalidArgument("detail", f"detail = {value} is not an AttributionDetail value (0..3)")
    level = DETAIL_FROM_PROTO[value]
    if level > Detail.NONE and not limits.probe_loaded:
        name = req.DESCRIPTOR.fields_by_name["detail"].enum_type.values_by_number[value].name
        raise FailedPrecondition(f"detail {name} needs a probe, and none is loaded: {limits.probe_missing_reason}; "
                                 f"send ATTRIBUTION_DETAIL_NONE for plain generation")
    return level


def token_ids(ids, field_name: str, limits: ModelLimits) -> list[int]:
    ids = list(ids)
    if not ids:
        raise InvalidArgument(field_name, f"{field_name} must not be empty")
    for i, t in enumerate(ids):
        if t >= limits.vocab_size:
            raise InvalidArgument(field_name, f"{field_name}[{i}] = {t} is not a token id "
                                              f"(must be < {limits.vocab_size}, the vocabulary size)")
    return ids


def prompt(msg, limits: ModelLimits, field_name: str = "prompt") -> list[int]:
    """Token ids of a `Prompt` message (text tokenized, chat rendered with the template)."""
    kind = msg.WhichOneof("input")
    if kind is None:
        raise InvalidArgument(field_name, f"{field_name}: set one of text, token_ids or chat")
    if kind == "token_ids":
        return token_ids(msg.token_ids.ids, f"{field_name}.token_ids.ids", limits)
    if kind == "text":
        if not msg.text:
            raise InvalidArgument(f"{field_name}.text", f"{field_name}.text must not be empty")
        return encode_prompt(limits.tokenizer, msg.text)
    messages = msg.chat.messages
    if not messages:
        raise InvalidArgument(f"{field_name}.chat.messages", f"{field_name}.chat.messages must not be empty")
    for i, m in enumerate(messages):
        if m.role not in CHAT_ROLES:
            raise InvalidArgument(f"{field_name}.chat.messages[{i}].role",
                                  f"{field_name}.chat.messages[{i}].role = {m.role!r}; must be one of "
                                  f"{', '.join(CHAT_ROLES)}")
    if not getattr(limits.tokenizer, "chat_template", None):
        raise InvalidArgument(f"{field_name}.chat", "this model has no chat template; send text or token_ids")
    turns = [{"role": m.role, "content": m.content} for m in messages]
    return encode_prompt(limits.tokenizer, turns)


def sampling(msg, n_prompt: int, limits: ModelLimits) -> dict:
    """vllm.SamplingParams keyword arguments for a `SamplingParameters` message."""
    room = limits.max_model_len - n_prompt
    if room < 1:
        raise InvalidArgument("prompt", f"prompt has {n_prompt} tokens; the context holds "
                                        f"{limits.max_model_len} (max_model_len), leaving no room to generate")
    if msg.HasField("max_tokens"):
        max_tokens = msg.max_tokens
        if max_tokens < 1:
            raise InvalidArgument("sampling.max_tokens", "sampling.max_tokens must be >= 1")
        if n_prompt + max_tokens > limits.max_model_len:
            raise InvalidArgument("sampling.max_tokens",
                                  f"prompt tokens ({n_prompt}) + sampling.max_tokens ({max_tokens}) must be "
                                  f"<= {limits.max_model_len} (max_model_len)")
    else:
        max_tokens = min(DEFAULT_MAX_TOKENS, room)
    out: dict = {"max_tokens": max_tokens, "ignore_eos": msg.ignore_eos}
    if msg.HasField("temperature"):
        if not 0.0 <= msg.temperature <= MAX_TEMPERATURE:  # also rejects NaN
            raise InvalidArgument("sampling.temperature", f"sampling.temperature = {msg.temperature} must be "
                                                          f"in [0, {MAX_TEMPERATURE}]")
        out["temperature"] = msg.temperature
    if msg.HasField("top_p"):
        if not 0.0 < msg.top_p <= 1.0:
            raise InvalidArgument("sampling.top_p", f"sampling.top_p = {msg.top_p} must be in (0, 1]")
        out["top_p"] = msg.top_p
    if msg.HasField("top_k"):
        if msg.top_k > limits.vocab_size:
            raise InvalidArgument("sampling.top_k", f"sampling.top_k = {msg.top_k} must be <= "
                                                    f"{limits.vocab_size} (vocabulary size); 0 is off")
        out["top_k"] = msg.top_k
    if msg.HasField("seed"):
        if msg.seed > MAX_SEED:
            raise InvalidArgument("sampling.seed", f"sampling.seed = {msg.seed} must be <= {MAX_SEED}")
        out["seed"] = msg.seed
    if len(msg.stop) > MAX_STOP_STRINGS:
        raise InvalidArgument("sampling.stop", f"sampling.stop has {len(msg.stop)} strings; the limit is "
                                               f"{MAX_STOP_STRINGS}")
    for i, s in enumerate(msg.stop):
        if not 1 <= len(s) <= MAX_STOP_CHARS:
            raise InvalidArgument(f"sampling.stop[{i}]", f"sampling.stop[{i}] has {len(s)} characters; must be "
                                                         f"1..{MAX_STOP_CHARS}")
    if msg.stop:
        out["stop"] = list(msg.stop)
    return out


def interventions(msgs, limits: ModelLimits) -> tuple[Intervention, ...]:
    """The request's Intervention messages, each field checked against the model's limits."""
    if not msgs:
        return ()
    if limits.intervention_k == 0:
        raise FailedPrecondition("this server's engine was built without intervention hooks "
                                 "(ALIGNLENS_INTERVENTIONS=0); send no interventions")
    if len(msgs) > MAX_INTERVENTIONS:
        raise InvalidArgument("interventions", f"interventions has {len(msgs)} entries; the limit is "
                                               f"{MAX_INTERVENTIONS}")
    out = []
    for i, m in enumerate(msgs):
        name = f"interventions[{i}]"
        if not 1 <= m.block <= limits.n_blocks:
            raise InvalidArgument(f"{name}.block", f"{name}.block = {m.block} must be in 1..{limits.n_blocks} "
                                                   "(the model's blocks)")
        if m.family not in FAMILY_FROM_PROTO:
            raise InvalidArgument(f"{name}.family", f"{name}.family = {m.family} must be FAMILY_QKV, "
                                                    "FAMILY_ATTN_OUT or FAMILY_MLP_IN")
        k = limits.intervention_k
        dirs = list(m.directions)
        for j, d in enumerate(dirs):
            if d >= k:
                raise InvalidArgument(f"{name}.directions[{j}]", f"{name}.directions[{j}] = {d} must be < {k} "
                                                                 "(ModelInfo.k, the top-k basis size)")
        if len(set(dirs)) != len(dirs):
            raise InvalidArgument(f"{name}.directions", f"{name}.directions names a direction twice")
        if not math.isfinite(m.scale) or abs(m.scale) > MAX_ABS_SCALE:
            raise InvalidArgument(f"{name}.scale", f"{name}.scale = {m.scale} must be finite with "
                                                   f"|scale| <= {MAX_ABS_SCALE:g}")
        end = m.end_position if m.HasField("end_position") else None
        if m.start_position >= limits.max_model_len:
            raise InvalidArgument(f"{name}.start_position", f"{name}.start_position = {m.start_position} must be "
                                                            f"< {limits.max_model_len} (max_model_len)")
        if end is not None and not m.start_position < end <= limits.max_model_len:
            raise InvalidArgument(f"{name}.end_position", f"{name}.end_position = {end} must be in "
                                                          f"{m.start_position + 1}..{limits.max_model_len} "
                                                          "(after start_position, within max_model_len)")
        out.append(Intervention(block=m.block, family=FAMILY_FROM_PROTO[m.family], directions=tuple(dirs),
                                scale=float(m.scale), start=m.start_position, end=end))
    return tuple(out)


def _common(req, limits: ModelLimits) -> tuple[str, Detail, list[int]]:
    """The fields Generate and Audit share, in the same order: request id, detail, prompt."""
    rid = request_id(req.request_id)
    level = detail(req, limits)
    if not req.HasField("prompt"):
        raise InvalidArgument("prompt", "prompt: set one of text, token_ids or chat")
    return rid, level, prompt(req.prompt, limits)


def generate_request(req, limits: ModelLimits) -> GenerateInput:
    """Validate a GenerateRequest. Raises InvalidArgument / FailedPrecondition."""
    rid, level, ids = _common(req, limits)
    if level == Detail.CAUSAL:
        raise InvalidArgument("detail", "detail ATTRIBUTION_DETAIL_CAUSAL is for Audit only: audit the generation "
                                        "(Finished.prompt_token_ids + its tokens) to get family_drop")
    return GenerateInput(rid, ids, sampling(req.sampling, len(ids), limits), level,
                         interventions(req.interventions, limits))


def audit_request(req, limits: ModelLimits) -> AuditInput:
    """Validate an AuditRequest. Raises InvalidArgument / FailedPrecondition."""
    rid, level, ids = _common(req, limits)
    kind = req.WhichOneof("completion")
    if kind is None:
        raise InvalidArgument("completion", "completion: set completion_text or completion_token_ids")
    if kind == "completion_text":
        if not req.completion_text:
            raise InvalidArgument("completion_text", "completion_text must not be empty")
        completion = list(limits.tokenizer(req.completion_text, add_special_tokens=False)["input_ids"])
    else:
        completion = token_ids(req.completion_token_ids.ids, "completion_token_ids.ids", limits)
    # The replay samples one token past the completion (and discards it), hence the +1.
    if len(ids) + len(completion) + 1 > limits.max_model_len:
        raise InvalidArgument("completion", f"prompt tokens ({len(ids)}) + completion tokens ({len(completion)}) "
                                            f"must be < {limits.max_model_len} (max_model_len)")
    return AuditInput(rid, ids, completion, level, interventions(req.interventions, limits),
                      causal_indices(req.causal_indices, level, len(completion), limits),
                      causal_pairs(req.causal_pairs, level, limits))


def causal_pairs(value: int, level: Detail, limits: ModelLimits) -> int:
    """The pairs a CAUSAL Audit ablates per token (0 = all 3L; probe-guided refinement otherwise)."""
    if value and level != Detail.CAUSAL:
        raise InvalidArgument("causal_pairs", "causal_pairs needs detail ATTRIBUTION_DETAIL_CAUSAL")
    if value > 3 * limits.n_blocks:
        raise InvalidArgument("causal_pairs", f"causal_pairs = {value} must be <= {3 * limits.n_blocks} "
                                              "(3L: every (block, family) of the model; 0 also means all)")
    return value


def causal_indices(values, level: Detail, n_completion: int, limits: ModelLimits) -> tuple[int, ...]:
    """The completion indices a CAUSAL Audit explains (all, when none are named and few enough)."""
    values = list(values)
    if level != Detail.CAUSAL:
        if values:
            raise InvalidArgument("causal_indices", "causal_indices needs detail ATTRIBUTION_DETAIL_CAUSAL")
        return ()
    if limits.intervention_k == 0:
        raise FailedPrecondition("detail CAUSAL needs the engine's intervention hooks, and this engine was built "
                                 "without them (ALIGNLENS_INTERVENTIONS=0)")
    if not values:
        if n_completion > MAX_CAUSAL_TOKENS:
            raise InvalidArgument("causal_indices", f"the completion has {n_completion} tokens; a CAUSAL Audit "
                                                    f"explains at most {MAX_CAUSAL_TOKENS}: name them in "
                                                    "causal_indices")
        return tuple(range(n_completion))
    if len(values) > MAX_CAUSAL_TOKENS:
        raise InvalidArgument("causal_indices", f"causal_indices has {len(values)} entries; the limit is "
                                                f"{MAX_CAUSAL_TOKENS}")
    for j, v in enumerate(values):
        if v >= n_completion:
            raise InvalidArgument(f"causal_indices[{j}]", f"causal_indices[{j}] = {v} must be < {n_completion} "
                                                          "(the completion's tokens)")
    if len(set(values)) != len(values):
        raise InvalidArgument("causal_indices", "causal_indices names an index twice")
    return tuple(sorted(values))
