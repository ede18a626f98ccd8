"""Receiver-side bookkeeping of expected transfers, shared by every backend.

Lifecycle of one entry: ``expect`` (PENDING, blocks reserved) -> optionally TRANSFERRING
(a backend that sees bytes arrive, such as TCP, notes each layer) -> DONE or FAILED ->
``forget`` (the decode worker has adopted or released the blocks). Terminal states never
change again, so a late ABORT cannot undo a DONE and a late DONE cannot revive a FAILED.
Everything is guarded by one condition variable so ``wait`` wakes as soon as a
connection thread (or ``mark_delivered``) finishes a transfer.

Between TP degrees several senders fill one receiver's blocks, each with some of its KV
heads (``HeadSlice``): the table counts, per layer, which heads arrived; a sender's DONE
(naming its heads) fails the transfer if any of its layers is missing, and the transfer is
DONE once every layer has every head. A transfer streamed over several connections is
failed by the loss of any of them that has not finished its part.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from pdserve.kv_transfer.messages import validate_block_ids


class TransferState(enum.Enum):
    PENDING = "pending"
    TRANSFERRING = "transferring"
    DONE = "done"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in (TransferState.DONE, TransferState.FAILED)


_ALLOWED = {
    TransferState.PENDING: {TransferState.TRANSFERRING, TransferState.DONE, TransferState.FAILED},
    TransferState.TRANSFERRING: {TransferState.DONE, TransferState.FAILED},
    TransferState.DONE: set(),
    TransferState.FAILED: set(),
}


def can_transition(old: TransferState, new: TransferState) -> bool:
    return new is old or new in _ALLOWED[old]


@dataclass
class _Entry:
    block_ids: tuple[int, ...]
    state: TransferState = TransferState.PENDING
    layers: dict[int, set[int]] = field(default_factory=dict)  # layer -> heads arrived
    owners: set[int] = field(default_factory=set)  # connections streaming it, unfinished
    error: str = ""


@dataclass(frozen=True)
class ExpectedTransfer:
    """A read-only snapshot of one entry."""

    transfer_id: str
    block_ids: tuple[int, ...]
    state: TransferState
    layers_received: int
    error: str


class TransferTable:
    """Thread-safe map transfer_id -> expected transfer."""

    def __init__(self, num_layers: int, num_blocks: int, num_heads: int = 1):
        self._num_layers = num_layers
        self._num_blocks = num_blocks
        self._num_heads = num_heads
        self._cond = threading.Condition()
        self._entries: dict[str, _Entry] = {}

    def expect(self, transfer_id: str, block_ids: Sequence[int]) -> None:
        ids = tuple(int(b) for b in block_ids)
        validate_block_ids(ids, self._num_blocks)
        with self._cond:
            if transfer_id in self._entries:
                raise ValueError(f"transfer {transfer_id!r} is already expected")
            self._entries[transfer_id] = _Entry(ids)

    def get(self, transfer_id: str) -> ExpectedTransfer | None:
        with self._cond:
            e = self._entries.get(transfer_id)
            if e is None:
                return None
            return ExpectedTransfer(transfer_id, e.block_ids, e.state, self._full_layers(e),
                                    e.error)

    def state(self, transfer_id: str) -> TransferState:
        with self._cond:
            return self._entry(transfer_id).state

    def wait(self, transfer_id: str, timeout: float) -> TransferState:
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond:
            while True:
                state = self._entry(transfer_id).state
                remaining = deadline - time.monotonic()
                if state.terminal or remaining <= 0:
                    return state
                self._cond.wait(remaining)

    def transition(self, transfer_id: str, new: TransferState, error: str = "") -> bool:
        """Move to ``new`` if the entry exists and the move is allowed; True if it moved."""
        with self._cond:
            e = self._entries.get(transfer_id)
            if e is None or not can_transition(e.state, new) or e.state is new:
                return False
            e.state = new
            e.error = error or e.error
            self._cond.notify_all()
            return True

    def claim(self, transfer_id: str, owner: int) -> bool:
        """Bytes of ``transfer_id`` are arriving on connection ``owner``: TRANSFERRING."""
        with self._cond:
            e = self._entries.get(transfer_id)
            if e is None or e.state.terminal:
                return False
            e.state = TransferState.TRANSFERRING
            e.owners.add(owner)
            self._cond.notify_all()
            return True

    def note_layer(self, transfer_id: str, layer: int, heads: range | None = None) -> bool:
        """``heads`` of ``layer`` arrived (all of the receiver's when None)."""
        with self._cond:
            e = self._entries.get(transfer_id)
            if e is None or e.state.terminal:
                return False
            e.layers.setdefault(layer, set()).update(heads or range(self._num_heads))
            return True

    def complete(self, transfer_id: str, heads: range | None = None,
                 owner: int | None = None) -> TransferState | None:
        """A sender says it is done with ``heads`` (all when None), streamed on connection
        ``owner``: FAILED if a layer of those heads is missing; DONE once every layer has
        every head; else still waiting for the other senders."""
        heads = set(heads or range(self._num_heads))
        with self._cond:
            e = self._entries.get(transfer_id)
            if e is None or e.state.terminal:
                return None if e is None else e.state
            e.owners.discard(owner)
            short = [la for la in range(self._num_layers) if not heads <= e.layers.get(la, set())]
            if short:
                e.state = TransferState.FAILED
                e.error = (f"sender finished after {self._num_layers - len(short)}/"
                           f"{self._num_layers} layers")
            elif self._full_layers(e) == self._num_layers:
                e.state = TransferState.DONE
            self._cond.notify_all()
            return e.state

    def _full_layers(self, e: _Entry) -> int:
        return sum(len(h) == self._num_heads for h in e.layers.values())

    def fail_owned_by(self, owner: int, error: str) -> list[str]:
        """A connection dropped: fail every unfinished transfer it was streaming."""
        with self._cond:
            failed = [tid for tid, e in self._entries.items()
                      if owner in e.owners and not e.state.terminal]
            for tid in failed:
                self._entries[tid].state = TransferState.FAILED
                self._entries[tid].error = error
            self._cond.notify_all()
            return failed

    def fail_all(self, error: str) -> None:
        """The receiver is closing: nothing unfinished can complete any more."""
        with self._cond:
            for e in self._entries.values():
                if not e.state.terminal:
                    e.state, e.error = TransferState.FAILED, error
            self._cond.notify_all()

    def forget(self, transfer_id: str) -> None:
        with self._cond:
            self._entries.pop(transfer_id, None)
            self._cond.notify_all()  # a waiter on a forgotten id gets KeyError, not a hang

    def __len__(self) -> int:
        with self._cond:
            return len(self._entries)

    def _entry(self, transfer_id: str) -> _Entry:
        e = self._entries.get(transfer_id)
        if e is None:
            raise KeyError(f"transfer {transfer_id!r} is not expected by this receiver")
        return e
