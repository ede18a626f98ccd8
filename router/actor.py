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
