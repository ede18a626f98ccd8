"""Where a request's KV goes when the decode instance spans several TP ranks.

A decode instance of ``tp`` ranks reserves the same block ids on every rank (the ranks'
caches have one block count and one block table: ``engine/loader.py``); each rank's cache
holds only its KV heads (``kv_head_range``) and its receiver publishes its own
``KVEndpoint``. ``TPKVDestination`` carries all of them, rank by rank, so a prefill rank
can address exactly the receiver ranks its heads go to (``tp_send.py``). Torch-free, frozen
and validated on construction, like ``KVDestination`` (the router hands it on).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

from pdserve.engine.parallel.shard import kv_head_range
from pdserve.kv_transfer.messages import KVDestination, KVEndpoint


@dataclass(frozen=True)
class TPKVDestination:
    """``endpoints[r]``: decode rank ``r``'s receiver, whose cache holds its share of the
    model's ``num_kv_heads`` KV heads; ``block_ids``: the blocks reserved on every rank."""

    transfer_id: str
    endpoints: tuple[KVEndpoint, ...]
    block_ids: tuple[int, ...]
    num_tokens: int
    num_kv_heads: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "endpoints", tuple(self.endpoints))
        object.__setattr__(self, "block_ids", tuple(operator.index(b) for b in self.block_ids))
        if not self.endpoints:
            raise ValueError("a TP destination names at least one receiving rank")
        tp = len(self.endpoints)
        first = self.endpoints[0]
        for r, ep in enumerate(self.endpoints):
            if not isinstance(ep, KVEndpoint):
                raise ValueError("TPKVDestination.endpoints must be KVEndpoints")
            want = len(kv_head_range(self.num_kv_heads, tp, r))
            if ep.spec.num_kv_heads != want:
                raise ValueError(f"decode rank {r} of {tp} holds {want} of {self.num_kv_heads} "
                                 f"KV heads, its endpoint says {ep.spec.num_kv_heads}")
            if ep.backend != first.backend:
                raise ValueError("every rank's endpoint must use one backend")
            same = ("num_layers", "num_blocks", "block_size", "head_dim", "dtype")
            if any(getattr(ep.spec, n) != getattr(first.spec, n) for n in same):
                raise ValueError(f"decode rank {r}'s cache differs from rank 0's beyond its heads")
        self.rank(0)  # validates transfer id, blocks and token count once

    @classmethod
    def of(cls, dest: KVDestination, num_kv_heads: int) -> TPKVDestination:
        """The whole view of ``dest`` (its ``rank_endpoints``, if any) for a model of
        ``num_kv_heads`` KV heads; validated as any other."""
        return cls(dest.transfer_id, (dest.endpoint, *dest.rank_endpoints), dest.block_ids,
                   dest.num_tokens, num_kv_heads)

    @property
    def tp(self) -> int:
        return len(self.endpoints)

    def rank(self, r: int) -> KVDestination:
        """The single-cache destination of decode rank ``r``."""
        return KVDestination(self.transfer_id, self.endpoints[r], self.block_ids,
                             self.num_tokens)

    def as_destination(self) -> KVDestination:
        """The one message that names every rank (what a decode worker hands out)."""
        return KVDestination(self.transfer_id, self.endpoints[0], self.block_ids,
                             self.num_tokens, self.endpoints[1:])
