"""TLS, mutual TLS and bearer tokens on the real `alignlens serve`, with certificates made here.

A CA signs the server's certificate (for 127.0.0.1 / localhost) and a client certificate; a second,
rogue CA signs a client certificate of its own. Two servers (tiny random Llama, no probe, eager):
one with TLS + bearer tokens + a plaintext health-only port, one with mutual TLS.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import threading
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from alignlens.service.client import AttributionClient, pb2
from alignlens.service.server import security
from tests.support.servers import started
from tools.serve_process import ServeProcess, free_port

ALICE = "alice-token-0123456789abcdef"  # limit=1
BOB = "bob-token-fedcba9876543210xyz"


# --- certificates ---------------------------------------------------------------------------------

def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject_key, subject: str, issuer_key, issuer: str, *, ca: bool = False, server: bool = False):
    now = dt.datetime.now(dt.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
         .public_key(subject_key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
    if not ca:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _write(folder: Path, name: str, key, cert) -> tuple[str, str]:
    kp, cp = folder / f"{name}.key", folder / f"{name}.pem"
    kp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(kp), str(cp)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("pki")
    out = {}
    for ca_name in ("ca", "rogue-ca"):
        ca_key = _key()
        _, out[ca_name] = _write(d, ca_name, ca_key, _cert(ca_key, ca_name, ca_key, ca_name, ca=True))
        client_key = _key()
        out[f"{ca_name}-client.key"], out[f"{ca_name}-client"] = _write(
            d, f"{ca_name}-client", client_key, _cert(client_key, "client", ca_key, ca_name))
        if ca_name == "ca":
            server_key = _key()
            out["server.key"], out["server"] = _write(d, "server", server_key,
                                                      _cert(server_key, "localhost", ca_key, ca_name, server=True))
    return out


def _start(tiny_llama, log: Path, client_options: dict, *extra: str, env: dict | None = None) -> ServeProcess:
    return started(["--model", str(tiny_llama), "--probe", "none", "--enforce-eager", "--max-model-len", "256",
                    *extra], log, env=env, client_options=client_options)


@pytest.fixture(scope="module")
def tls_server(tiny_llama, pki, tmp_path_factory):
    import os

    d = tmp_path_factory.mktemp("tls-server")
    tokens = d / "tokens"
    tokens.write_text(f"# who may call\n{ALICE} limit=1 name=alice\n")
    env = {**os.environ, security.TOKENS_ENV: f"{BOB} name=bob"}  # tokens from the file and the variable
    health_port, http_port = free_port(), free_port()
    srv = _start(tiny_llama, d / "server.log", {"ca_file": pki["ca"]}, "--tls-cert", pki["server"], "--tls-key",
                 pki["server.key"], "--auth-token-file", str(tokens), "--health-port", str(health_port),
                 "--http-port", str(http_port), env=env)
    srv.health_port = health_port
    srv.http = f"https://127.0.0.1:{http_port}/v1"
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def mtls_server(tiny_llama, pki, tmp_path_factory):
    d = tmp_path_factory.mktemp("mtls-server")
    opts = {"ca_file": pki["ca"], "cert_file": pki["ca-client"], "key_file": pki["ca-client.key"]}
    http_port = free_port()
    srv = _start(tiny_llama, d / "server.log", opts, "--tls-cert", pki["server"], "--tls-key", pki["server.key"],
                 "--tls-client-ca", pki["ca"], "--http-port", str(http_port))
    srv.http = f"https://127.0.0.1:{http_port}/v1"
    yield srv
    srv.stop()


def _code(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def _info(client: AttributionClient):
    return lambda: client.model_info(timeout_s=10)


# --- tokens, without a server ---------------------------------------------------------------------

def test_token_file_format_and_errors(tmp_path):
    tokens = security.parse_tokens(f"{ALICE} limit=2 name=a  # comment\n\n{BOB};{'c' * 20} name=c", "f")
    assert [(t.name, t.limit) for t in tokens] == [("a", 2), ("f:3", None), ("c", None)]
    assert all(ALICE not in repr(t) for t in tokens)  # only digests are kept
    for text, needle in (("short limit=1", "at least 16"), (f"{ALICE} limit=0", "limit=N"),
                         (f"{ALICE} colour=red", "limit=N"), (f"{ALICE}\n{ALICE}", "twice")):
        with pytest.raises(security.SecurityConfigError, match=needle):
            security.parse_tokens(text, "f")
    with pytest.raises(security.SecurityConfigError, match="--auth-token-file .*missing"):
        security.load_tokens(str(tmp_path / "missing"))
    gate = security.Gate(security.parse_tokens(f"{ALICE}\n{BOB}", "f"))
    assert gate.authenticate((("authorization", f"Bearer {BOB}"),)).name == "f:2"
    for metadata in ((), (("authorization", ALICE),), (("authorization", f"Bearer {ALICE}x"),),
                     (("authorization", f"Basic {ALICE}"),)):
        assert gate.authenticate(metadata) is None, metadata


def test_server_refuses_bad_security_settings(tiny_llama, pki, tmp_path):
    import subprocess
    import sys

    from tools.serve_process import REPO

    for args, needle in ((["--tls-cert", pki["server"]], "--tls-cert and --tls-key"),
                         (["--tls-client-ca", pki["ca"]], "--tls-client-ca needs"),
                         (["--tls-cert", pki["server"], "--tls-key", str(tmp_path / "nope")], "--tls-key"),
                         (["--auth-token-file", str(tmp_path / "nope")], "--auth-token-file")):
        out = subprocess.run([sys.executable, "-m", "alignlens.service.cli", "serve", "--model", str(tiny_llama),
                              "--port", str(free_port()), "--metrics-port", str(free_port()), *args],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and needle in out.stderr, (args, out.stderr[-1500:])


# --- TLS + tokens ---------------------------------------------------------------------------------

def test_tls_refuses_plaintext_and_unknown_servers(tls_server, pki):
    with AttributionClient(tls_server.target, token=BOB) as plain:
        assert _code(_info(plain)) == grpc.StatusCode.UNAVAILABLE
    with AttributionClient(tls_server.target, ca_file=pki["rogue-ca"], token=BOB) as wrong_ca:
        assert _code(_info(wrong_ca)) == grpc.StatusCode.UNAVAILABLE
    with AttributionClient(tls_server.target, ca_file=pki["ca"], token=BOB) as good:
        assert good.model_info(timeout_s=10).n_layers > 0


def test_tokens_missing_wrong_and_valid(tls_server, pki):
    def count() -> float:
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        text = urllib.request.urlopen(tls_server.metrics_url, timeout=10).read().decode()
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "alignlens_requests_total" and s.labels.get("code") == "UNAUTHENTICATED")

    before = count()
    messages = set()
    for token in (None, "not-a-valid-token-at-all", ALICE + "x", BOB[:-1]):
        with AttributionClient(tls_server.target, ca_file=pki["ca"], token=token) as client:
            for call in (_info(client), lambda: list(client.generate("Hi", max_tokens=2, timeout_s=10)),
                         lambda: client.audit("Hi", " there", timeout_s=10)):
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, token
                messages.add(err.value.details())
            assert client.health() == "SERVING"  # health needs no token
    assert len(messages) == 1 and not any(t[:6] in m for m in messages for t in (ALICE, BOB)), messages
    assert count() - before == 12
    for token in (ALICE, BOB):
        with AttributionClient(tls_server.target, ca_file=pki["ca"], token=token) as client:
            tokens = list(client.generate("Hello", max_tokens=3, detail="none", timeout_s=60))
            assert len(tokens) == 3
    # reflection is guarded too; the plaintext health-only port answers health and nothing else
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    ca = Path(pki["ca"]).read_bytes()
    with grpc.secure_channel(tls_server.target, grpc.ssl_channel_credentials(ca)) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                           timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        replies = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                 timeout=10, metadata=(("authorization", f"Bearer {BOB}"),)))
        assert "alignlens.v1.AttributionService" in str(replies[0])
    with grpc.insecure_channel(f"127.0.0.1:{tls_server.health_port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = pb2.DESCRIPTOR  # the AttributionService is not on this port
        with pytest.raises(grpc.RpcError) as err:
            channel.unary_unary("/alignlens.v1.AttributionService/GetModelInfo")(b"", timeout=10)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED, stub


def test_per_token_concurrency_limit(tls_server, pki):
    with AttributionClient(tls_server.target, ca_file=pki["ca"], token=ALICE) as alice, \
            AttributionClient(tls_server.target, ca_file=pki["ca"], token=BOB) as bob:
        long = alice.generate("Count:", max_tokens=200, ignore_eos=True, detail="none", timeout_s=120)
        first = threading.Event()

        def consume() -> None:
            for n, _token in enumerate(long):
                if n == 0:
                    first.set()
                if n == 30:
                    long.cancel()
                    return

        worker = threading.Thread(target=consume)
        worker.start()
        try:
            assert first.wait(60)
            with pytest.raises(grpc.RpcError) as err:
                list(alice.generate("Hi", max_tokens=2, detail="none", timeout_s=30))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "limit" in err.value.details()
            assert _code(_info(alice)) == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert len(list(bob.generate("Hi", max_tokens=2, detail="none", timeout_s=60))) == 2  # bob: no limit
        finally:
            worker.join(120)
        deadline = time.monotonic() + 10  # the cancelled call gives its place back
        while _code(_info(alice)) != grpc.StatusCode.OK and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _code(_info(alice)) == grpc.StatusCode.OK


def test_http_api_takes_the_same_tls_tokens_and_limits(tls_server, pki):
    """The OpenAI-compatible port is HTTPS with the gRPC port's certificate, takes the same bearer
    tokens (401 with one fixed message otherwise) and counts a token's calls across both ports."""
    import httpx
    import openai

    body = {"prompt": "Hello", "max_tokens": 2}
    with httpx.Client(verify=pki["ca"], timeout=60) as http:
        messages = set()
        for token in (None, "not-a-valid-token-at-all", ALICE + "x"):
            headers = {"authorization": f"Bearer {token}"} if token else {}
            r = http.post(f"{tls_server.http}/completions", json=body, headers=headers)
            assert r.status_code == 401, (token, r.text)
            messages.add(r.json()["error"]["message"])
        assert len(messages) == 1 and ALICE[:6] not in messages.pop()
        assert http.get(f"{tls_server.http}/models").status_code == 401
        with openai.OpenAI(base_url=tls_server.http, api_key=BOB, http_client=httpx.Client(verify=pki["ca"]),
                           max_retries=0) as sdk:
            model = sdk.models.list().data[0].id
            assert sdk.completions.create(model=model, prompt="Hello", max_tokens=3).usage.completion_tokens == 3
        with pytest.raises(httpx.ConnectError):  # an untrusted certificate is refused
            httpx.post(f"{tls_server.http}/completions", json=body, verify=pki["rogue-ca"], timeout=10)
        with pytest.raises(httpx.HTTPError):  # plaintext HTTP is not served on the TLS port
            httpx.post(tls_server.http.replace("https", "http") + "/completions", json=body, timeout=10)
        # alice (limit=1) with a gRPC stream in flight is refused on the HTTP port too
        with AttributionClient(tls_server.target, ca_file=pki["ca"], token=ALICE) as alice:
            long = alice.generate("Count:", max_tokens=200, ignore_eos=True, detail="none", timeout_s=120)
            tokens = iter(long)
            next(tokens)
            r = http.post(f"{tls_server.http}/completions", json=body, headers={"authorization": f"Bearer {ALICE}"})
            assert r.status_code == 429 and "limit" in r.json()["error"]["message"]
            long.cancel()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            r = http.post(f"{tls_server.http}/completions", json=body, headers={"authorization": f"Bearer {ALICE}"})
            if r.status_code == 200:
                break
            time.sleep(0.2)
        assert r.status_code == 200, r.text


# --- mutual TLS -----------------------------------------------------------------------------------

def test_mtls_requires_a_client_certificate_from_its_ca(mtls_server, pki):
    ca = pki["ca"]
    with AttributionClient(mtls_server.target, ca_file=ca) as no_cert:
        assert _code(_info(no_cert)) == grpc.StatusCode.UNAVAILABLE
    with AttributionClient(mtls_server.target, ca_file=ca, cert_file=pki["rogue-ca-client"],
                           key_file=pki["rogue-ca-client.key"]) as rogue:
        assert _code(_info(rogue)) == grpc.StatusCode.UNAVAILABLE
    with AttributionClient(mtls_server.target) as plain:
        assert _code(_info(plain)) == grpc.StatusCode.UNAVAILABLE
    with AttributionClient(mtls_server.target, ca_file=ca, cert_file=pki["ca-client"],
                           key_file=pki["ca-client.key"]) as good:
        assert good.model_info(timeout_s=10).n_layers > 0
        assert len(list(good.generate("Hello", max_tokens=3, detail="none", timeout_s=60))) == 3
    import httpx  # the HTTP port requires the same client certificate

    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{mtls_server.http}/models", verify=ca, timeout=10)
    import ssl

    context = ssl.create_default_context(cafile=ca)
    context.load_cert_chain(pki["ca-client"], pki["ca-client.key"])
    r = httpx.get(f"{mtls_server.http}/models", verify=context, timeout=10)
    assert r.status_code == 200 and r.json()["data"]


def test_cli_speaks_tls_and_tokens(mtls_server, tls_server, pki, tmp_path):
    import json
    import os
    import subprocess
    import sys

    from tools.serve_process import REPO

    cli = [sys.executable, "-m", "alignlens.service.cli", "info", "--wait-seconds", "0"]
    token_file = tmp_path / "token"
    token_file.write_text(BOB + "\n")
    out = subprocess.run([*cli, "--target", tls_server.target, "--tls-ca", pki["ca"], "--token-file", str(token_file)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and json.loads(out.stdout)["n_layers"] > 0, out.stderr[-1500:]
    env = {**os.environ, "ALIGNLENS_TLS_CA": pki["ca"], "ALIGNLENS_TLS_CERT": pki["ca-client"],
           "ALIGNLENS_TLS_KEY": pki["ca-client.key"]}
    out = subprocess.run([*cli, "--target", mtls_server.target], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0 and json.loads(out.stdout)["n_layers"] > 0, out.stderr[-1500:]
