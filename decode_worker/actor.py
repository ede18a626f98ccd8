"""Thin Ray actor around ``DecodeHost``: builds the worker in its own process, forwards calls."""

from __future__ import annotations

import ray

from pdserve.decode_worker.build import build_colocated_host, build_decode_host
from pdserve.decode_worker.messages import (
    ColocatedRequest,
    LocalPrefillRequest,
    Reservation,
    ReserveRequest,
    StartDecode,
    TokenBatch,
)
from pdserve.engine.config import EngineConfig
from pdserve.engine.parallel.rank_launcher import RankLauncher, start_ranks
from pdserve.engine.worker_host import WorkerActorCalls
from pdserve.kv_transfer.backend_config import KVTransferConfig


@ray.remote(max_concurrency=1000)
class DecodeWorkerActor(WorkerActorCalls):
    def __init__(self, worker_id: str, engine: EngineConfig, kv: KVTransferConfig | None,
                 torch_threads: int | None = None, ranks: RankLauncher | None = None):
        """``kv`` None makes a colocated worker (both phases, no KV transfer). ``ranks``:
        starts the other ranks when ``engine.tensor_parallel_size`` > 1."""
        node = ray.util.get_node_ip_address()
        self.ranks = ranks
        if kv is None:
            if engine.tensor_parallel_size > 1:
                raise ValueError("colocated workers run at tensor_parallel_size 1")
            self.host = build_colocated_host(worker_id, engine, torch_threads, node)
            return
        if kv.bind_host == "auto":
            # Listen on this node's cluster address, so prefill workers on other nodes reach it.
            import dataclasses

            kv = dataclasses.replace(kv, bind_host=node)
            if ranks is not None:
                ranks.kv = kv  # the other ranks listen on the same node
        group = start_ranks(ranks, engine, worker_id)
        self.host = build_decode_host(worker_id, engine, kv, torch_threads,
                                      ray.get_runtime_context().get_actor_id(), node, group)
        if group is not None:
            self.exit_when_group_breaks()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    async def reserve(self, msg: ReserveRequest) -> Reservation:
        return await self.host.reserve(msg)

    async def start(self, msg: StartDecode) -> None:
        return await self.host.start(msg)

    async def prefill_local(self, msg: LocalPrefillRequest) -> None:
        return await self.host.prefill_local(msg)

    async def submit(self, msg: ColocatedRequest) -> None:
        return await self.host.submit(msg)

    async def release(self, request_id: str) -> bool:
        return await self.host.release(request_id)

    def kv_endpoint(self):
        """Where prefill workers write this worker's KV (None for a colocated worker)."""
        receiver = getattr(self.host.worker, "receiver", None)
        return receiver.endpoint if receiver is not None else None

    def kv_endpoints(self) -> list:
        """Every rank's KV endpoint (rank 0's first; empty for a colocated worker)."""
        mine = self.kv_endpoint()
        return [] if mine is None else [mine, *self.host.worker.rank_endpoints]

    async def rank_pids(self) -> list[int]:
        """The process ids of ranks 1 .. tp-1 (chaos tests kill them)."""
        return [await ref for ref in self.ranks.rank_pids()] if self.ranks is not None else []

    async def stream(self):
        """Server-side streaming: one ``TokenBatch`` per decode step, for the actor's life."""
        batch: TokenBatch
        async for batch in self.host.stream():
            yield batch
