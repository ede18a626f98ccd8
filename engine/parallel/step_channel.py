"""Rank 0's step messages to the other ranks of its group, over gloo broadcasts.

Each message is two or three ``broadcast`` calls from rank 0 on the group's control (gloo)
group: a fixed ``int64[4]`` header ``[MAGIC, VERSION, payload length, extra length]``, the
payload (``step_message.encode``) as one int64 tensor, then, if there is one, the worker
layer's ``extra`` as one uint8 tensor. Integers and bytes only, never pickle. Every rank
calls ``send`` (rank 0) or ``recv`` (the others) in the same order; the group's timeout
bounds each call, and a peer that has gone makes it raise (gloo sees the closed
connection), so a broken instance fails instead of hanging.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pdserve.engine.parallel.group import TPGroup
from pdserve.engine.parallel.step_message import StepInputs, decode, encode

MAGIC = 0x5044_5354_4550  # "PDSTEP"
VERSION = 2
# A step carries at most max_num_batched_tokens tokens plus block tables: far below this.
MAX_PAYLOAD_INTS = 1 << 24
MAX_EXTRA_BYTES = 1 << 26


class StepChannel:
    def __init__(self, group: TPGroup):
        if group.control is None:
            raise ValueError("the group has no control group (join it with TPGroup.join)")
        self.group = group
        self._next_id = 0

    def send(self, msg: StepInputs) -> None:
        """Rank 0: broadcast ``msg`` (its ``step_id`` must be the next one)."""
        if not self.group.is_first:
            raise RuntimeError("only rank 0 sends step messages")
        if msg.step_id != self._next_id:
            raise ValueError(f"step id {msg.step_id}, expected {self._next_id}")
        payload = torch.tensor(encode(msg), dtype=torch.int64)
        if payload.numel() > MAX_PAYLOAD_INTS:
            raise ValueError(f"step message of {payload.numel()} ints exceeds {MAX_PAYLOAD_INTS}")
        if len(msg.extra) > MAX_EXTRA_BYTES:
            raise ValueError(f"step extra of {len(msg.extra)} bytes exceeds {MAX_EXTRA_BYTES}")
        header = torch.tensor([MAGIC, VERSION, payload.numel(), len(msg.extra)],
                              dtype=torch.int64)
        dist.broadcast(header, src=0, group=self.group.control)
        dist.broadcast(payload, src=0, group=self.group.control)
        if msg.extra:
            extra = torch.frombuffer(bytearray(msg.extra), dtype=torch.uint8)
            dist.broadcast(extra, src=0, group=self.group.control)
        self._next_id += 1

    def next_id(self) -> int:
        return self._next_id

    def recv(self, num_blocks: int, vocab_size: int) -> StepInputs:
        """The other ranks: the next message, validated against this rank's limits."""
        if self.group.is_first:
            raise RuntimeError("rank 0 sends step messages, it does not receive them")
        header = torch.empty(4, dtype=torch.int64)
        dist.broadcast(header, src=0, group=self.group.control)
        magic, version, n, n_extra = header.tolist()
        if (magic != MAGIC or version != VERSION or not 0 < n <= MAX_PAYLOAD_INTS
                or not 0 <= n_extra <= MAX_EXTRA_BYTES):
            raise ValueError(f"bad step message header {header.tolist()}")
        payload = torch.empty(n, dtype=torch.int64)
        dist.broadcast(payload, src=0, group=self.group.control)
        extra = b""
        if n_extra:
            buf = torch.empty(n_extra, dtype=torch.uint8)
            dist.broadcast(buf, src=0, group=self.group.control)
            extra = buf.numpy().tobytes()
        msg = decode(payload.tolist(), num_blocks, vocab_size, extra)
        if msg.step_id != self._next_id:
            raise ValueError(f"step message {msg.step_id} arrived, expected {self._next_id}")
        self._next_id += 1
        return msg
