"""Thin Ray actor around ``PrefillHost``: builds the worker in its own process, forwards calls."""

from __future__ import annotations

import ray

from pdserve.cluster.worker_actor import WorkerActorMixin
from pdserve.engine.config import EngineConfig
from pdserve.engine.metrics import WorkerMetrics, model_label, node_label
from pdserve.kv_transfer.backend_config import KVTransferConfig
from pdserve.prefill_worker.host import PrefillHost
from pdserve.prefill_worker.messages import PrefillRequest, PrefillResult
from pdserve.prefill_worker.worker import PrefillWorker


def build_prefill_host(worker_id: str, engine: EngineConfig, kv: KVTransferConfig,
                       torch_threads: int | None = None) -> PrefillHost:
    """Used by the actor and by Ray-less hosts (GPU benchmarks, tests)."""
    import torch

    from pdserve.kv_transfer.registry import create_sender

    if torch_threads:
        torch.set_num_threads(torch_threads)
    sender = create_sender(kv.backend, auth_token=kv.auth_token)
    worker = PrefillWorker.from_config(worker_id, engine, sender)
    worker.transfer_timeout_s = kv.timeout_s
    worker.kv_checksum = kv.checksum_mode
    worker.metrics = WorkerMetrics(model_label(engine.model), "prefill", worker_id, node_label())
    worker.metrics.set_state(0, 0, 0.0, worker.blocks.num_blocks, worker.blocks.block_size)
    worker.metrics.init_backend(kv.backend)
    return PrefillHost(worker)


@ray.remote(max_concurrency=1000)
class PrefillWorkerActor(WorkerActorMixin):
    def __init__(self, worker_id: str, engine: EngineConfig, kv: KVTransferConfig,
                 torch_threads: int | None = None):
        self.host = build_prefill_host(worker_id, engine, kv, torch_threads)

    async def prefill(self, msg: PrefillRequest) -> PrefillResult:
        return await self.host.prefill(msg)

    async def abort(self, request_id: str) -> bool:
        return await self.host.abort(request_id)
