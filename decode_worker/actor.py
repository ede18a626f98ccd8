"""Thin Ray actor around ``DecodeHost``: builds the worker in its own process, forwards calls."""

from __future__ import annotations

import ray

from pdserve.cluster.worker_actor import WorkerActorMixin
from pdserve.decode_worker.colocated import ColocatedRequest
from pdserve.decode_worker.host import DecodeHost
from pdserve.decode_worker.messages import (
    Reservation,
    ReserveRequest,
    StartDecode,
    TokenBatch,
)
from pdserve.decode_worker.worker import DecodeWorker
from pdserve.engine.config import EngineConfig
from pdserve.engine.metrics import WorkerMetrics, model_label, node_label
from pdserve.kv_transfer.backend_config import KVTransferConfig


def build_decode_host(worker_id: str, engine: EngineConfig, kv: KVTransferConfig,
                      torch_threads: int | None = None, instance_key: str = "") -> DecodeHost:
    """Used by the actor and by Ray-less hosts (GPU benchmarks, tests). ``instance_key``
    (the Ray actor id) gives the receiver a stable address across restarts of the worker
    (shm segment, CUDA IPC stamp, in-process key), so a successor replaces it."""
    import torch

    from pdserve.kv_transfer.registry import create_receiver

    if torch_threads:
        torch.set_num_threads(torch_threads)
    device = engine.resolve_device()

    def receiver_factory(spec):
        return create_receiver(kv.backend, spec, worker_id, device, bind_host=kv.bind_host,
                               auth_token=kv.auth_token, instance_key=instance_key)

    worker = DecodeWorker.from_config(worker_id, engine, receiver_factory)
    worker.metrics = WorkerMetrics(model_label(engine.model), "decode", worker_id, node_label())
    worker.metrics.set_state(0, 0, 0.0, worker.blocks.num_blocks, worker.blocks.block_size)
    worker.metrics.init_backend(kv.backend)  # checksum mismatches are counted here
    return DecodeHost(worker)


def build_colocated_host(worker_id: str, engine: EngineConfig,
                         torch_threads: int | None = None) -> DecodeHost:
    import torch

    from pdserve.decode_worker.colocated import ColocatedWorker

    if torch_threads:
        torch.set_num_threads(torch_threads)
    worker = ColocatedWorker.from_config(worker_id, engine)
    worker.metrics = WorkerMetrics(model_label(engine.model), "colocated", worker_id, node_label())
    blocks = worker.engine.blocks
    worker.metrics.set_state(0, 0, 0.0, blocks.num_blocks, blocks.block_size)
    return DecodeHost(worker)


@ray.remote(max_concurrency=1000)
class DecodeWorkerActor(WorkerActorMixin):
    def __init__(self, worker_id: str, engine: EngineConfig, kv: KVTransferConfig | None,
                 torch_threads: int | None = None):
        """``kv`` None makes a colocated worker (both phases, no KV transfer)."""
        if kv is None:
            self.host = build_colocated_host(worker_id, engine, torch_threads)
            return
        if kv.bind_host == "auto":
            # Listen on this node's cluster address, so prefill workers on other nodes reach it.
            import dataclasses

            kv = dataclasses.replace(kv, bind_host=ray.util.get_node_ip_address())
        self.host = build_decode_host(worker_id, engine, kv, torch_threads,
                                      ray.get_runtime_context().get_actor_id())

    async def reserve(self, msg: ReserveRequest) -> Reservation:
        return await self.host.reserve(msg)

    async def start(self, msg: StartDecode) -> None:
        return await self.host.start(msg)

    async def submit(self, msg: ColocatedRequest) -> int:
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
