"""Who starts the other ranks of a tensor-parallel instance: the plug-in interface.

Rank 0 is the worker the rest of the system knows; before it loads its shard it asks a
``RankLauncher`` to start ranks 1 .. tp-1 and joins the group with them. A cluster on Ray
starts one Ray actor per rank on rank 0's node (``cluster/launch/tp_ranks.py``: the actors
are owned by rank 0's, so they die with it and a restart of rank 0 restarts the whole
instance). What the followers run (a prefill rank that ships KV, a decode rank that
receives it) is the launcher's business. (``local_instance.LocalTPInstance``, for
``pdserve complete --tp N`` and the profiler, starts plain followers as child processes
without this interface: torch.distributed allows one group per process, so the pools'
workers, which need one each, run as separate processes under Ray.)
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from pdserve.engine.config import EngineConfig
from pdserve.engine.parallel.group import TPGroup


class RankLauncher(ABC):
    @abstractmethod
    def start(self, config: EngineConfig, worker_id: str) -> TPGroup:
        """Start ranks 1 .. ``config.tensor_parallel_size`` - 1 for worker ``worker_id``
        and join the group as rank 0 (blocks until every rank has joined or the group's
        timeout passes, then raises)."""

    @abstractmethod
    def close(self) -> None:
        """Stop the followers (after rank 0's runner sent SHUTDOWN, or to tear down a broken
        instance); idempotent."""


def start_ranks(ranks: RankLauncher | None, config: EngineConfig, worker_id: str
                ) -> TPGroup | None:
    """Rank 0's group for ``config`` (None at tp 1); a launcher is required above tp 1."""
    if config.tensor_parallel_size == 1:
        return None
    if ranks is None:
        raise ValueError(f"{worker_id}: tensor_parallel_size {config.tensor_parallel_size} "
                         "needs a RankLauncher to start the other ranks")
    return ranks.start(config, worker_id)
