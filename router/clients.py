"""How the router talks to workers: one async interface, in-process or over Ray.

``PrefillClient``/``DecodeClient`` wrap either a host object in this process
(``PrefillHost``/``DecodeHost``: tests, Ray-less GPU hosts) or a Ray actor handle; the
orchestrator cannot tell them apart. Ray actor failures surface as ``WorkerGone``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable
from typing import Any

from pdserve.decode_worker.messages import (
    DecodeStats,
    LocalPrefillRequest,
    Reservation,
    ReserveRequest,
    StartDecode,
    TokenBatch,
)
from pdserve.kv_transfer.messages import KVDestination
from pdserve.prefill_worker.messages import PrefillRequest, PrefillResult, PrefillStats
from pdserve.router.prefill_direct import DirectPath
from pdserve.router.worker_gone import WorkerGone

__all__ = ["DecodeClient", "PrefillClient", "WorkerGone"]


def _is_actor(obj: Any) -> bool:
    return hasattr(obj, "_actor_id")


def _call(target: Any, method: str, *args) -> Awaitable:
    """Call ``method`` on a Ray actor or an in-process host (sync host methods allowed);
    an awaitable of its result. A Ray call is submitted here, not when first awaited: a
    request's calls leave in the order it makes them, without waiting for its task to
    run (the prefill goes out before the reservation that follows it is even built)."""
    if _is_actor(target):
        try:
            ref = getattr(target, method).remote(*args)
        except Exception as exc:  # (surfaces where the result is awaited, as it did before)
            return _ray_result(None, exc)
        return _ray_result(ref)
    result = getattr(target, method)(*args)
    return result if hasattr(result, "__await__") else _ready(result)


async def _ray_result(ref, submit_error: Exception | None = None):
    import ray

    try:
        if submit_error is not None:
            raise submit_error
        return await ref
    except ray.exceptions.RayActorError as exc:
        raise WorkerGone(str(exc)) from exc
    except ray.exceptions.RayTaskError as exc:
        # Re-raise the worker's own exception type (NoCapacityError, KeyError, ...).
        raise exc.as_instanceof_cause() from None


async def _ready(value):
    return value


def _local_node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


class PrefillClient:
    """The request path's calls (``prefill``, ``set_destination``, ``abort``) to a Ray
    actor go over the direct channel when ``direct`` and one is up (``prefill_direct``),
    over Ray otherwise; the others always over Ray. A request's later calls take the path
    its prefill took, so they reach the worker after it."""

    def __init__(self, worker_id: str, target: Any, direct: bool = True):
        self.worker_id = worker_id
        self.target = target
        self.direct = (DirectPath(worker_id, target, _local_node_id)
                       if direct and _is_actor(target) else None)
        self._path_of: dict[str, Any] = {}  # request id -> its prefill's channel
        self.sent = {"direct": 0, "ray": 0}  # prefills sent by each path

    def path_report(self) -> dict:
        """How this worker's prefills travel (the router's reliability report)."""
        why = self.direct.disabled if self.direct is not None else "in process or disabled"
        return {"sent": dict(self.sent), **({"ray_only": why} if why else {}),
                **({"channels_opened": self.direct.connects} if self.direct else {})}

    def prefill(self, msg: PrefillRequest) -> Awaitable[PrefillResult]:
        channel = self.direct.channel() if self.direct is not None else None
        if channel is None:
            self.sent["ray"] += 1
            return _call(self.target, "prefill", msg)
        self.sent["direct"] += 1
        self._path_of[msg.request_id] = channel
        fut = channel.prefill(msg)
        fut.add_done_callback(lambda _f: self._path_of.pop(msg.request_id, None))
        return fut

    def set_destination(self, destination: KVDestination) -> Awaitable[None]:
        """The destination of a request sent with ``destination_follows``."""
        channel = self._path_of.get(destination.transfer_id)
        if channel is not None:
            return channel.set_destination(destination)
        return _call(self.target, "set_destination", destination)

    def abort(self, request_id: str) -> Awaitable[bool]:
        channel = self._path_of.get(request_id) or (
            self.direct.channel() if self.direct is not None else None)
        if channel is not None:
            return channel.abort(request_id)
        return _call(self.target, "abort", request_id)

    def open(self) -> None:
        """Start connecting the direct channel, if any (in the event loop), so the first
        requests need not go over Ray."""
        if self.direct is not None:
            self.direct.channel()

    async def close(self) -> None:
        if self.direct is not None:
            await self.direct.close()

    def stats(self) -> Awaitable[PrefillStats]:
        return _call(self.target, "stats")

    def metrics_text(self) -> Awaitable[str]:
        return _call(self.target, "metrics_text")


class DecodeClient:
    def __init__(self, worker_id: str, target: Any):
        self.worker_id = worker_id
        self.target = target

    def reserve(self, msg: ReserveRequest) -> Awaitable[Reservation]:
        return _call(self.target, "reserve", msg)

    def start(self, msg: StartDecode) -> Awaitable[None]:
        return _call(self.target, "start", msg)

    def prefill_local(self, msg: LocalPrefillRequest) -> Awaitable[None]:
        """Conditional disaggregation: prefill here; the first token comes by ``stream``."""
        return _call(self.target, "prefill_local", msg)

    def submit(self, msg) -> Awaitable[None]:
        """Colocated workers: a whole request (``ColocatedRequest``)."""
        return _call(self.target, "submit", msg)

    def release(self, request_id: str) -> Awaitable[bool]:
        return _call(self.target, "release", request_id)

    def stats(self) -> Awaitable[DecodeStats]:
        return _call(self.target, "stats")

    def metrics_text(self) -> Awaitable[str]:
        return _call(self.target, "metrics_text")

    async def stream(self) -> AsyncIterator[TokenBatch]:
        if not _is_actor(self.target):
            async for batch in self.target.stream():
                yield batch
            return
        import ray

        try:
            async for ref in self.target.stream.options(num_returns="streaming").remote():
                yield await ref
        except ray.exceptions.RayActorError as exc:
            raise WorkerGone(str(exc)) from exc
