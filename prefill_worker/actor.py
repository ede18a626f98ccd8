"""Thin Ray actor around ``PrefillHost``: builds the worker in its own process, forwards calls."""

from __future__ import annotations

import ray

from pdserve.engine.config import EngineConfig
from pdserve.engine.parallel.rank_launcher import RankLauncher, start_ranks
from pdserve.engine.worker_host import WorkerActorCalls
from pdserve.kv_transfer.backend_config import KVTransferConfig
from pdserve.kv_transfer.messages import KVDestination
from pdserve.prefill_worker.build import build_prefill_host
from pdserve.prefill_worker.channel_server import ChannelServer
from pdserve.prefill_worker.messages import PrefillRequest, PrefillResult


@ray.remote(max_concurrency=1000)
class PrefillWorkerActor(WorkerActorCalls):
    def __init__(self, worker_id: str, engine: EngineConfig, kv: KVTransferConfig,
                 torch_threads: int | None = None, ranks: RankLauncher | None = None):
        """``ranks``: starts the other ranks when ``engine.tensor_parallel_size`` > 1."""
        self.ranks = ranks
        group = start_ranks(ranks, engine, worker_id)
        self.host = build_prefill_host(worker_id, engine, kv, torch_threads,
                                       ray.util.get_node_ip_address(), group)
        self.channel = ChannelServer(self.host)
        if group is not None:
            self.exit_when_group_breaks()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    async def prefill(self, msg: PrefillRequest) -> PrefillResult:
        return await self.host.prefill(msg)

    async def set_destination(self, destination: KVDestination) -> None:
        return await self.host.set_destination(destination)

    async def abort(self, request_id: str) -> bool:
        return await self.host.abort(request_id)

    async def channel_address(self, router_node_id: str) -> str | None:
        """The Unix socket of the direct request-path channel (``channel_server.py``) for
        a router on ``router_node_id``; None for a router on another node."""
        if router_node_id != self.node_id():
            return None
        return await self.channel.start()

    async def rank_pids(self) -> list[int]:
        """The process ids of ranks 1 .. tp-1 (chaos tests kill them)."""
        return [await ref for ref in self.ranks.rank_pids()] if self.ranks is not None else []

    async def shutdown(self) -> None:
        await self.channel.close()
        await super().shutdown()
