"""Asyncio face of a prefill worker: the same object serves a Ray actor and in-process use.

The worker runs on its ``StepLoop`` thread; ``submit`` posts a request there with a
callback the loop calls with its ``PrefillResult`` when the first token is sampled (the
direct channel's socket thread uses it as is); ``prefill`` awaits the same through an
asyncio future (``call_soon_threadsafe``). A Ray actor (``actor.py``) only forwards to this
class, so GPU hosts without Ray drive the very same code.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable

from pdserve.engine.worker_host import WorkerHost
from pdserve.kv_transfer.messages import KVDestination
from pdserve.prefill_worker.messages import PrefillRequest, PrefillResult
from pdserve.prefill_worker.worker import PrefillWorker


class PrefillHost(WorkerHost):
    def __init__(self, worker: PrefillWorker):
        # request id -> what to call with its result or exception (on the step thread)
        self._waiters: dict[str, Callable[[PrefillResult | BaseException], None]] = {}
        self._waiters_lock = threading.Lock()
        super().__init__(worker, on_step=self._deliver, name=f"prefill-{worker.worker_id}")

    def _deliver(self, results: list[PrefillResult]) -> None:
        for r in results:
            done = self._take(r.request_id)
            if done is not None:
                done(r)

    def _take(self, request_id: str):
        with self._waiters_lock:
            return self._waiters.pop(request_id, None)

    def submit(self, msg: PrefillRequest,
               done: Callable[[PrefillResult | BaseException], None]) -> None:
        """Queue ``msg`` from any thread; ``done`` gets its ``PrefillResult``, or the
        exception that refused it (``CancelledError`` when aborted), exactly once, on the
        worker's step thread (or the caller's, for a duplicate id). What the direct
        channel calls straight from its socket thread, with no event loop in between."""
        received = time.monotonic()
        with self._waiters_lock:
            duplicate = msg.request_id in self._waiters
            if not duplicate:
                self._waiters[msg.request_id] = done
        if duplicate:  # (its waiter must not be replaced: it would hang)
            done(ValueError(f"request {msg.request_id} is already queued on "
                            f"{self.worker.worker_id}"))
            return
        # Posted, not called: the step loop starts on it at once, and a refusal reaches the
        # waiter; awaiting the acceptance would wake the caller mid-step for nothing.
        self._loop.post(lambda: self._add(msg, received))

    async def prefill(self, msg: PrefillRequest) -> PrefillResult:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.submit(msg, lambda value: loop.call_soon_threadsafe(_resolve, fut, value))
        try:
            return await fut
        except BaseException:
            # Cancelled by the router (client went away), aborted or rejected: drop it on
            # the worker.
            self.abort_nowait(msg.request_id)
            raise

    def abort_nowait(self, request_id: str) -> None:
        """Drop ``request_id`` wherever it is (its waiter gets ``CancelledError``); from
        any thread, returns at once."""
        done = self._take(request_id)
        if done is not None:
            done(asyncio.CancelledError())
        self._loop.post(lambda: self.worker.abort(request_id))

    def _add(self, msg: PrefillRequest, received: float) -> None:
        """On the step loop thread."""
        try:
            self.worker.add(msg, received)
        except Exception as exc:
            done = self._take(msg.request_id)
            if done is not None:
                done(exc)

    async def set_destination(self, destination: KVDestination) -> None:
        """Where the KV of a request sent with ``destination_follows`` goes (its
        ``transfer_id`` names the request). Handed straight to the worker's mailbox, which
        a running model step looks at after every layer, then the loop is woken in case it
        idles with the prompt already computed."""
        self.set_destination_nowait(destination)

    def set_destination_nowait(self, destination: KVDestination) -> None:
        """``set_destination`` from any thread."""
        self.worker.destinations.put(destination)
        self._loop.post(_nothing)

    def abort_call(self, request_id: str) -> concurrent.futures.Future:
        """Abort ``request_id`` (its prefill call, if any, ends with ``CancelledError``);
        a future of whether the worker held it, resolved on the step thread."""
        done = self._take(request_id)
        if done is not None:  # its prefill call ends too, rather than waiting forever
            done(asyncio.CancelledError())
        return self._loop.call(lambda: self.worker.abort(request_id))

    async def abort(self, request_id: str) -> bool:
        return await asyncio.wrap_future(self.abort_call(request_id))

    def close(self) -> None:
        self._loop.stop()
        self.worker.runner.close()  # a TP rank 0 releases its followers
        if self.worker.sender is not None:
            self.worker.sender.close()


def _nothing() -> None:
    pass


def _resolve(fut: asyncio.Future, value) -> None:
    if fut.done():
        return
    if isinstance(value, asyncio.CancelledError):
        fut.cancel()
    elif isinstance(value, BaseException):
        fut.set_exception(value)
    else:
        fut.set_result(value)
