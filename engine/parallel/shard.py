"""Which share of a Llama-family model one tensor-parallel rank holds (torch-free).

Megatron-style sharding, as vLLM does it: attention heads and MLP columns are split in
contiguous ranges over the ranks (column-parallel q/k/v and gate/up, row-parallel o_proj
and down_proj), the vocabulary is split in equal contiguous ranges (padded with zero rows
so every rank's share has the same size, which a gather needs), norms are replicated.

KV heads: with ``tp <= num_kv_heads`` (``tp`` dividing it) rank ``r`` holds heads
``[r * H/tp, (r+1) * H/tp)``; with ``tp > num_kv_heads`` (``num_kv_heads`` dividing ``tp``)
each rank holds one KV head, replicated on ``tp / H`` consecutive ranks, so rank ``r``
holds head ``r // (tp / H)``. Either way a rank's query heads only ever read its own KV
heads. ``kv_head_range`` is the one place that says which global KV heads a rank's cache
holds; the KV transfer plan between TP degrees (``kv_transfer/tp_plan.py``) is built on it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pdserve.engine.model_config import ModelConfig


@dataclass(frozen=True)
class HeadRange:
    """Global indices ``[start, stop)`` of consecutive heads (or rows)."""

    start: int
    stop: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.stop:
            raise ValueError(f"need 0 <= start < stop, got [{self.start}, {self.stop})")

    def __len__(self) -> int:
        return self.stop - self.start


def check_tp_size(num_kv_heads: int, tp_size: int) -> None:
    """ValueError unless ``tp_size`` divides ``num_kv_heads`` or is a multiple of it."""
    if tp_size < 1:
        raise ValueError(f"tensor parallel size must be >= 1, got {tp_size}")
    if num_kv_heads < 1:
        raise ValueError(f"num_kv_heads must be >= 1, got {num_kv_heads}")
    if num_kv_heads % tp_size and tp_size % num_kv_heads:
        raise ValueError(
            f"tensor parallel size {tp_size} must divide the {num_kv_heads} KV heads "
            f"or be a multiple of them (then each KV head is replicated)"
        )


def kv_head_range(num_kv_heads: int, tp_size: int, rank: int) -> HeadRange:
    """The global KV heads rank ``rank`` of a ``tp_size`` group holds in its cache."""
    check_tp_size(num_kv_heads, tp_size)
    if not 0 <= rank < tp_size:
        raise ValueError(f"rank must be in [0, {tp_size}), got {rank}")
    if tp_size <= num_kv_heads:
        per = num_kv_heads // tp_size
        return HeadRange(rank * per, (rank + 1) * per)
    head = rank // (tp_size // num_kv_heads)
    return HeadRange(head, head + 1)


def kv_head_replicas(num_kv_heads: int, tp_size: int) -> int:
    """How many ranks hold each KV head (1 unless ``tp_size > num_kv_heads``)."""
    check_tp_size(num_kv_heads, tp_size)
    return max(1, tp_size // num_kv_heads)


def even_range(n: int, parts: int, index: int) -> HeadRange:
    """Part ``index`` of ``[0, n)`` cut into ``parts`` contiguous pieces whose sizes differ
    by at most one (the MLP width need not divide by tp: a row-parallel sum is exact
    whatever the split)."""
    if not 0 < parts <= n:
        raise ValueError(f"cannot split {n} into {parts} non-empty parts")
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return HeadRange(start, start + base + (index < extra))


@dataclass(frozen=True)
class TPShard:
    """Rank ``rank`` of ``size``: the global ranges of the model it holds.

    ``vocab_per_rank`` rows of the embedding and LM head live on every rank, for token ids
    from ``vocab_start``; the ``vocab_rows`` of them below ``vocab_size`` are real, the rest
    (on the last ranks only) are zero padding.
    """

    size: int
    rank: int
    q_heads: HeadRange
    kv_heads: HeadRange
    kv_replicas: int
    intermediate: HeadRange
    vocab_per_rank: int
    vocab_rows: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank must be in [0, {self.size}), got {self.rank}")
        if not 0 <= self.vocab_rows <= self.vocab_per_rank:
            raise ValueError("need 0 <= vocab_rows <= vocab_per_rank")

    @classmethod
    def for_rank(cls, config: ModelConfig, size: int = 1, rank: int = 0) -> TPShard:
        """The shard of ``config`` that rank ``rank`` of a ``size``-rank group holds;
        ValueError if the model cannot be split ``size`` ways."""
        check_tp_size(config.num_kv_heads, size)
        if config.num_heads % size:
            raise ValueError(
                f"tensor parallel size {size} must divide the {config.num_heads} attention heads")
        q_per = config.num_heads // size
        per_vocab = -(-config.vocab_size // size)
        return cls(
            size=size,
            rank=rank,
            q_heads=HeadRange(rank * q_per, (rank + 1) * q_per),
            kv_heads=kv_head_range(config.num_kv_heads, size, rank),
            kv_replicas=kv_head_replicas(config.num_kv_heads, size),
            intermediate=even_range(config.intermediate_size, size, rank),
            vocab_per_rank=per_vocab,
            # A tiny vocab split many ways can leave a last rank with padding only.
            vocab_rows=max(0, min(per_vocab, config.vocab_size - rank * per_vocab)),
        )

    @property
    def is_sharded(self) -> bool:
        return self.size > 1

    @property
    def vocab_start(self) -> int:
        """First global token id of this rank's (padded) vocabulary share."""
        return self.rank * self.vocab_per_rank

    def local_config(self, config: ModelConfig) -> ModelConfig:
        """``config`` as this rank sees it: its own query/KV heads and MLP width, which is
        what its attention backend, KV cache and matmuls are sized by. Hidden size, vocab
        size and everything else stay global (the logits a rank returns are global)."""
        if not self.is_sharded:
            return config
        return dataclasses.replace(config, num_heads=len(self.q_heads),
                                   num_kv_heads=len(self.kv_heads),
                                   intermediate_size=len(self.intermediate))
