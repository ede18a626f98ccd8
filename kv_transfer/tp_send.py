"""One prefill rank's share of a request's KV, sent to a decode instance of any TP degree.

Lifecycle, on every rank ``r`` of a prefill instance of ``tp`` ranks, per request:
``sends = RankSends.begin(sender, dest, r, tp, src_spec)`` opens one ``Transfer`` per
``HeadTransfer`` of ``plan_for(...).from_sender(r)`` (a head slice to one decode rank);
after each layer, ``sends.send_layer(layer, kv)`` with this rank's K/V of the request's
blocks (all its heads), from which each transfer takes its heads; ``sends.finish()``;
``sends.abort()`` on any failure (idempotent). A rank whose heads no receiver draws from
(a replica) has nothing to send. The receivers' caches, together, then hold the KV of a
tp 1 prefill, each rank exactly its heads. Every backend takes head slices the same way
(``KVSender.begin(..., heads=)``): shm and CUDA IPC copy into a strided view of the
receiver's blocks, TCP frames name the heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from pdserve.engine.kv_cache import KVCacheSpec
from pdserve.kv_transfer.base import KVSender, Transfer
from pdserve.kv_transfer.messages import HeadSlice, KVDigest
from pdserve.kv_transfer.tp_destination import TPKVDestination
from pdserve.kv_transfer.tp_plan import HeadTransfer, TPTransferPlan


@lru_cache(maxsize=256)
def plan_for(num_kv_heads: int, sender_tp: int, receiver_tp: int) -> TPTransferPlan:
    """The plan of a (prefill, decode) pair of degrees, computed once."""
    return TPTransferPlan.build(num_kv_heads, sender_tp, receiver_tp)


@dataclass
class RankSends:
    sender: KVSender
    parts: list[tuple[HeadTransfer, Transfer]]

    @classmethod
    def begin(cls, sender: KVSender, dest: TPKVDestination, rank: int, tp: int,
              src_spec: KVCacheSpec, checksum: str = "off") -> RankSends:
        """Open this rank's transfers (none if no receiver draws from it); on an error the
        ones already open are aborted and it is raised."""
        plan = plan_for(dest.num_kv_heads, tp, dest.tp)
        sends = cls(sender, [])
        try:
            for t in plan.from_sender(rank):
                to = dest.rank(t.receiver)
                whole = (t.sender_offset == t.receiver_offset == 0
                         and len(t.heads) == src_spec.num_kv_heads
                         == to.endpoint.spec.num_kv_heads)
                # A whole cache to a whole cache (equal degrees) is a plain transfer: its
                # frames and checksum are those of tp 1.
                heads = None if whole else HeadSlice(t.sender_offset, t.receiver_offset,
                                                     len(t.heads))
                sends.parts.append((t, sender.begin(to, src_spec, checksum, heads)))
        except BaseException:
            sends.abort()
            raise
        return sends

    @property
    def bytes_sent(self) -> int:
        return sum(t.bytes_sent for _, t in self.parts)

    @property
    def started_at(self) -> float | None:
        return min((t.started_at for _, t in self.parts), default=None)

    @property
    def finished_at(self) -> float | None:
        ends = [t.finished_at for _, t in self.parts]
        return None if not ends or None in ends else max(ends)

    def digest(self) -> KVDigest | None:
        """The KV checksum of a transfer of whole caches to one receiver (None otherwise,
        or when checksums are off): a digest of part of a receiver's heads is not built."""
        if len(self.parts) != 1 or self.parts[0][1].heads is not None:
            return None
        return self.parts[0][1].digest()

    @property
    def receivers(self) -> tuple[int, ...]:
        """The decode ranks this rank writes to."""
        return tuple(t.receiver for t, _ in self.parts)

    def send_layer(self, layer: int, kv: torch.Tensor) -> None:
        """``kv`` [2, n, P, H_rank, D]: this rank's K/V of the request's blocks, all its
        heads; each transfer ships its slice (a fresh contiguous copy)."""
        for t, transfer in self.parts:
            h0 = t.sender_offset
            self.sender.send_layer(transfer, layer,
                                   kv[:, :, :, h0:h0 + len(t.heads)].contiguous())

    def send_layers(self, first_layer: int, kv: torch.Tensor) -> None:
        """``kv`` [k, 2, n, P, H_rank, D]: layers ``first_layer ..`` stacked (all computed
        already); each transfer ships its heads of all of them at once."""
        for t, transfer in self.parts:
            h0 = t.sender_offset
            self.sender.send_layers(transfer, first_layer,
                                    kv[..., h0:h0 + len(t.heads), :].contiguous())

    def finish(self, timeout: float = 30.0) -> None:
        for _, transfer in self.parts:
            self.sender.finish(transfer, timeout)

    def abort(self) -> None:
        for _, transfer in self.parts:
            self.sender.abort(transfer)
