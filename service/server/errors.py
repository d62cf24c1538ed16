"""Typed service errors and their one mapping to gRPC status codes.

Handlers raise these (or let engine errors through); `status_for` is the only place that
decides which gRPC code a failure becomes. Messages name the field, the value and the limit,
in the style `prompt tokens (900) + max_tokens (200) must be <= 1024 (max_model_len)`.
INVALID_ARGUMENT also carries a `google.rpc.BadRequest` detail naming the field, so clients
can read it without parsing text (grpc examples/python/errors).

A probe failure in the worker arrives as an error record (engine.wire.RecordError): INTERNAL at
once, with the worker's reason. vLLM's own split is kept: EngineDeadError (the engine process is gone; nothing will work
until restart) is UNAVAILABLE, EngineGenerateError (one request failed) is INTERNAL.
"""

from __future__ import annotations

import asyncio

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2


class ServiceError(Exception):
    """Base of the errors a handler raises on purpose; `code` is the gRPC status."""

    code = grpc.StatusCode.INTERNAL


class InvalidArgument(ServiceError):
    """A request field is out of range. `field` is its path in the request message."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class FailedPrecondition(ServiceError):
    """The request is valid but the server is not set up for it (e.g. no probe loaded)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(ServiceError):
    """The bounded request queue is full; the client should retry later."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    """The engine is starting, dead, or the server is draining for shutdown."""

    code = grpc.StatusCode.UNAVAILABLE


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC code and message for any exception escaping a handler."""
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

    from alignlens.service.engine.wire import RecordError

    if isinstance(exc, ServiceError):
        return exc.code, str(exc)
    if isinstance(exc, EngineDeadError):
        return grpc.StatusCode.UNAVAILABLE, "the inference engine has died; the server must be restarted"
    if isinstance(exc, VLLMValidationError):  # a check validation.py missed: still the caller's input
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, EngineGenerateError):
        return grpc.StatusCode.INTERNAL, f"the engine failed this request: {exc}"
    if isinstance(exc, RecordError):  # the worker's probe failed for this request's tokens
        return grpc.StatusCode.INTERNAL, f"{exc}; the tokens themselves are fine: retry, or send detail NONE"
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return grpc.StatusCode.INTERNAL, f"attribution records did not arrive: {exc}"
    return grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"


def rich_status(exc: BaseException) -> tuple[grpc.StatusCode, str, status_pb2.Status]:
    """(code, message, google.rpc.Status with details) for `context.abort_with_status`."""
    code, message = status_for(exc)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=message)
    if isinstance(exc, InvalidArgument):
        detail = error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=exc.field, description=message)])
        status.details.add().Pack(detail)
    return code, message, status
