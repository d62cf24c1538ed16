"""Side channel from the vLLM worker to the server: compact per-token records.

Bulk activations never cross the engine's own RPC path (VLLM_NOTES.md: tensors in RPC
results arrive as nested lists). The worker PUSHes one `wire.StepMessage` per emitter work
item over a local ZeroMQ IPC socket; the server PULLs, decodes it into the same typed Structs
and routes each `TokenRecord` to the request that owns it. Nothing here imports vLLM.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import zmq
import zmq.asyncio

from alignlens.service.engine.wire import Kind, RecordError, StepMessage, TokenRecord, decode_step, encode_step

log = logging.getLogger(__name__)

def new_address(directory: str | None = None) -> str:
    """A fresh IPC address in a directory the project owns (TMPDIR by default)."""
    directory = directory or os.environ.get("ALIGNLENS_RUNTIME_DIR") or tempfile.gettempdir()
    os.makedirs(directory, exist_ok=True)
    return f"ipc://{os.path.join(directory, f'alignlens-capture-{uuid.uuid4().hex[:12]}.sock')}"


def _close_pull(sock, ctx, address: str) -> None:
    """Close a bound PULL socket and remove its IPC file."""
    sock.close(linger=0)
    ctx.term()
    path = address.removeprefix("ipc://")
    if os.path.exists(path):
        os.unlink(path)


@dataclass
class RequestRecords:
    """Records received for one request, keyed by (kind, index)."""

    records: dict[tuple[Kind, int], tuple[StepMessage, TokenRecord]] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class CaptureSink:
    """Server end of the side channel: PULL socket + per-request routing.

    A request must be `open`ed before it is submitted to the engine and `close`d when
    it finishes or is aborted; records for unknown requests are counted and dropped,
    so nothing outlives its request.
    """

    def __init__(self, address: str | None = None,
                 on_step: Callable[[StepMessage], None] | None = None):
        self.address = address or new_address()
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.RCVHWM, 0)
        self._sock.bind(self.address)
        self._requests: dict[str, RequestRecords] = {}
        self._task: asyncio.Task | None = None
        self._on_step = on_step
        self.dropped_records = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._pump(), name="capture-sink")

    async def _pump(self) -> None:
        while True:
            payload = await self._sock.recv()
            message = decode_step(payload)
            if self._on_step is not None:
                self._on_step(message)
            for rec in message.records:
                state = self._requests.get(rec.rid)
                if state is None:
                    self.dropped_records += 1
                    continue
                state.records[(rec.kind, rec.index)] = (message, rec)
                state.changed.set()

    def open(self, rid: str) -> None:
        if rid in self._requests:
            raise KeyError(f"request id {rid!r} is already in flight")
        self._requests[rid] = RequestRecords()

    def close(self, rid: str) -> None:
        self._requests.pop(rid, None)

    @property
    def open_requests(self) -> int:
        return len(self._requests)

    @property
    def buffered_records(self) -> int:
        return sum(len(s.records) for s in self._requests.values())

    async def take(self, rid: str, kind: Kind, index: int,
                   timeout_s: float | None = 30.0) -> tuple[StepMessage, TokenRecord]:
        """Wait for and remove the record deciding (kind, index) of request `rid` (timeout_s None:
        until it arrives or the caller is cancelled). RecordError when the worker sent an error
        record for it instead (the probe failed): the request fails at once, not at the timeout."""
        state = self._requests[rid]
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        while (kind, index) not in state.records:
            state.changed.clear()
            if deadline is None:
                await state.changed.wait()
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"no capture record for request {rid!r} {kind.value} index {index}")
            try:
                await asyncio.wait_for(state.changed.wait(), remaining)
            except asyncio.TimeoutError:
                continue
        message, record = state.records.pop((kind, index))
        if record.error is not None:
            raise RecordError(f"attribution of {kind.value} token {index} failed in the worker: {record.error}")
        return message, record

    def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
        _close_pull(self._sock, self._ctx, self.address)


class SyncCaptureSink:
    """Blocking PULL end for the in-process (multiprocessing off) engine: drain after a batch."""

    def __init__(self, address: str | None = None):
        self.address = address or new_address()
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.RCVHWM, 0)
        self._sock.bind(self.address)

    def drain(self, expected_records: int, timeout_s: float = 30.0) -> list[tuple[StepMessage, TokenRecord]]:
        """Receive until `expected_records` records arrived; returns (message, record) pairs."""
        got: list[tuple[StepMessage, TokenRecord]] = []
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while len(got) < expected_records:
            if not poller.poll(int(timeout_s * 1000)):
                raise TimeoutError(f"capture: {len(got)} of {expected_records} records arrived")
            message = decode_step(self._sock.recv())
            for rec in message.records:
                if rec.error is not None:
                    raise RecordError(f"attribution of request {rec.rid!r} {rec.kind.value} token {rec.index} "
                                      f"failed in the worker: {rec.error}")
                got.append((message, rec))
        return got

    def shutdown(self) -> None:
        _close_pull(self._sock, self._ctx, self.address)


class CaptureSender:
    """Worker end of the side channel (blocking PUSH; no record is dropped)."""

    def __init__(self, address: str):
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.PUSH)
        self._sock.setsockopt(zmq.SNDHWM, 0)
        self._sock.setsockopt(zmq.LINGER, 5000)
        self._sock.connect(address)
        self.address = address

    def send(self, message: StepMessage) -> None:
        self._sock.send(encode_step(message), copy=False)

    def close(self) -> None:
        self._sock.close()
        self._ctx.term()
