"""Build a decode (or colocated) worker and its host from plain configuration, no Ray.

The Ray actor (``actor.py``) calls these in its own process; so do Ray-less hosts: the
in-process cluster of the tests and the GPU benchmark hosts, which run the very same
worker. ``instance_key`` (the Ray actor id) gives the KV receiver a stable address across
restarts of the worker (shm segment, CUDA IPC stamp, in-process key), so a successor
replaces it; ``node`` labels the worker's metrics (the actor passes its Ray node address).
"""

from __future__ import annotations

from pdserve.decode_worker.colocated import ColocatedWorker
from pdserve.decode_worker.host import DecodeHost
from pdserve.decode_worker.worker import DecodeWorker
from pdserve.engine.config import EngineConfig
from pdserve.engine.metrics import WorkerMetrics, model_label, node_label
from pdserve.kv_transfer.backend_config import KVTransferConfig


def receiver_factory(worker_id: str, engine: EngineConfig, kv: KVTransferConfig,
                     instance_key: str = ""):
    """``spec -> (KVReceiver, KVCache)`` for a decode worker (or one rank of it)."""
    from pdserve.kv_transfer.registry import create_receiver

    device = engine.resolve_device()

    def create(spec):
        return create_receiver(kv.backend, spec, worker_id, device, bind_host=kv.bind_host,
                               auth_token=kv.auth_token, instance_key=instance_key)

    return create


def build_decode_host(worker_id: str, engine: EngineConfig, kv: KVTransferConfig,
                      torch_threads: int | None = None, instance_key: str = "",
                      node: str | None = None, group=None) -> DecodeHost:
    """``group``: rank 0's joined ``TPGroup`` when ``engine.tensor_parallel_size`` > 1
    (the other ranks run ``follower.run_decode_follower``)."""
    from pdserve.engine.loader import load_model

    _set_threads(torch_threads)
    loaded = load_model(engine, load_tokenizer=False, group=group) if group is not None else None
    worker = DecodeWorker.from_config(worker_id, engine,
                                      receiver_factory(worker_id, engine, kv, instance_key),
                                      loaded)
    worker.metrics = WorkerMetrics(model_label(engine.model), "decode", worker_id,
                                   node or node_label())
    worker.metrics.init_backend(kv.backend)  # checksum mismatches are counted here
    worker.refresh_state()
    return DecodeHost(worker)


def build_colocated_host(worker_id: str, engine: EngineConfig,
                         torch_threads: int | None = None, node: str | None = None
                         ) -> DecodeHost:
    _set_threads(torch_threads)
    worker = ColocatedWorker.from_config(worker_id, engine)
    worker.metrics = WorkerMetrics(model_label(engine.model), "colocated", worker_id,
                                   node or node_label())
    worker.refresh_state()
    return DecodeHost(worker)


def _set_threads(torch_threads: int | None) -> None:
    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
