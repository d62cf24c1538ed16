"""Transport security and access control for the gRPC port: TLS / mTLS and bearer tokens.

- **TLS** (`--tls-cert`, `--tls-key`): the gRPC port speaks only TLS. With `--tls-client-ca` it
  is mutual TLS: a client must present a certificate signed by that CA, or the handshake fails.
- **Bearer tokens** (`--auth-token-file`, or the variable ALIGNLENS_AUTH_TOKENS; never a
  command-line value, which `ps` would show): every call must carry the metadata
  `authorization: Bearer <token>`. One token per line, `TOKEN [limit=N] [name=NAME]`; `#` starts a
  comment; in the variable, tokens may also be separated by `;`. `limit` caps the calls that one
  token may have in flight at once (over it: RESOURCE_EXHAUSTED); `name` is what logs say (a token
  is never logged). A presented token is compared with every configured token in constant time
  (SHA-256 digests, `hmac.compare_digest`, no early exit), so neither timing nor the error message
  (always the same) tells anything about the valid tokens.
- **Health stays open.** `grpc.health.v1.Health` needs no token: it answers only SERVING or
  NOT_SERVING, which is what Kubernetes, load balancers and `docker HEALTHCHECK` must read and they
  cannot send a token. Under TLS the port still needs a TLS handshake, which Kubernetes' own gRPC
  probe cannot do; `--health-port` therefore serves the health service (and nothing else) in
  plaintext on a second port for the probes. Reflection and every alignlens RPC need the token.
- **Payloads that are not the request message** (random bytes, invalid UTF-8 in a string field)
  are INVALID_ARGUMENT naming the message type, not the UNKNOWN that grpc would answer.

All of it is one grpc.aio server interceptor (`Gate`); it counts what it refuses in
`alignlens_requests_total{rpc, code}` like the handlers do.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

TOKENS_ENV = "ALIGNLENS_AUTH_TOKENS"
MIN_TOKEN_CHARS = 16
OPEN_SERVICES = ("/grpc.health.v1.Health/",)  # answered without a token (see the module docstring)
UNAUTHENTICATED_MESSAGE = "missing or invalid credentials: send the metadata 'authorization: Bearer <token>'"


def limit_message(token: Token) -> str:
    return f"this token already has {token.limit} calls in flight (its limit); retry when one finishes"


class SecurityConfigError(ValueError):
    """A TLS or token setting cannot be used; the message names the flag or file and line."""


@dataclass(frozen=True)
class Token:
    name: str
    digest: bytes  # SHA-256 of the token; the token itself is not kept
    limit: int | None  # calls in flight at once (None: no limit)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def parse_tokens(text: str, source: str) -> list[Token]:
    """Tokens from the file / variable format; SecurityConfigError names `source` and the line."""
    tokens: list[Token] = []
    entries = [(n, part) for n, line in enumerate(text.splitlines(), 1)
               for part in line.split("#", 1)[0].split(";")]
    for n, entry in entries:
        fields = entry.split()
        if not fields:
            continue
        secret, name, limit = fields[0], f"{source}:{n}", None
        if len(secret) < MIN_TOKEN_CHARS:
            raise SecurityConfigError(f"{source} line {n}: a token must be at least {MIN_TOKEN_CHARS} characters")
        for opt in fields[1:]:
            key, _, value = opt.partition("=")
            if key == "limit" and value.isdigit() and int(value) >= 1:
                limit = int(value)
            elif key == "name" and value:
                name = value
            else:
                raise SecurityConfigError(f"{source} line {n}: {opt!r} is not limit=N (N >= 1) or name=NAME")
        tokens.append(Token(name, _digest(secret), limit))
    if len({t.digest for t in tokens}) != len(tokens):
        raise SecurityConfigError(f"{source}: the same token is listed twice")
    return tokens


def load_tokens(token_file: str) -> list[Token]:
    """Tokens from `--auth-token-file` and ALIGNLENS_AUTH_TOKENS (both may be given); [] = no auth."""
    tokens: list[Token] = []
    if token_file:
        try:
            text = Path(token_file).read_text()
        except OSError as exc:
            raise SecurityConfigError(f"--auth-token-file {token_file}: {exc.strerror}") from None
        tokens += parse_tokens(text, token_file)
        if not tokens:
            raise SecurityConfigError(f"--auth-token-file {token_file}: no tokens in it")
    if os.environ.get(TOKENS_ENV, "").strip():
        tokens += parse_tokens(os.environ[TOKENS_ENV], TOKENS_ENV)
    if len({t.digest for t in tokens}) != len(tokens):
        raise SecurityConfigError(f"--auth-token-file and {TOKENS_ENV} list the same token")
    return tokens


def server_credentials(cert: str, key: str, client_ca: str) -> grpc.ServerCredentials | None:
    """TLS credentials for the gRPC port (None: plaintext); mTLS when `client_ca` is given."""
    if not (cert or key or client_ca):
        return None
    if client_ca and not cert:
        raise SecurityConfigError("--tls-client-ca needs --tls-cert and --tls-key")
    if not (cert and key):
        raise SecurityConfigError("--tls-cert and --tls-key must be given together")

    def read(flag: str, path: str) -> bytes:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise SecurityConfigError(f"{flag} {path}: {exc.strerror}") from None
        if b"-----BEGIN" not in data:
            raise SecurityConfigError(f"{flag} {path}: not a PEM file")
        return data

    pair = (read("--tls-key", key), read("--tls-cert", cert))
    ca = read("--tls-client-ca", client_ca) if client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


_KINDS = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
          (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}


class _Undecodable:
    """What the wrapped deserializer returns for bytes that are not the request message."""

    def __init__(self, error: Exception):
        self.error = error


def _abort_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers `code` without reading the request."""
    async def abort(_request_or_iterator, context):
        await context.abort(code, message)

    return _KINDS[handler.request_streaming, handler.response_streaming](abort)


class Gate(grpc.aio.ServerInterceptor):
    """Bearer-token check, per-token concurrency limits and request decoding, for every RPC."""

    def __init__(self, tokens: list[Token], metrics=None):
        self.tokens = tokens
        self.metrics = metrics
        self.in_flight: dict[bytes, int] = {t.digest: 0 for t in tokens}  # calls per token now

    def _count(self, method: str, code: grpc.StatusCode) -> None:
        if self.metrics is not None and not method.startswith(OPEN_SERVICES):
            self.metrics.requests.labels(method.rsplit("/", 1)[-1], code.name).inc()

    def authenticate(self, metadata) -> Token | None:
        """The token the call presented, or None (constant time over the configured tokens)."""
        presented = next((value for key, value in metadata or () if key == "authorization"), "")
        scheme, _, secret = (presented if isinstance(presented, str) else "").partition(" ")
        digest = _digest(secret.strip() if scheme.lower() == "bearer" else "\0")
        found = None
        for token in self.tokens:  # no early exit: every token is compared
            if hmac.compare_digest(digest, token.digest):
                found = token
        return found

    def enter(self, token: Token | None) -> bool:
        """Take one of the token's calls in flight; False when it is at its limit. No await between
        the check and the increment, so a burst cannot pass the limit together."""
        if token is None or token.limit is None:
            return True
        if self.in_flight[token.digest] >= token.limit:
            return False
        self.in_flight[token.digest] += 1
        return True

    def leave(self, token: Token | None) -> None:
        """Give back what `enter` took."""
        if token is not None and token.limit is not None:
            self.in_flight[token.digest] -= 1

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method
        token = None
        if self.tokens and not method.startswith(OPEN_SERVICES):
            token = self.authenticate(details.invocation_metadata)
            if token is None:
                self._count(method, grpc.StatusCode.UNAUTHENTICATED)
                return _abort_handler(handler, grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
        return self._wrap(handler, method, token)

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str, token: Token | None) -> grpc.RpcMethodHandler:
        """`handler` with its request decoding checked and the token's calls in flight limited.

        The limit is taken inside the call's own coroutine (`enter`) and given back however the
        call ends. The HTTP API takes the same limits, so a token's calls count across both ports.
        """
        gate = self
        deserialize = handler.request_deserializer
        owner = getattr(deserialize, "__self__", None)  # FromString is a classmethod of the message type
        message = getattr(getattr(owner, "DESCRIPTOR", None), "full_name", "request")

        def decode(data: bytes):
            try:
                return deserialize(data) if deserialize is not None else data
            except Exception as exc:  # noqa: BLE001 - any parse failure is the client's payload
                return _Undecodable(exc)

        async def enter(request, context) -> None:
            if isinstance(request, _Undecodable):
                gate._count(method, grpc.StatusCode.INVALID_ARGUMENT)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"the request body is not a valid {message} (RPC {method}): "
                                    f"{type(request.error).__name__}: {request.error}")
            if not gate.enter(token):
                gate._count(method, grpc.StatusCode.RESOURCE_EXHAUSTED)
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, limit_message(token))

        def leave() -> None:
            gate.leave(token)

        streaming_in = handler.request_streaming  # reflection: grpc decodes its messages one by one
        inner = (handler.stream_stream or handler.stream_unary) if streaming_in else \
            (handler.unary_stream or handler.unary_unary)
        if handler.response_streaming:
            async def behavior(request, context):
                await enter(None if streaming_in else request, context)
                try:
                    result = inner(request, context)
                    if inspect.isasyncgen(result):
                        async for response in result:
                            yield response
                    else:
                        await result
                finally:
                    leave()
        else:
            async def behavior(request, context):
                await enter(None if streaming_in else request, context)
                try:
                    result = inner(request, context)
                    return await result if inspect.isawaitable(result) else result
                finally:
                    leave()
        return _KINDS[streaming_in, handler.response_streaming](
            behavior, request_deserializer=deserialize if streaming_in else decode,
            response_serializer=handler.response_serializer)
