"""Asyncio face of a prefill worker: the same object serves a Ray actor and in-process use.

The worker runs on its ``StepLoop`` thread; ``prefill`` posts the request there and
awaits the ``PrefillResult`` that the loop hands back (via ``call_soon_threadsafe``)
when the first token is sampled. A Ray actor (``actor.py``) only forwards to this
class, so GPU hosts without Ray drive the very same code.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

from pdserve.engine.worker_host import WorkerHost
from pdserve.prefill_worker.messages import PrefillRequest, PrefillResult
from pdserve.prefill_worker.worker import PrefillWorker


class PrefillHost(WorkerHost):
    def __init__(self, worker: PrefillWorker):
        self._waiters: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        super().__init__(worker, on_step=self._deliver, name=f"prefill-{worker.worker_id}")

    def _deliver(self, results: list[PrefillResult]) -> None:
        for r in results:
            waiter = self._waiters.pop(r.request_id, None)
            if waiter is not None:
                loop, fut = waiter
                r = dataclasses.replace(r, times=dataclasses.replace(r.times,
                                                                     replied=time.monotonic()))
                loop.call_soon_threadsafe(_set_result, fut, r)

    async def prefill(self, msg: PrefillRequest) -> PrefillResult:
        received = time.monotonic()
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._waiters[msg.request_id] = (loop, fut)
        try:
            await asyncio.wrap_future(self._loop.call(lambda: self.worker.add(msg, received)))
            return await fut
        except BaseException:
            # Cancelled by the router (client went away) or rejected: drop it on the worker.
            self._waiters.pop(msg.request_id, None)
            self._loop.post(lambda: self.worker.abort(msg.request_id))
            raise

    async def abort(self, request_id: str) -> bool:
        self._waiters.pop(request_id, None)
        return await asyncio.wrap_future(self._loop.call(lambda: self.worker.abort(request_id)))

    def close(self) -> None:
        self._loop.stop()
        if self.worker.sender is not None:
            self.worker.sender.close()


def _set_result(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)
