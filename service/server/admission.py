"""Admission control: a fixed number of engine slots and a bounded waiting room.

The server lets at most `slots` requests (the engine's max_num_seqs) into the engine at once,
so that vLLM's scheduler never queues work the server cannot see: the server's waiting room
is then the real queue, its length is `alignlens_requests_waiting`, and when `max_queue`
requests already wait a new one is refused with RESOURCE_EXHAUSTED instead of piling up
latency for everyone. A request leaves its slot however it ends (finish, error, cancel,
deadline), which is what brings `alignlens_requests_running` back to 0.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from alignlens.service.server.errors import ResourceExhausted
from alignlens.service.server.metrics import ServiceMetrics


class Admission:
    """`async with admission.slot():` around everything a request does in the engine."""

    def __init__(self, slots: int, max_queue: int, metrics: ServiceMetrics):
        self.slots = slots
        self.max_queue = max_queue
        self._free = asyncio.Semaphore(slots)
        self._metrics = metrics
        self.running = 0
        self.waiting = 0
        self.admitted_total = 0  # requests that entered the engine, ever
        self._idle = asyncio.Event()
        self._idle.set()

    def _update(self) -> None:
        self._metrics.running.set(self.running)
        self._metrics.waiting.set(self.waiting)
        if self.running == 0 and self.waiting == 0:
            self._idle.set()
        else:
            self._idle.clear()

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Wait for an engine slot (ResourceExhausted when the waiting room is full)."""
        if self._free.locked() and self.waiting >= self.max_queue:
            raise ResourceExhausted(f"request queue is full: {self.waiting} requests waiting (max_queue "
                                    f"{self.max_queue}) and {self.running} running (engine slots "
                                    f"{self.slots}); retry later")
        self.waiting += 1
        self._update()
        try:
            await self._free.acquire()
        finally:
            self.waiting -= 1
            self._update()
        self.running += 1
        self.admitted_total += 1
        self._update()
        try:
            yield
        finally:
            self.running -= 1
            self._free.release()
            self._update()

    async def wait_idle(self, timeout_s: float) -> bool:
        """True once nothing runs or waits; False if `timeout_s` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False
