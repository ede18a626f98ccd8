"""What rank 0 of a tensor-parallel instance tells the other ranks each step, as integers.

Rank 0 schedules; every rank must run the same inputs so that the model's collectives line
up. ``StepInputs`` is that message. It crosses the process boundary as one flat list of
int64 (``encode``/``decode``), never pickled: ``decode`` checks every count against the
payload's length and every value against the receiving rank's limits (block ids below its
cache's block count, token ids inside the vocabulary) before building the frozen
dataclasses, so a corrupt or mismatched message fails loudly on the follower instead of
running wrong inputs.

Wire form (all int64): ``[step_id, kind, all_logits, n_seq, reply]``, then per sequence
``[start, n_tokens, n_blocks, sample]``, then every sequence's token ids, then every
sequence's block table. ``extra`` travels beside it as bytes (``step_channel``).

``extra`` is the worker layer's: opaque here (``engine/`` may not know about KV
transfers), decoded by the follower's ``RankHooks`` with a typed codec (a prefill step's KV
sends, a decode instance's reservations). ``reply`` > 0 asks every rank, after the message
(after the model for a RUN), for that many integers, combined by an all-reduce MIN on
every rank (``TPGroup.agree_min``): how rank 0 learns that every rank's KV sends finished.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

HEAD = 5      # step_id, kind, all_logits, n_seq, reply
MAX_REPLY = 1 << 16
PER_SEQ = 4   # start, n_tokens, n_blocks, sample


class StepKind(IntEnum):
    RUN = 1       # run these inputs
    SHUTDOWN = 2  # leave the group and return
    IDLE = 3      # nothing to run: rank 0 is alive (keeps the followers' wait bounded)
    CONTROL = 4   # no model: the worker layer's ``extra`` only (e.g. KV to ship, blocks reserved)


@dataclass(frozen=True)
class StepSequence:
    """One sequence's share of a step: ``token_ids`` at positions ``start ..``, in the KV
    blocks ``block_table``; ``sample``: its last token's logits are wanted."""

    token_ids: tuple[int, ...]
    start: int
    block_table: tuple[int, ...]
    sample: bool

    def __post_init__(self) -> None:
        if not self.token_ids:
            raise ValueError("a step sequence has at least one token")
        if self.start < 0:
            raise ValueError(f"start must be >= 0, got {self.start}")
        if any(b < 0 for b in self.block_table):
            raise ValueError("block ids must be >= 0")
        if any(t < 0 for t in self.token_ids):
            raise ValueError("token ids must be >= 0")


@dataclass(frozen=True)
class StepInputs:
    """``step_id`` grows by one per message, so a follower notices a lost or repeated one.
    A RUN has sequences; the other kinds have none. Only RUN and CONTROL carry ``extra``
    or ask for a ``reply``."""

    step_id: int
    kind: StepKind
    sequences: tuple[StepSequence, ...] = ()
    all_logits: bool = False
    extra: bytes = b""
    reply: int = 0

    def __post_init__(self) -> None:
        if self.step_id < 0:
            raise ValueError(f"step_id must be >= 0, got {self.step_id}")
        if (self.kind == StepKind.RUN) != bool(self.sequences):
            raise ValueError(f"a {self.kind.name} step has "
                             f"{'no' if self.kind != StepKind.RUN else 'some'} sequences")
        if not 0 <= self.reply <= MAX_REPLY:
            raise ValueError(f"reply must be in [0, {MAX_REPLY}], got {self.reply}")
        if (self.extra or self.reply) and self.kind not in (StepKind.RUN, StepKind.CONTROL):
            raise ValueError(f"a {self.kind.name} message carries no extra and asks no reply")


def encode(msg: StepInputs) -> list[int]:
    """The integers of ``msg`` (``extra`` travels separately)."""
    out = [msg.step_id, int(msg.kind), int(msg.all_logits), len(msg.sequences), msg.reply]
    for s in msg.sequences:
        out += [s.start, len(s.token_ids), len(s.block_table), int(s.sample)]
    for s in msg.sequences:
        out += s.token_ids
    for s in msg.sequences:
        out += s.block_table
    return out


def decode(payload: Sequence[int], num_blocks: int, vocab_size: int,
           extra: bytes = b"") -> StepInputs:
    """The message in ``payload`` (and ``extra``); ValueError if it is malformed or exceeds
    the limits."""
    if len(payload) < HEAD:
        raise ValueError(f"step message of {len(payload)} ints is shorter than its header")
    step_id, kind, all_logits, n_seq, reply = payload[:HEAD]
    try:
        kind = StepKind(kind)
    except ValueError:
        raise ValueError(f"unknown step kind {kind}") from None
    if all_logits not in (0, 1) or n_seq < 0:
        raise ValueError(f"bad step header {list(payload[:HEAD])}")
    per_seq_end = HEAD + PER_SEQ * n_seq
    if len(payload) < per_seq_end:
        raise ValueError(f"step message too short for {n_seq} sequences")
    heads = [payload[HEAD + PER_SEQ * i:HEAD + PER_SEQ * (i + 1)] for i in range(n_seq)]
    if any(n < 0 or b < 0 or sample not in (0, 1) for _, n, b, sample in heads):
        raise ValueError("bad sequence header in step message")
    want = per_seq_end + sum(n + b for _, n, b, _ in heads)
    if len(payload) != want:
        raise ValueError(f"step message has {len(payload)} ints, its counts say {want}")
    pos = per_seq_end
    tokens = []
    for _, n, _, _ in heads:
        tokens.append(tuple(payload[pos:pos + n]))
        pos += n
    tables = []
    for _, _, b, _ in heads:
        tables.append(tuple(payload[pos:pos + b]))
        pos += b
    if any(not 0 <= t < vocab_size for ids in tokens for t in ids):
        raise ValueError(f"token id outside the vocabulary [0, {vocab_size})")
    if any(not 0 <= b < num_blocks for table in tables for b in table):
        raise ValueError(f"block id outside the cache's {num_blocks} blocks")
    seqs = tuple(StepSequence(ids, start, table, bool(sample))
                 for (start, _, _, sample), ids, table in zip(heads, tokens, tables, strict=True))
    return StepInputs(step_id, kind, seqs, bool(all_logits), bytes(extra), reply)
