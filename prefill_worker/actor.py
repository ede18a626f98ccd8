"""Thin Ray actor around ``PrefillHost``: builds the worker in its own process, forwards calls."""

from __future__ import annotations

import ray

from pdserve.engine.config import EngineConfig
from pdserve.engine.worker_host import WorkerActorCalls
from pdserve.kv_transfer.backend_config import KVTransferConfig
from pdserve.kv_transfer.messages import KVDestination
from pdserve.prefill_worker.build import build_prefill_host
from pdserve.prefill_worker.messages import PrefillRequest, PrefillResult


@ray.remote(max_concurrency=1000)
class PrefillWorkerActor(WorkerActorCalls):
    def __init__(self, worker_id: str, engine: EngineConfig, kv: KVTransferConfig,
                 torch_threads: int | None = None):
        self.host = build_prefill_host(worker_id, engine, kv, torch_threads,
                                       ray.util.get_node_ip_address())

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    async def prefill(self, msg: PrefillRequest) -> PrefillResult:
        return await self.host.prefill(msg)

    async def set_destination(self, destination: KVDestination) -> None:
        return await self.host.set_destination(destination)

    async def abort(self, request_id: str) -> bool:
        return await self.host.abort(request_id)
