"""Asyncio face of a prefill worker: the same object serves a Ray actor and in-process use.

The worker runs on its ``StepLoop`` thread; ``prefill`` posts the request there and
awaits the ``PrefillResult`` that the loop hands back (via ``call_soon_threadsafe``)
when the first token is sampled. A Ray actor (``actor.py``) only forwards to this
class, so GPU hosts without Ray drive the very same code.
"""

from __future__ import annotations

import asyncio
import time

from pdserve.engine.worker_host import WorkerHost
from pdserve.kv_transfer.messages import KVDestination
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
                loop.call_soon_threadsafe(_set_result, fut, r)

    async def prefill(self, msg: PrefillRequest) -> PrefillResult:
        received = time.monotonic()
        if msg.request_id in self._waiters:  # (its waiter must not be replaced: it would hang)
            raise ValueError(f"request {msg.request_id} is already queued on "
                             f"{self.worker.worker_id}")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._waiters[msg.request_id] = (loop, fut)
        # Posted, not called: the step loop starts on it at once, and a refusal reaches the
        # waiter; awaiting the acceptance would wake this loop mid-step for nothing.
        self._loop.post(lambda: self._add(msg, received))
        try:
            return await fut
        except BaseException:
            # Cancelled by the router (client went away), aborted or rejected: drop it on
            # the worker.
            self._waiters.pop(msg.request_id, None)
            self._loop.post(lambda: self.worker.abort(msg.request_id))
            raise

    def _add(self, msg: PrefillRequest, received: float) -> None:
        """On the step loop thread."""
        try:
            self.worker.add(msg, received)
        except Exception as exc:
            waiter = self._waiters.pop(msg.request_id, None)
            if waiter is not None:
                loop, fut = waiter
                loop.call_soon_threadsafe(_set_exception, fut, exc)

    async def set_destination(self, destination: KVDestination) -> None:
        """Where the KV of a request sent with ``destination_follows`` goes (its
        ``transfer_id`` names the request). Handed straight to the worker's mailbox, which
        a running model step looks at after every layer, then the loop is woken in case it
        idles with the prompt already computed."""
        self.worker.destinations.put(destination)
        self._loop.post(_nothing)

    async def abort(self, request_id: str) -> bool:
        waiter = self._waiters.pop(request_id, None)
        if waiter is not None:  # its prefill call ends too, rather than waiting forever
            loop, fut = waiter
            loop.call_soon_threadsafe(fut.cancel)
        return await asyncio.wrap_future(self._loop.call(lambda: self.worker.abort(request_id)))

    def close(self) -> None:
        self._loop.stop()
        self.worker.runner.close()  # a TP rank 0 releases its followers
        if self.worker.sender is not None:
            self.worker.sender.close()


def _nothing() -> None:
    pass


def _set_result(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
