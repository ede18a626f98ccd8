"""One rank's membership of a tensor-parallel group, and the collectives the model runs.

Lifecycle: every rank process builds a ``TPGroupConfig`` (same ``size`` and
``init_method``, its own ``rank``) and calls ``TPGroup.join``, which blocks until all
ranks have joined (``torch.distributed.init_process_group``); the model then calls
``all_reduce_`` (row-parallel layers, vocab-parallel embedding), ``gather_to_first``
(the LM head's vocabulary shares, to rank 0, which samples) and ``min_int`` (agreeing on
the KV cache's block count); ``close`` leaves the group. The backend follows the device:
gloo on CPU, NCCL on CUDA; the calls are the same. A group of one rank is never built:
tp=1 runs without torch.distributed at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPGroupConfig:
    """``init_method``: a ``tcp://host:port`` every rank can reach (rank 0 listens there).
    ``timeout_s`` bounds every collective: a rank that died makes the others fail rather
    than hang (gloo honours it on CPU; NCCL needs its async error handling, on by default)."""

    size: int
    rank: int
    init_method: str
    device: str = "cpu"
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.size < 2:
            raise ValueError(f"a tensor-parallel group has >= 2 ranks, got {self.size}")
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank must be in [0, {self.size}), got {self.rank}")
        if not self.init_method.startswith(("tcp://", "file://", "env://")):
            raise ValueError(f"init_method must be tcp://, file:// or env://, got {self.init_method!r}")
        if self.timeout_s <= 0:
            raise ValueError("timeout_s must be positive")

    @property
    def backend(self) -> str:
        return "nccl" if torch.device(self.device).type == "cuda" else "gloo"


class TPGroup:
    """The collectives of one rank; ``rank``/``size`` as in its config."""

    def __init__(self, config: TPGroupConfig, group: dist.ProcessGroup | None = None,
                 control: dist.ProcessGroup | None = None):
        self.config = config
        self.rank = config.rank
        self.size = config.size
        self.group = group
        # gloo over the same ranks, for rank 0's per-step messages (CPU tensors): on CUDA
        # the model's group is NCCL, as vLLM keeps a cpu_group beside its device_group.
        self.control = control

    @classmethod
    def join(cls, config: TPGroupConfig) -> TPGroup:
        """Join the group (blocks until every rank has); one group per process."""
        if config.backend == "nccl":
            torch.cuda.set_device(torch.device(config.device))
        dist.init_process_group(config.backend, init_method=config.init_method,
                                rank=config.rank, world_size=config.size,
                                timeout=timedelta(seconds=config.timeout_s))
        control = dist.group.WORLD if config.backend == "gloo" else dist.new_group(
            backend="gloo", timeout=timedelta(seconds=config.timeout_s))
        return cls(config, dist.group.WORLD, control)

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place; every rank gets the same bits."""
        dist.all_reduce(t, group=self.group)
        return t

    def gather_to_first(self, t: torch.Tensor) -> torch.Tensor | None:
        """Rank 0: every rank's ``t`` (same shape everywhere) concatenated along the last
        dimension in rank order; other ranks: None."""
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.size)] if self.is_first else None
        dist.gather(t, parts, dst=0, group=self.group)
        return torch.cat(parts, dim=-1) if parts is not None else None

    def min_int(self, value: int) -> int:
        """The smallest ``value`` over the ranks (each rank may see different free memory)."""
        t = torch.tensor([value], dtype=torch.int64,
                         device=self.config.device if self.config.backend == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())

    def agree_min(self, values: Sequence[int]) -> list[int]:
        """Element-wise MIN of every rank's ``values`` (same length everywhere), on the
        control group: how rank 0 learns that every rank's part of something succeeded."""
        t = torch.tensor(list(values), dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.control)
        return t.tolist()

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's ``data``, in rank order, on the control group (bytes only: the
        caller decodes them with a typed codec; nothing is unpickled)."""
        n = torch.tensor([len(data)], dtype=torch.int64)
        sizes = [torch.empty_like(n) for _ in range(self.size)]
        dist.all_gather(sizes, n, group=self.control)
        width = max(int(s.item()) for s in sizes)
        mine = torch.zeros(max(width, 1), dtype=torch.uint8)
        mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else 0
        parts = [torch.empty_like(mine) for _ in range(self.size)]
        dist.all_gather(parts, mine, group=self.control)
        return [p[:int(s.item())].numpy().tobytes() for p, s in zip(parts, sizes, strict=True)]

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
