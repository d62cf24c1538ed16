"""What crosses from the server to the vLLM worker and back, typed once.

Imported by both ends: the worker (alignlens.service.vllm_plugin) and the server side
(alignlens.service.engine, alignlens.service.server). It imports neither vLLM nor torch, so the
server never imports worker code to speak to it.

Server -> worker: `CaptureOptions`, carried in `SamplingParams.extra_args[OPTIONS_KEY]` as plain
builtins (vLLM serializes SamplingParams itself): what to capture and which `Intervention`s to
apply. A request without that key is not touched at all: it is served exactly as stock vLLM
(detail NONE without interventions sends none).

Worker -> server: one `StepMessage` per emitter work item over the side channel
(alignlens.service.engine.channel), msgpack-encoded from and decoded into these same Structs:

    StepMessage  step, attr_seconds, n_blocks (L), d_model, dtype, records: [TokenRecord]
    TokenRecord  rid, kind (gen | replay), index, token,
                 attr   TokenAttribution (probe/record.py) or None,
                 error  why the probe failed for this row, or None,
                 resid  [L+1, d_model] bytes in `dtype`, C order, or None  (h_0..h_L, `alignlens trace`)
                 resid_mid [L, d_model] bytes, or None                    (m_1..m_L)
`index` is the output index (gen) or completion index (replay) of the token the row decides.
"""

from __future__ import annotations

import enum

import msgspec
import numpy as np

from alignlens.probe.names import RESID, RESID_MID
from alignlens.probe.record import Detail, TokenAttribution

OPTIONS_KEY = "alignlens"  # the key of SamplingParams.extra_args that turns capture on


class Kind(str, enum.Enum):
    """Which decision a captured row makes."""

    GEN = "gen"  # the next token of a generation (index: output position)
    REPLAY = "replay"  # a given completion token of a teacher-forced audit (index: completion position)


class Intervention(msgspec.Struct, frozen=True, omit_defaults=True):
    """Scale one (block, family)'s top singular directions over a range of positions (the proto's
    Intervention, validated: alignlens.service.server.validation)."""

    block: int  # 1..L
    family: int  # index into probe.names.FAMILIES
    directions: tuple[int, ...] = ()  # indices into the top-k basis; empty = all k
    scale: float = 0.0  # the component along the directions is multiplied by this
    start: int = 0  # first sequence position (prompt + completion, 0-based)
    end: int | None = None  # exclusive; None = to the end


class CaptureOptions(msgspec.Struct, frozen=True, omit_defaults=True):
    """Per-request options, from the server to the worker: what to capture, what to change."""

    rid: str  # the engine request id records are routed by (CaptureEngine sets it; vLLM adds its own suffix internally)
    detail: Detail = Detail.NONE  # run the probe at this detail (NONE: rows only, e.g. for trace)
    resid: bool = False  # ship the bulk rows (`alignlens trace`)
    replay_from: int | None = None  # audit: capture the rows deciding prompt tokens replay_from..
    rows: bool = True  # capture rows and send a record per decided token (False: interventions only)
    interventions: tuple[Intervention, ...] = ()

    def extra_args(self) -> dict:
        """The `SamplingParams.extra_args` entry carrying these options."""
        return {OPTIONS_KEY: msgspec.to_builtins(self)}

    @classmethod
    def from_extra_args(cls, extra_args: dict | None) -> "CaptureOptions | None":
        """The options of a request, or None when it did not ask for capture."""
        raw = (extra_args or {}).get(OPTIONS_KEY)
        return None if raw is None else msgspec.convert(raw, cls)


class TokenRecord(msgspec.Struct, omit_defaults=True):
    """One captured decision: the token and its attribution, or why there is none."""

    rid: str
    kind: Kind
    index: int
    token: int
    attr: TokenAttribution | None = None
    error: str | None = None
    resid: bytes | None = None
    resid_mid: bytes | None = None


class StepMessage(msgspec.Struct):
    """One message of the side channel: the records of one emitter work item."""

    step: int  # the worker's step counter
    attr_seconds: float  # probe time spent on these records
    n_blocks: int  # L
    d_model: int
    dtype: str  # numpy dtype name of resid / resid_mid
    records: list[TokenRecord]

    def tensors(self, record: TokenRecord) -> dict[str, np.ndarray]:
        """A record's bulk rows as arrays: {resid: [L+1, d], resid_mid: [L, d]} (copies)."""
        dtype, L, d = np.dtype(self.dtype), self.n_blocks, self.d_model
        return {RESID: np.frombuffer(record.resid, dtype=dtype).reshape(L + 1, d).copy(),
                RESID_MID: np.frombuffer(record.resid_mid, dtype=dtype).reshape(L, d).copy()}


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(StepMessage)


def encode_step(message: StepMessage) -> bytes:
    return _encoder.encode(message)


def decode_step(payload: bytes) -> StepMessage:
    return _decoder.decode(payload)


class RecordError(RuntimeError):
    """The worker could not attribute a token (e.g. the probe failed); the request fails with it."""
