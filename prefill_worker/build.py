"""Build a prefill worker and its host from plain configuration, with no Ray involved.

The Ray actor (``actor.py``) calls this in its own process; so do Ray-less hosts: the
in-process cluster of the tests and the GPU benchmark hosts, which run the very same
worker. ``node`` labels the worker's metrics (the actor passes its Ray node address).
"""

from __future__ import annotations

from pdserve.engine.config import EngineConfig
from pdserve.engine.metrics import WorkerMetrics, model_label, node_label
from pdserve.kv_transfer.backend_config import KVTransferConfig
from pdserve.prefill_worker.host import PrefillHost
from pdserve.prefill_worker.worker import PrefillWorker


def build_prefill_host(worker_id: str, engine: EngineConfig, kv: KVTransferConfig,
                       torch_threads: int | None = None, node: str | None = None,
                       group=None) -> PrefillHost:
    """``group``: rank 0's joined ``TPGroup`` when ``engine.tensor_parallel_size`` > 1
    (the other ranks run ``follower.run_prefill_follower``)."""
    import torch

    from pdserve.engine.loader import load_model
    from pdserve.kv_transfer.registry import create_sender

    if torch_threads:
        torch.set_num_threads(torch_threads)
    sender = create_sender(kv.backend, auth_token=kv.auth_token)
    loaded = load_model(engine, load_tokenizer=False, group=group) if group is not None else None
    worker = PrefillWorker.from_config(worker_id, engine, sender, loaded,
                                       transfer_timeout_s=kv.timeout_s,
                                       kv_checksum=kv.checksum_mode)
    worker.metrics = WorkerMetrics(model_label(engine.model), "prefill", worker_id,
                                   node or node_label())
    worker.metrics.init_backend(kv.backend)
    worker.refresh_state()
    return PrefillHost(worker)
