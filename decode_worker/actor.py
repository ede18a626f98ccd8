"""Thin Ray actor around ``DecodeHost``: builds the worker in its own process, forwards calls."""

from __future__ import annotations

import ray

from pdserve.decode_worker.build import build_colocated_host, build_decode_host
from pdserve.decode_worker.messages import (
    ColocatedRequest,
    Reservation,
    ReserveRequest,
    StartDecode,
    TokenBatch,
)
from pdserve.engine.config import EngineConfig
from pdserve.engine.worker_host import WorkerActorCalls
from pdserve.kv_transfer.backend_config import KVTransferConfig


@ray.remote(max_concurrency=1000)
class DecodeWorkerActor(WorkerActorCalls):
    def __init__(self, worker_id: str, engine: EngineConfig, kv: KVTransferConfig | None,
                 torch_threads: int | None = None):
        """``kv`` None makes a colocated worker (both phases, no KV transfer)."""
        node = ray.util.get_node_ip_address()
        if kv is None:
            self.host = build_colocated_host(worker_id, engine, torch_threads, node)
            return
        if kv.bind_host == "auto":
            # Listen on this node's cluster address, so prefill workers on other nodes reach it.
            import dataclasses

            kv = dataclasses.replace(kv, bind_host=node)
        self.host = build_decode_host(worker_id, engine, kv, torch_threads,
                                      ray.get_runtime_context().get_actor_id(), node)

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    async def reserve(self, msg: ReserveRequest) -> Reservation:
        return await self.host.reserve(msg)

    async def start(self, msg: StartDecode) -> None:
        return await self.host.start(msg)

    async def submit(self, msg: ColocatedRequest) -> None:
        return await self.host.submit(msg)

    async def release(self, request_id: str) -> bool:
        return await self.host.release(request_id)

    def kv_endpoint(self):
        """Where prefill workers write this worker's KV (None for a colocated worker)."""
        receiver = getattr(self.host.worker, "receiver", None)
        return receiver.endpoint if receiver is not None else None

    async def stream(self):
        """Server-side streaming: one ``TokenBatch`` per decode step, for the actor's life."""
        batch: TokenBatch
        async for batch in self.host.stream():
            yield batch
