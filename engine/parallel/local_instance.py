"""A tensor-parallel instance on this host without Ray: rank 0 here, the others as children.

``LocalTPInstance.start(config)`` starts ranks ``1 .. tp-1`` as child processes (spawned:
a fresh interpreter each, safe whatever threads this process runs), each joining the
group and running ``run_follower``; this process joins as rank 0 and gets ``group``, with
which ``load_model(rank_config(config, 0), group=...)`` and then ``LLMEngine`` or a
worker drive the others.
``close()`` (after the runner's ``close``, which sends SHUTDOWN) leaves the group and
reaps the children, killing any that do not exit. The children are daemons: they die
with this process, and a follower whose rank 0 died fails its next wait and exits.
On CUDA rank ``r`` takes GPU ``r``. What ``pdserve complete --tp N`` runs; a cluster
places one Ray actor per rank instead (docs/tensor_parallel.md).
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing as mp
import socket

import torch

from pdserve.engine.config import EngineConfig
from pdserve.engine.parallel.group import TPGroup, TPGroupConfig

log = logging.getLogger(__name__)


def rank_config(config: EngineConfig, rank: int) -> EngineConfig:
    """``config`` as rank ``rank`` loads it: on CUDA its own GPU."""
    device = config.resolve_device()
    return dataclasses.replace(config, device=f"cuda:{rank}" if device.type == "cuda" else "cpu")


def _follower_main(config: EngineConfig, rank: int, init_method: str, timeout_s: float,
                   torch_threads: int | None) -> None:
    from pdserve.engine.parallel.executor import run_follower

    if torch_threads:
        torch.set_num_threads(torch_threads)
    config = rank_config(config, rank)
    group = TPGroup.join(TPGroupConfig(config.tensor_parallel_size, rank, init_method,
                                       config.device, timeout_s))
    try:
        run_follower(config, group)
    finally:
        group.close()


class LocalTPInstance:
    def __init__(self, group: TPGroup, procs: list):
        self.group = group
        self._procs = procs

    @classmethod
    def start(cls, config: EngineConfig, timeout_s: float = 120.0,
              torch_threads: int | None = None) -> LocalTPInstance:
        """Start the followers and join as rank 0 (blocks until every rank has joined, at
        most ``timeout_s``, which also bounds every collective)."""
        tp = config.tensor_parallel_size
        if tp < 2:
            raise ValueError(f"a local TP instance has >= 2 ranks, got {tp}")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            init_method = f"tcp://127.0.0.1:{s.getsockname()[1]}"
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_follower_main, daemon=True, name=f"pdserve-tp-rank{r}",
                             args=(config, r, init_method, timeout_s, torch_threads))
                 for r in range(1, tp)]
        for p in procs:
            p.start()
        try:
            group = TPGroup.join(TPGroupConfig(tp, 0, init_method,
                                               rank_config(config, 0).device, timeout_s))
        except BaseException:
            _reap(procs, 0)
            raise
        return cls(group, procs)

    def close(self, timeout_s: float = 10.0) -> None:
        self.group.close()
        _reap(self._procs, timeout_s)


def _reap(procs: list, timeout_s: float) -> None:
    for p in procs:
        p.join(timeout_s)
        if p.is_alive():
            log.warning("TP rank process %s did not exit; killing it", p.name)
            p.kill()
            p.join(5)
