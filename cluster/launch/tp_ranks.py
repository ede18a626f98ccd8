"""The other ranks of a tensor-parallel worker on Ray: one actor per rank, on rank 0's node.

``RayRankLauncher`` (a ``RankLauncher``) is handed to a prefill or decode worker actor
whose pool runs at tp > 1. In that actor's constructor it picks a rendezvous address on
the node, creates ``TPRankActor`` 1 .. tp-1 (each asking the pool's per-rank resources:
one GPU each on a GPU pool) in rank 0's placement group when it has one, else pinned to
rank 0's node, and joins the group as rank 0. The rank actors are created by rank 0's
actor, so Ray kills them when it dies: a restart of rank 0 (``max_restarts``) is a restart
of the whole instance, with a new group and new caches. A rank actor whose group breaks
exits (its rank 0 exits too: ``WorkerActorCalls.exit_when_group_breaks``).

A prefill rank runs ``prefill_worker.follower.run_prefill_follower`` with its own KV
sender; a decode rank ``decode_worker.follower.run_decode_follower`` with its own KV
receiver (its shared-memory segment is named after rank 0's actor and the rank, so a
restarted instance replaces it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from typing import Any

import ray

from pdserve.engine.config import EngineConfig
from pdserve.engine.parallel.group import TPGroup, TPGroupConfig
from pdserve.engine.parallel.rank_launcher import RankLauncher
from pdserve.kv_transfer.backend_config import KVTransferConfig

log = logging.getLogger(__name__)

ROLES = ("prefill", "decode")
DEFAULT_GROUP_TIMEOUT_S = 60.0


class RayRankLauncher(RankLauncher):
    def __init__(self, role: str, kv: KVTransferConfig, num_cpus: float = 1.0,
                 num_gpus: float = 0.0, resources: dict[str, float] | None = None,
                 torch_threads: int | None = None,
                 timeout_s: float = DEFAULT_GROUP_TIMEOUT_S, bundle_index: int = -1):
        """``bundle_index``: rank 0's bundle in its placement group (the ranks go there,
        which holds the instance's tp GPUs); -1: any bundle of a STRICT_PACK group."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        self.role = role
        self.kv = kv
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.resources = dict(resources or {})
        self.torch_threads = torch_threads
        self.timeout_s = timeout_s
        self.bundle_index = bundle_index
        self._actors: list[Any] = []  # held: a dropped handle would end its actor

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_actors": []}

    def start(self, config: EngineConfig, worker_id: str) -> TPGroup:
        tp = config.tensor_parallel_size
        if tp < 2:
            raise ValueError(f"a rank launcher starts tp >= 2 instances, got {tp}")
        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((ip, 0))
            init_method = f"tcp://{ip}:{s.getsockname()[1]}"
        ctx = ray.get_runtime_context()
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus,
                                   "max_restarts": 0,
                                   "scheduling_strategy": _beside_me(ctx, self.bundle_index)}
        if self.resources:
            options["resources"] = self.resources
        instance_key = ctx.get_actor_id() or worker_id
        self._actors = [TPRankActor.options(name=None, **options).remote(
            self.role, worker_id, config, r, init_method, self.kv, self.torch_threads,
            f"{instance_key}-rank{r}", self.timeout_s) for r in range(1, tp)]
        log.info("%s: started %d tensor-parallel ranks; joining at %s", worker_id, tp - 1,
                 init_method)
        try:
            return TPGroup.join(TPGroupConfig(tp, 0, init_method, config.resolve_device().type,
                                              self.timeout_s))
        except BaseException:
            self.close()
            raise

    def rank_pids(self) -> list:
        """Object refs of the process ids of ranks 1 .. tp-1 (await or ``ray.get`` them)."""
        return [a.pid.remote() for a in self._actors]

    def close(self) -> None:
        actors, self._actors = self._actors, []
        for a in actors:
            with contextlib.suppress(Exception):  # already gone
                ray.kill(a)


def _beside_me(ctx, bundle_index: int) -> Any:
    """Rank 0's bundle of its placement group or, outside one, rank 0's node."""
    from ray.util import get_current_placement_group
    from ray.util.scheduling_strategies import (
        NodeAffinitySchedulingStrategy,
        PlacementGroupSchedulingStrategy,
    )

    pg = get_current_placement_group()
    if pg is not None:
        return PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle_index)
    return NodeAffinitySchedulingStrategy(ctx.get_node_id(), soft=False)


@ray.remote(max_restarts=0)
class TPRankActor:
    """Rank ``rank`` of a tensor-parallel worker: follows rank 0 in a thread."""

    def __init__(self, role: str, worker_id: str, config: EngineConfig, rank: int,
                 init_method: str, kv: KVTransferConfig, torch_threads: int | None,
                 instance_key: str, timeout_s: float):
        args = (role, worker_id, config, rank, init_method, kv, torch_threads, instance_key,
                timeout_s)
        threading.Thread(target=self._main, args=args, daemon=True,
                         name=f"pdserve-tp-rank{rank}").start()

    def _main(self, role, worker_id, config, rank, init_method, kv, torch_threads,
              instance_key, timeout_s) -> None:
        group = None
        try:
            if torch_threads:
                import torch

                torch.set_num_threads(torch_threads)
            group = TPGroup.join(TPGroupConfig(config.tensor_parallel_size, rank, init_method,
                                               config.resolve_device().type, timeout_s))
            if role == "prefill":
                from pdserve.kv_transfer.registry import create_sender
                from pdserve.prefill_worker.follower import run_prefill_follower

                steps = run_prefill_follower(config, group,
                                             create_sender(kv.backend, auth_token=kv.auth_token),
                                             kv.timeout_s)
            else:
                from pdserve.decode_worker.build import receiver_factory
                from pdserve.decode_worker.follower import run_decode_follower

                steps = run_decode_follower(
                    config, group, receiver_factory(f"{worker_id}-rank{rank}", config, kv,
                                                    instance_key))
            log.info("%s rank %d: rank 0 closed after %d steps", worker_id, rank, steps)
        except BaseException:
            # The group is broken (rank 0 or a peer is gone): leave no half-instance.
            log.exception("%s rank %d: leaving the instance", worker_id, rank)
            os._exit(1)
        finally:
            if group is not None:
                group.close()

    def pid(self) -> int:
        return os.getpid()

