"""Asyncio face of a decode worker (shared by its Ray actor and in-process use).

Commands (reserve/start/prefill_local/release/stats) run on the worker's ``StepLoop`` thread. Each
step's ``TokenBatch`` is pushed to every subscriber's asyncio queue; ``stream`` is an
async generator a router consumes for the worker's whole life: one message per decode
step carrying all of that step's tokens.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from pdserve.decode_worker.colocated import ColocatedWorker
from pdserve.decode_worker.messages import (
    ColocatedRequest,
    LocalPrefillRequest,
    Reservation,
    ReserveRequest,
    StartDecode,
    TokenBatch,
)
from pdserve.decode_worker.worker import DecodeWorker
from pdserve.engine.worker_host import WorkerHost


class DecodeHost(WorkerHost):
    """Hosts a ``DecodeWorker`` or a ``ColocatedWorker`` (same streaming interface)."""

    def __init__(self, worker: DecodeWorker | ColocatedWorker):
        self._subscribers: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = []
        super().__init__(worker, on_step=self._publish, name=f"decode-{worker.worker_id}")

    def _publish(self, batch: TokenBatch | None) -> None:
        if batch is None:
            return
        for loop, q in list(self._subscribers):
            loop.call_soon_threadsafe(q.put_nowait, batch)

    async def reserve(self, msg: ReserveRequest) -> Reservation:
        return await self._call(lambda: self.worker.reserve(msg))

    async def submit(self, msg: ColocatedRequest) -> None:
        """Colocated workers only: a whole request, first token through ``stream``."""
        return await self._call(lambda: self.worker.submit(msg))

    async def prefill_local(self, msg: LocalPrefillRequest) -> None:
        return await self._call(lambda: self.worker.prefill_local(msg))

    async def start(self, msg: StartDecode) -> None:
        return await self._call(lambda: self.worker.start(msg))

    async def release(self, request_id: str) -> bool:
        return await self._call(lambda: self.worker.release(request_id))

    async def stream(self) -> AsyncIterator[TokenBatch]:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[TokenBatch] = asyncio.Queue()
        entry = (loop, q)
        self._subscribers.append(entry)
        try:
            while True:
                yield await q.get()
        finally:
            self._subscribers.remove(entry)

    def close(self) -> None:
        self._loop.stop()
        self.worker.runner.close()  # a TP rank 0 releases its followers
        receiver = getattr(self.worker, "receiver", None)
        if receiver is not None:
            receiver.close()
