"""The router as a Ray actor: hosts the grpc.aio server in the actor's event loop; the
router itself is built by ``build.py``, without Ray."""

from __future__ import annotations

import os
from typing import Any

import ray

from pdserve.router.build import build_router
from pdserve.router.config import RouterConfig


@ray.remote(max_concurrency=10000)
class RouterActor:
    def __init__(self, config: RouterConfig, prefills: list[tuple[str, Any]],
                 decodes: list[tuple[str, Any]]):
        self.server = build_router(config, prefills, decodes)

    async def start(self) -> str:
        return await self.server.start()

    async def stop(self) -> None:
        await self.server.stop()

    async def metrics_address(self) -> str | None:
        return self.server.metrics_address

    async def http_address(self) -> str | None:
        return self.server.http_address

    async def in_flight(self) -> int:
        return self.server.orchestrator.in_flight()

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    async def reliability(self) -> dict:
        """Retries so far, requests failed after spending their retries, and each
        worker's health (alive, deaths seen)."""
        return self.server.orchestrator.reliability_report()

    # -- pools that follow the load (cluster/autoscale/actor.py drives these) -----------
    async def add_worker(self, role: str, worker_id: str, handle: Any) -> None:
        """Put a ready worker into the ``role`` ("prefill" / "decode") pool."""
        await self.server.membership.add(role, worker_id, handle)

    async def drain_worker(self, worker_id: str, timeout_s: float) -> None:
        """Return once ``worker_id`` has left its pool holding nothing; raises
        ``DrainTimeout`` (it stays) if it still holds work after ``timeout_s``."""
        await self.server.membership.drain(worker_id, timeout_s)

    async def pool_sizes(self) -> dict[str, dict[str, int]]:
        return self.server.membership.sizes()

    async def load_report(self, window_s: float) -> dict:
        """What the autoscaler observes: the last ``window_s`` seconds' arrivals, token
        means and SLO attainment (``LoadSummary``), with the pools' queues now."""
        orch = self.server.orchestrator
        return {**self.server.metrics.window.summary(window_s).as_dict(),
                "prefill_queue_requests": sum(w.in_flight for w in orch.prefill_load.values()),
                "prefill_queue_tokens": sum(w.queued_tokens for w in orch.prefill_load.values()),
                "decode_running": sum(w.in_flight for w in orch.decode_load.values()),
                "decode_kv_usage": _kv_usage(orch.decode_load.values()),
                "pools": self.server.membership.sizes()}

    async def record_scaling(self, pool: str, before: int, after: int, reason: str) -> None:
        self.server.metrics.record_scaling(pool, before, after, reason)


def _kv_usage(loads) -> float:
    """Share of the decode pool's KV blocks in use, from the workers' last heartbeats."""
    total = sum(w.total_blocks for w in loads if w.total_blocks > 1)
    used = sum(w.total_blocks - w.free_blocks for w in loads if w.total_blocks > 1)
    return used / total if total else 0.0

