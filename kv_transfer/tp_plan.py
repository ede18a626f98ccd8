"""Which KV heads go from which prefill rank to which decode rank, across TP degrees.

A prefill instance of ``sender_tp`` ranks and a decode instance of ``receiver_tp`` ranks
each hold a model's ``num_kv_heads`` KV heads split as ``engine/parallel/shard.py`` says
(``kv_head_range``): contiguous ranges, or one head per rank replicated over
``tp / num_kv_heads`` ranks when tp exceeds the head count. The plan is computed once per
pair of instances and reused for every request; each receiving rank gets exactly the heads
its cache holds, each head exactly once, from a sender rank that holds it. Where several
sender ranks hold a head (replication) the one chosen is ``holders[receiver % replicas]``:
deterministic, and it spreads receivers over the replicas rather than loading the first.
Consecutive heads from one sender to one receiver form one ``HeadTransfer`` (they are
contiguous in both caches). Torch-free and pure: the plan is data, tested on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.engine.parallel.shard import HeadRange, check_tp_size, kv_head_range


@dataclass(frozen=True)
class HeadTransfer:
    """Sender rank ``sender`` sends global KV heads ``heads`` to receiver rank ``receiver``;
    they sit at local head index ``sender_offset`` in the sender's cache and go to local
    head index ``receiver_offset`` in the receiver's."""

    sender: int
    receiver: int
    heads: HeadRange
    sender_offset: int
    receiver_offset: int


@dataclass(frozen=True)
class TPTransferPlan:
    """Every ``HeadTransfer`` between a ``sender_tp`` and a ``receiver_tp`` instance, sorted
    by (receiver, first head). Construction checks the plan is complete and exact, so a
    plan that arrives from elsewhere is as trustworthy as one ``build`` made."""

    num_kv_heads: int
    sender_tp: int
    receiver_tp: int
    transfers: tuple[HeadTransfer, ...]

    def __post_init__(self) -> None:
        check_tp_size(self.num_kv_heads, self.sender_tp)
        check_tp_size(self.num_kv_heads, self.receiver_tp)
        object.__setattr__(self, "transfers", tuple(self.transfers))
        for r in range(self.receiver_tp):
            want = kv_head_range(self.num_kv_heads, self.receiver_tp, r)
            got: list[int] = []
            for t in self.to_receiver(r):
                _check_transfer(t, self.num_kv_heads, self.sender_tp, want)
                got.extend(range(t.heads.start, t.heads.stop))
            if sorted(got) != list(range(want.start, want.stop)):
                raise ValueError(f"receiver rank {r} holds KV heads [{want.start}, {want.stop}) "
                                 f"but the plan sends it heads {sorted(got)}")
        if any(not 0 <= t.receiver < self.receiver_tp for t in self.transfers):
            raise ValueError(f"a transfer names a receiver rank outside [0, {self.receiver_tp})")
        if list(self.transfers) != sorted(self.transfers, key=_order):
            raise ValueError("transfers must be sorted by (receiver, first head)")

    @classmethod
    def build(cls, num_kv_heads: int, sender_tp: int, receiver_tp: int) -> TPTransferPlan:
        """The plan for these degrees; ValueError if either cannot split the KV heads."""
        check_tp_size(num_kv_heads, sender_tp)
        check_tp_size(num_kv_heads, receiver_tp)
        replicas = max(1, sender_tp // num_kv_heads)
        transfers: list[HeadTransfer] = []
        for r in range(receiver_tp):
            mine = kv_head_range(num_kv_heads, receiver_tp, r)
            for h in range(mine.start, mine.stop):
                sender = _holder(num_kv_heads, sender_tp, h, r % replicas)
                last = transfers[-1] if transfers else None
                if last is not None and last.receiver == r and last.sender == sender \
                        and last.heads.stop == h:
                    transfers[-1] = HeadTransfer(sender, r, HeadRange(last.heads.start, h + 1),
                                                 last.sender_offset, last.receiver_offset)
                    continue
                src = kv_head_range(num_kv_heads, sender_tp, sender)
                transfers.append(HeadTransfer(sender, r, HeadRange(h, h + 1), h - src.start,
                                              h - mine.start))
        return cls(num_kv_heads, sender_tp, receiver_tp, tuple(transfers))

    def to_receiver(self, rank: int) -> tuple[HeadTransfer, ...]:
        """What receiver ``rank`` gets, in head order."""
        return tuple(t for t in self.transfers if t.receiver == rank)

    def from_sender(self, rank: int) -> tuple[HeadTransfer, ...]:
        """What sender ``rank`` sends (empty for a replica no receiver draws from)."""
        return tuple(t for t in self.transfers if t.sender == rank)


def _holder(num_kv_heads: int, tp: int, head: int, pick: int) -> int:
    """The ``pick``-th of the ranks of a ``tp`` group that hold ``head``."""
    if tp <= num_kv_heads:
        return head // (num_kv_heads // tp)
    return head * (tp // num_kv_heads) + pick


def _order(t: HeadTransfer) -> tuple[int, int]:
    return t.receiver, t.heads.start


def _check_transfer(t: HeadTransfer, num_kv_heads: int, sender_tp: int, dst: HeadRange) -> None:
    if not 0 <= t.sender < sender_tp:
        raise ValueError(f"sender rank {t.sender} outside [0, {sender_tp})")
    src = kv_head_range(num_kv_heads, sender_tp, t.sender)
    if not (src.start <= t.heads.start and t.heads.stop <= src.stop):
        raise ValueError(f"sender rank {t.sender} does not hold KV heads "
                         f"[{t.heads.start}, {t.heads.stop})")
    if t.sender_offset != t.heads.start - src.start or \
            t.receiver_offset != t.heads.start - dst.start:
        raise ValueError(f"offsets of {t} disagree with the ranks' head ranges")
