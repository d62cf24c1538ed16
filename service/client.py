"""A Python client for the attribution service (synchronous; thread-safe like a grpc channel).

    with AttributionClient("localhost:50051") as client:
        client.wait_ready()
        stream = client.generate("The capital of France is", max_tokens=8, temperature=0)
        for token in stream:                      # pb2.Token, one per emitted token
            print(token.text, token.attribution.crystallization_depth)
        print(stream.finished.finish_reason)      # pb2.Finished, once the stream ended
        audit = client.audit(stream.finished.prompt_token_ids, [t.token_id for t in stream.tokens])

Prompts are given as text (str), token ids (list[int]) or chat turns (list of
{"role", "content"} dicts). Errors are grpc.RpcError; `field_violations(err)` reads which
request field an INVALID_ARGUMENT named.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from alignlens.service.protos import MAX_MESSAGE_BYTES, load
from alignlens.service.server.convert import DETAIL_BY_NAME

pb2, pb2_grpc = load()

DEFAULT_TARGET = "localhost:50051"

PromptLike = str | Sequence[int] | Sequence[dict]


def make_prompt(prompt: PromptLike) -> "pb2.Prompt":
    """str -> text, list of ints -> token ids, list of {"role", "content"} -> chat."""
    if isinstance(prompt, str):
        return pb2.Prompt(text=prompt)
    items = list(prompt)
    if items and all(isinstance(m, dict) for m in items):
        return pb2.Prompt(chat=pb2.Chat(messages=[pb2.ChatMessage(role=m["role"], content=m["content"])
                                                  for m in items]))
    return pb2.Prompt(token_ids=pb2.TokenIds(ids=items))


def intervention(block: int, family: str, directions: Sequence[int] = (), scale: float = 0.0,
                 start_position: int = 0, end_position: int | None = None) -> "pb2.Intervention":
    """An Intervention message: scale `family`'s ("qkv", "attn_out", "mlp_in") top directions of
    `block` (1..L) by `scale` (0 ablates) from `start_position` on; empty `directions` = all k."""
    msg = pb2.Intervention(block=block, family=pb2.Family.Value(f"FAMILY_{family.upper()}"),
                           directions=list(directions), scale=scale, start_position=start_position)
    if end_position is not None:
        msg.end_position = end_position
    return msg


def parse_intervention(spec: str) -> "pb2.Intervention":
    """`BLOCK:FAMILY[:DIRS[:SCALE[:START[:END]]]]` -> Intervention. DIRS is comma-separated indices or
    empty / `all`; SCALE defaults to 0 (ablation). Example: `24:mlp_in:0,1:0` ablates directions 0 and 1."""
    parts = spec.split(":")
    if not 2 <= len(parts) <= 6:
        raise ValueError(f"intervention {spec!r}: expected BLOCK:FAMILY[:DIRS[:SCALE[:START[:END]]]]")
    try:
        block, family = int(parts[0]), parts[1]
        dirs = [] if len(parts) < 3 or parts[2] in ("", "all") else [int(d) for d in parts[2].split(",")]
        scale = float(parts[3]) if len(parts) > 3 and parts[3] else 0.0
        start = int(parts[4]) if len(parts) > 4 and parts[4] else 0
        end = int(parts[5]) if len(parts) > 5 and parts[5] else None
        return intervention(block, family, dirs, scale, start, end)
    except ValueError as exc:
        raise ValueError(f"intervention {spec!r}: {exc}") from None


def field_violations(err: grpc.RpcError) -> list[tuple[str, str]]:
    """(field, description) pairs of an INVALID_ARGUMENT's google.rpc.BadRequest detail."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(err)
    out = []
    for detail in status.details if status is not None else ():
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            out += [(v.field, v.description) for v in bad.field_violations]
    return out


class _TokenStream:
    """A server stream of token messages ending with one last message in field `_last`: iterate for
    the pb2.Token messages; afterwards the last one is an attribute of that name."""

    _last = ""

    def __init__(self, call):
        self._call = call
        self.request_id = ""
        self.tokens: list = []  # every Token received so far
        setattr(self, self._last, None)

    def __iter__(self) -> Iterator:
        for response in self._call:
            self.request_id = response.request_id
            if response.HasField("token"):
                self.tokens.append(response.token)
                yield response.token
            else:
                setattr(self, self._last, getattr(response, self._last))

    def cancel(self) -> None:
        """Cancel the call; the server aborts the engine request."""
        self._call.cancel()

    @property
    def text(self) -> str:
        return "".join(t.text for t in self.tokens)


class GenerateStream(_TokenStream):
    """Iterate for pb2.Token messages; afterwards `finished` is the pb2.Finished message."""

    _last = "finished"


class AuditStream(_TokenStream):
    """Iterate for pb2.Token messages; afterwards `summary` is the pb2.AuditSummary."""

    _last = "summary"


def _audit_request(prompt, completion, detail, request_id, interventions, causal_indices,
                   causal_pairs) -> "pb2.AuditRequest":
    request = pb2.AuditRequest(prompt=make_prompt(prompt), detail=DETAIL_BY_NAME[detail], request_id=request_id,
                               interventions=list(interventions), causal_indices=list(causal_indices),
                               causal_pairs=causal_pairs)
    if isinstance(completion, str):
        request.completion_text = completion
    else:
        request.completion_token_ids.ids.extend(completion)
    return request


class AttributionClient:
    """Client of alignlens.v1.AttributionService plus the standard health service."""

    def __init__(self, target: str = DEFAULT_TARGET, timeout_s: float | None = None, *, tls: bool = False,
                 ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None,
                 server_name: str | None = None, token: str | None = None):
        """`tls` (implied by any of the files): verify the server against `ca_file` (default: the
        system's roots); `cert_file` + `key_file`: this client's certificate for mutual TLS;
        `server_name`: the name the server's certificate must carry when it is not the target's
        host; `token`: sent as `authorization: Bearer <token>` with every call."""
        self.target = target
        self.timeout_s = timeout_s  # default deadline of every call (None: none)
        options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
        if tls or ca_file or cert_file or key_file:
            if bool(cert_file) != bool(key_file):
                raise ValueError("a client certificate needs both cert_file and key_file")

            def read(path):
                with open(path, "rb") as fh:
                    return fh.read()

            credentials = grpc.ssl_channel_credentials(
                root_certificates=read(ca_file) if ca_file else None,
                private_key=read(key_file) if key_file else None,
                certificate_chain=read(cert_file) if cert_file else None)
            if server_name:
                options.append(("grpc.ssl_target_name_override", server_name))
            self.channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.stub = pb2_grpc.AttributionServiceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def __enter__(self) -> "AttributionClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _timeout(self, timeout_s: float | None) -> float | None:
        return timeout_s if timeout_s is not None else self.timeout_s

    def generate(self, prompt: PromptLike, *, max_tokens: int | None = None, temperature: float | None = None,
                 top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                 stop: Sequence[str] = (), ignore_eos: bool = False, detail: str = "unspecified",
                 request_id: str = "", interventions: Sequence = (), timeout_s: float | None = None) -> GenerateStream:
        """Start a Generate stream (unset sampling fields take the server's defaults). `interventions`:
        pb2.Intervention messages (see `intervention`, `parse_intervention`)."""
        sampling = pb2.SamplingParameters(stop=list(stop), ignore_eos=ignore_eos)
        for name, value in (("max_tokens", max_tokens), ("temperature", temperature), ("top_p", top_p),
                            ("top_k", top_k), ("seed", seed)):
            if value is not None:
                setattr(sampling, name, value)
        request = pb2.GenerateRequest(prompt=make_prompt(prompt), sampling=sampling, detail=DETAIL_BY_NAME[detail],
                                      request_id=request_id, interventions=list(interventions))
        return GenerateStream(self.stub.Generate(request, timeout=self._timeout(timeout_s), metadata=self.metadata))

    def audit(self, prompt: PromptLike, completion: str | Sequence[int], *, detail: str = "unspecified",
              request_id: str = "", interventions: Sequence = (), causal_indices: Sequence[int] = (),
              causal_pairs: int = 0, timeout_s: float | None = None) -> "pb2.AuditResponse":
        """Attribute a logged completion (text, or token ids for an exact replay), optionally replayed
        under `interventions`. detail "causal" adds each selected token's exact family_drop and
        family_refined (`causal_indices`; empty = all, for completions of at most 16 tokens);
        `causal_pairs` = k ablates only the probe's k largest pairs per token (0 = all 3L)."""
        request = _audit_request(prompt, completion, detail, request_id, interventions, causal_indices, causal_pairs)
        return self.stub.Audit(request, timeout=self._timeout(timeout_s), metadata=self.metadata)

    def audit_stream(self, prompt: PromptLike, completion: str | Sequence[int], *, detail: str = "unspecified",
                     request_id: str = "", interventions: Sequence = (), causal_indices: Sequence[int] = (),
                     causal_pairs: int = 0, timeout_s: float | None = None) -> "AuditStream":
        """`audit`, streamed: iterate for pb2.Token messages as the server attributes them; afterwards
        `summary` is the pb2.AuditSummary. For long completions."""
        request = _audit_request(prompt, completion, detail, request_id, interventions, causal_indices, causal_pairs)
        return AuditStream(self.stub.AuditStream(request, timeout=self._timeout(timeout_s), metadata=self.metadata))

    def model_info(self, timeout_s: float | None = None) -> "pb2.ModelInfo":
        return self.stub.GetModelInfo(pb2.GetModelInfoRequest(), timeout=self._timeout(timeout_s),
                                      metadata=self.metadata)

    def health(self, service: str = "", timeout_s: float | None = 5.0) -> str:
        """The health status name: SERVING, NOT_SERVING, ... (UNAVAILABLE if unreachable)."""
        try:
            response = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as err:
            return err.code().name
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_ready(self, timeout_s: float = 300.0, poll_s: float = 0.5) -> None:
        """Block until health is SERVING (the engine takes a while to start)."""
        deadline = time.monotonic() + timeout_s
        status = "UNKNOWN"
        while time.monotonic() < deadline:
            status = self.health()
            if status == "SERVING":
                return
            time.sleep(poll_s)
        raise TimeoutError(f"{self.target} not SERVING after {timeout_s:.0f} s (last status {status})")
