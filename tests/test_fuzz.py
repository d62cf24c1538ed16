"""Property-based fuzzing of the real server: a client's mistake is never INTERNAL or UNKNOWN.

Hypothesis draws Generate and Audit requests over the whole request space (every field, values in
and far out of range, NaN and infinities, unknown enum numbers, any unicode), raw bytes that are not
a protobuf message, and string fields holding invalid UTF-8. Each case must end OK or with a code
that blames the request (INVALID_ARGUMENT, FAILED_PRECONDITION, OUT_OF_RANGE), and the server must
answer health SERVING after it. One server (tiny random Llama, untrained probe, eager, 8 slots).

The examples are derandomized so CI sees the same cases every run; `HYPOTHESIS_PROFILE=explore`
draws new random ones (more of them) for a local search.
"""

from __future__ import annotations

import os

import grpc
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from alignlens.service.client import pb2
from tests.support.servers import started
from tests.support.tiny import make_probe_artifact

MAX_MODEL_LEN = 128
CLIENT_CODES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                grpc.StatusCode.OUT_OF_RANGE}
GENERATE, AUDIT, INFO = ("/alignlens.v1.AttributionService/" + m for m in ("Generate", "Audit", "GetModelInfo"))

settings.register_profile("ci", derandomize=True, database=None, deadline=None, max_examples=60,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("explore", deadline=None, max_examples=500,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="module")
def server(tiny_llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    probe = make_probe_artifact(tiny_llama, d / "tiny.safetensors")
    srv = started(["--model", str(tiny_llama), "--probe", str(probe), "--enforce-eager", "--max-model-len",
                   str(MAX_MODEL_LEN), "--max-num-seqs", "8"], d / "server.log")
    srv.channel = grpc.insecure_channel(srv.target)
    yield srv
    srv.channel.close()
    srv.stop()


# --- strategies over the request space ------------------------------------------------------------

u32 = st.one_of(st.integers(0, 40), st.integers(0, 2**32 - 1))
small_or_huge = st.one_of(st.integers(0, 6), st.sampled_from([127, 128, 1000, 2**31, 2**32 - 1]))
floats = st.floats(width=32, allow_nan=True, allow_infinity=True)
texts = st.text(max_size=40)
enum_values = st.one_of(st.integers(0, 5), st.integers(-(2**31), 2**31 - 1))


def _prompt():
    chat = st.lists(st.builds(pb2.ChatMessage, role=st.one_of(st.sampled_from(["user", "assistant", "system"]), texts),
                              content=texts), max_size=4)
    return st.one_of(
        st.none(),
        st.builds(lambda t: pb2.Prompt(text=t), texts),
        st.builds(lambda ids: pb2.Prompt(token_ids=pb2.TokenIds(ids=ids)), st.lists(u32, max_size=20)),
        st.builds(lambda ms: pb2.Prompt(chat=pb2.Chat(messages=ms)), chat))


def _interventions():
    one = st.builds(lambda b, f, d, s, a, e: pb2.Intervention(block=b, family=f, directions=d, scale=s,
                                                              start_position=a, **({} if e is None else
                                                                                   {"end_position": e})),
                    u32, enum_values, st.lists(u32, max_size=5), floats, u32, st.none() | u32)
    return st.lists(one, max_size=3)


@st.composite
def generate_requests(draw):
    sampling = pb2.SamplingParameters(stop=draw(st.lists(texts, max_size=3)), ignore_eos=draw(st.booleans()))
    for name, strategy in (("max_tokens", small_or_huge), ("temperature", floats), ("top_p", floats),
                           ("top_k", u32), ("seed", st.integers(0, 2**64 - 1))):
        value = draw(st.none() | strategy)
        if value is not None:
            setattr(sampling, name, value)
    prompt = draw(_prompt())
    return pb2.GenerateRequest(prompt=prompt, sampling=sampling, detail=draw(enum_values),
                               request_id=draw(st.text(max_size=150)), interventions=draw(_interventions()))


@st.composite
def audit_requests(draw):
    req = pb2.AuditRequest(prompt=draw(_prompt()), detail=draw(enum_values), request_id=draw(st.text(max_size=150)),
                           interventions=draw(_interventions()),
                           causal_indices=draw(st.lists(st.one_of(st.integers(0, 20), u32), max_size=4)))
    completion = draw(st.one_of(st.none(), texts, st.lists(u32, max_size=20)))
    if isinstance(completion, str):
        req.completion_text = completion
    elif completion is not None:
        req.completion_token_ids.ids.extend(completion)
    return req


# --- properties -----------------------------------------------------------------------------------

def _code(call) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as err:
        _event(err.code().name)
        return err.code(), err.details() or ""
    _event("OK")
    return grpc.StatusCode.OK, ""


def _event(code: str) -> None:
    """How the cases ended, for --hypothesis-show-statistics."""
    from hypothesis.control import currently_in_test_context

    if currently_in_test_context():
        event(code)


def _healthy(server) -> None:
    from alignlens.service.client import AttributionClient

    with AttributionClient(server.target) as client:
        assert client.health() == "SERVING"


@given(request=generate_requests())
def test_generate_request_space(server, request):
    stub = server.channel.unary_stream(GENERATE, request_serializer=pb2.GenerateRequest.SerializeToString,
                                       response_deserializer=pb2.GenerateResponse.FromString)
    code, details = _code(lambda: list(stub(request, timeout=60)))
    assert code in CLIENT_CODES, (code, details, request)
    _healthy(server)


@given(request=audit_requests())
def test_audit_request_space(server, request):
    stub = server.channel.unary_unary(AUDIT, request_serializer=pb2.AuditRequest.SerializeToString,
                                      response_deserializer=pb2.AuditResponse.FromString)
    code, details = _code(lambda: stub(request, timeout=60))
    assert code in CLIENT_CODES, (code, details, request)
    _healthy(server)


def _parses(message_type, data: bytes) -> bool:
    try:
        message_type.FromString(data)
    except DecodeError:
        return False
    return True


@given(data=st.binary(max_size=120), method=st.sampled_from([GENERATE, AUDIT, INFO]))
def test_raw_bytes_are_invalid_argument(server, data, method):
    """Bytes sent as the request body: INVALID_ARGUMENT when they are not the message, never UNKNOWN."""
    message_type = {GENERATE: pb2.GenerateRequest, AUDIT: pb2.AuditRequest, INFO: pb2.GetModelInfoRequest}[method]
    if method == GENERATE:
        call = lambda: list(server.channel.unary_stream(method)(data, timeout=60))  # noqa: E731
    else:
        call = lambda: server.channel.unary_unary(method)(data, timeout=60)  # noqa: E731
    code, details = _code(call)
    if _parses(message_type, data):
        assert code in CLIENT_CODES, (code, details, data)
    else:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details, data)
        assert message_type.DESCRIPTOR.full_name in details, details
    _healthy(server)


def test_invalid_utf8_in_string_fields(server):
    """proto3 strings must be UTF-8: a client that puts other bytes there gets INVALID_ARGUMENT."""
    cases = [
        (GENERATE, pb2.GenerateRequest(prompt=pb2.Prompt(text="AAAA")).SerializeToString()),
        (GENERATE, pb2.GenerateRequest(prompt=pb2.Prompt(text="Hi"), request_id="AAAA").SerializeToString()),
        (GENERATE, pb2.GenerateRequest(prompt=pb2.Prompt(chat=pb2.Chat(messages=[pb2.ChatMessage(
            role="user", content="AAAA")]))).SerializeToString()),
        (GENERATE, pb2.GenerateRequest(prompt=pb2.Prompt(text="Hi"), sampling=pb2.SamplingParameters(
            stop=["AAAA"])).SerializeToString()),
        (AUDIT, pb2.AuditRequest(prompt=pb2.Prompt(text="Hi"), completion_text="AAAA").SerializeToString()),
    ]
    for method, good in cases:
        for bad_bytes in (b"\xff\xfe\xfd\xfc", b"\xc3\x28AA", b"\xed\xa0\x80A"):  # invalid, overlong, surrogate
            data = good.replace(b"AAAA", bad_bytes)
            stub = server.channel.unary_stream(method) if method == GENERATE else server.channel.unary_unary(method)
            code, details = _code(lambda: list(stub(data, timeout=60)) if method == GENERATE else stub(data, timeout=60))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, data, code, details)
    _healthy(server)
    # and the server still serves real work afterwards
    stub = server.channel.unary_stream(GENERATE, request_serializer=pb2.GenerateRequest.SerializeToString,
                                       response_deserializer=pb2.GenerateResponse.FromString)
    out = list(stub(pb2.GenerateRequest(prompt=pb2.Prompt(text="Hello"), sampling=pb2.SamplingParameters(
        max_tokens=3)), timeout=60))
    assert sum(r.HasField("token") for r in out) == 3
