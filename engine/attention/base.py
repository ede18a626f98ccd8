"""The attention-backend plug-in interface.

Lifecycle per engine step: the model runner builds one ``AttentionMetadata`` for the
step's batch, calls ``backend.plan(meta)`` once (index arrays, masks, kernel plans are
computed here and shared by every layer), then the model calls
``backend.forward(layer, q, k, v, (k_cache, v_cache))`` for each layer. ``forward``
writes this step's K/V into the paged cache at ``meta.slot_mapping`` and attends each
query token to its sequence's cached history, causally, bottom-right aligned (query
``i`` of a sequence with ``q_len`` new and ``kv_len`` total tokens sees keys
``0 .. kv_len - q_len + i``), within the layer's sliding window if it has one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from pdserve.engine.model_config import ModelConfig


@dataclass(frozen=True)
class AttentionMetadata:
    """One step's batch layout. Sequences are in the order their tokens appear in q."""

    query_lens: tuple[int, ...]  # new tokens per sequence this step
    seq_lens: tuple[int, ...]  # KV length per sequence after this step's tokens are written
    block_tables: tuple[tuple[int, ...], ...]
    slot_mapping: torch.Tensor  # [T] int64 cache slot of every new token
    block_size: int

    def __post_init__(self) -> None:
        if not (len(self.query_lens) == len(self.seq_lens) == len(self.block_tables)):
            raise ValueError("query_lens, seq_lens and block_tables must have one entry per sequence")
        for q, s, bt in zip(self.query_lens, self.seq_lens, self.block_tables, strict=True):
            if not (1 <= q <= s):
                raise ValueError(f"need 1 <= query_len <= seq_len, got {q}, {s}")
            if len(bt) * self.block_size < s:
                raise ValueError(f"block table of {len(bt)} blocks cannot hold {s} tokens")

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    @property
    def is_decode_only(self) -> bool:
        return all(q == 1 for q in self.query_lens)


class AttentionBackend(ABC):
    """Paged attention. Subclasses register themselves in ``registry.BACKENDS``."""

    name: str = ""
    # Whether the backend can run decode steps inside a CUDA graph: it then implements
    # ``init_cuda_graphs`` and ``plan_for_graph`` (see flashinfer_backend.py).
    supports_cuda_graphs: bool = False

    def __init__(self, config: ModelConfig, device: torch.device, dtype: torch.dtype):
        self.config = config
        self.device = device
        self.dtype = dtype  # of q and the KV cache at run time
        self.scale = config.head_dim ** -0.5
        self.sliding_windows = config.sliding_windows

    @abstractmethod
    def plan(self, meta: AttentionMetadata) -> None:
        """Prepare for one step; called once before the first layer."""

    def init_cuda_graphs(self, sizes, max_pages_per_seq: int) -> None:
        """Prepare per-size state for decode graphs of these batch sizes."""
        raise NotImplementedError(f"the {self.name} attention backend has no CUDA graphs")

    def plan_for_graph(self, meta: AttentionMetadata) -> None:
        """Like ``plan`` for a decode batch padded to a captured size, with state a graph
        captured once can replay (called outside the graph, before every replay)."""
        raise NotImplementedError(f"the {self.name} attention backend has no CUDA graphs")

    @abstractmethod
    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] (RoPE applied) -> output [T, Hq, D]."""


def write_kv(k: torch.Tensor, v: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
             slot_mapping: torch.Tensor) -> None:
    """Scatter this step's K/V into the paged cache (slot = block * block_size + offset)."""
    k_cache, v_cache = kv
    h, d = k_cache.shape[-2:]
    k_cache.view(-1, h, d).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, h, d).index_copy_(0, slot_mapping, v)
