"""How the router talks to workers: one async interface, in-process or over Ray.

``PrefillClient``/``DecodeClient`` wrap either a host object in this process
(``PrefillHost``/``DecodeHost``: tests, Ray-less GPU hosts) or a Ray actor handle; the
orchestrator cannot tell them apart. Ray actor failures surface as ``WorkerGone``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from pdserve.decode_worker.messages import (
    DecodeStats,
    Reservation,
    ReserveRequest,
    StartDecode,
    TokenBatch,
)
from pdserve.prefill_worker.messages import PrefillRequest, PrefillResult, PrefillStats


class WorkerGone(RuntimeError):
    """The worker process is dead or unreachable."""


def _is_actor(obj: Any) -> bool:
    return hasattr(obj, "_actor_id")


async def _call(target: Any, method: str, *args):
    """Await ``method`` on a Ray actor or an in-process host (sync host methods allowed)."""
    if _is_actor(target):
        import ray

        try:
            return await getattr(target, method).remote(*args)
        except ray.exceptions.RayActorError as exc:
            raise WorkerGone(str(exc)) from exc
        except ray.exceptions.RayTaskError as exc:
            # Re-raise the worker's own exception type (NoCapacityError, KeyError, ...).
            raise exc.as_instanceof_cause() from None
    result = getattr(target, method)(*args)
    return await result if hasattr(result, "__await__") else result


class PrefillClient:
    def __init__(self, worker_id: str, target: Any):
        self.worker_id = worker_id
        self.target = target

    async def prefill(self, msg: PrefillRequest) -> PrefillResult:
        return await _call(self.target, "prefill", msg)

    async def abort(self, request_id: str) -> bool:
        return await _call(self.target, "abort", request_id)

    async def stats(self) -> PrefillStats:
        return await _call(self.target, "stats")

    async def metrics_text(self) -> str:
        return await _call(self.target, "metrics_text")


class DecodeClient:
    def __init__(self, worker_id: str, target: Any):
        self.worker_id = worker_id
        self.target = target

    async def reserve(self, msg: ReserveRequest) -> Reservation:
        return await _call(self.target, "reserve", msg)

    async def start(self, msg: StartDecode) -> None:
        return await _call(self.target, "start", msg)

    async def submit(self, msg) -> None:
        """Colocated workers: a whole request (``ColocatedRequest``)."""
        return await _call(self.target, "submit", msg)

    async def release(self, request_id: str) -> bool:
        return await _call(self.target, "release", request_id)

    async def stats(self) -> DecodeStats:
        return await _call(self.target, "stats")

    async def metrics_text(self) -> str:
        return await _call(self.target, "metrics_text")

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
