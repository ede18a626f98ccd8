"""Which life of a receiving KV cache an endpoint names, and how a sender proves it is live.

A decode worker that restarts (Ray brings a killed actor back) gets a new, empty cache
behind the same worker id, often behind the same address (a shared-memory name stable per
Ray actor, a reused port). A prefill worker still holding a reservation made on the old
cache must not write into the new one (it would overwrite blocks that now belong to other
requests), and must not "succeed" by writing into the old one (the new worker would decode
from zeroed blocks: wrong text with status OK). So:

- every receiver is created with a fresh ``incarnation`` (``new_incarnation``), and its
  ``KVEndpoint`` carries it; every ``KVDestination`` therefore names the incarnation it was
  reserved on;
- a sender compares that with the incarnation live behind the endpoint before the first
  byte moves (and, for direct-write backends, again when the transfer finishes) and fails
  the transfer with ``StaleDestination`` on a mismatch. How it learns the live incarnation
  is the backend's business: the TCP handshake reports it; the direct-write backends (shm,
  CUDA IPC) read a ``CacheStamp`` by name (``live_incarnation``).

A ``CacheStamp`` is a small header in shared memory: magic, state (LIVE or RETIRED) and the
incarnation. The receiver writes it LIVE when it creates the cache and RETIRED when it
closes. A worker killed with SIGKILL cannot retire its own stamp, so its successor does:
``publish_stamped_segment`` retires and unlinks a predecessor's segment of the same name
before creating its own (if the resource tracker has not unlinked it already). Senders do
not trust a stamp they mapped earlier: they read the live incarnation by name each time
(``live_incarnation``: a one-page mapping, microseconds), so a mapping of a dead segment,
retired or not, is noticed and replaced.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import struct
import uuid

from pdserve.kv_transfer.shm_segment import ShmSegment, unlink_by_name

# One page, so a cache placed after the stamp in the same segment stays page-aligned.
STAMP_BYTES = 4096
_MAGIC = b"PDKVSTMP"
_LAYOUT = struct.Struct("<8sI4x32s")  # magic | state u32 | pad | incarnation (ascii hex)

log = logging.getLogger(__name__)


def new_incarnation() -> str:
    """A fresh incarnation id: 32 hex characters, unique per receiver ever created."""
    return uuid.uuid4().hex


class StampState(enum.IntEnum):
    LIVE = 1
    RETIRED = 2


class CacheStamp:
    """A view of the stamp at the start of a mapped buffer (an mmap or memoryview)."""

    def __init__(self, buffer):
        if len(buffer) < STAMP_BYTES:
            raise ValueError(f"a cache stamp needs {STAMP_BYTES} bytes, got {len(buffer)}")
        self._buf = memoryview(buffer)[:_LAYOUT.size]

    def publish(self, incarnation: str) -> None:
        raw = incarnation.encode("ascii")
        if len(raw) != 32:
            raise ValueError("an incarnation is 32 ascii characters")
        # Incarnation first, state last: a reader that sees LIVE sees the whole id.
        self._buf[:] = _LAYOUT.pack(_MAGIC, 0, raw)
        self._set_state(StampState.LIVE)

    def retire(self) -> None:
        self._set_state(StampState.RETIRED)

    def live_incarnation(self) -> str | None:
        """The incarnation if the stamp is LIVE; None if retired or not a stamp at all."""
        magic, state, raw = _LAYOUT.unpack(bytes(self._buf))
        if magic != _MAGIC or state != StampState.LIVE:
            return None
        return raw.decode("ascii", "replace")

    def release(self) -> None:
        """Drop the view, so the mapping under it can be closed."""
        self._buf.release()

    def _set_state(self, state: StampState) -> None:
        struct.pack_into("<I", self._buf, 8, int(state))


def publish_stamped_segment(name: str, payload_bytes: int, incarnation: str,
                            replace: bool) -> ShmSegment:
    """Create segment ``name`` holding a LIVE stamp then ``payload_bytes`` (at offset
    ``STAMP_BYTES``). With ``replace``, a segment of that name left by a dead predecessor is
    retired first (its senders then see RETIRED), then unlinked."""
    if replace and retire_segment(name):
        log.warning("retired and replaced the shared-memory segment %s of a dead worker", name)
    segment = ShmSegment.create(name, STAMP_BYTES + payload_bytes)
    try:
        stamp = CacheStamp(segment.buffer)
        stamp.publish(incarnation)
        stamp.release()
    except BaseException:
        segment.unlink()
        segment.close()
        raise
    return segment


def retire_segment(name: str) -> bool:
    """Mark a stamped segment RETIRED and unlink it; False if there was none. Safe on a
    segment whose owner is dead (SIGKILL) or alive (its mappings stay valid)."""
    with contextlib.suppress(FileNotFoundError, ValueError, OSError):
        segment = ShmSegment.attach(name)
        try:
            stamp = CacheStamp(segment.buffer)
            stamp.retire()
            stamp.release()
        finally:
            segment.close()
    return unlink_by_name(name)



def live_incarnation(name: str) -> str | None:
    """The incarnation LIVE in stamped segment ``name`` right now, read through a fresh
    one-page mapping (None: no such segment, or retired). Fresh because a mapping kept from
    earlier may be of a segment that was unlinked without being retired: a multiprocessing
    resource tracker unlinks a SIGKILLed owner's segments before its successor can retire
    them, and such a stale mapping still reads LIVE."""
    try:
        segment = ShmSegment.attach(name, length=STAMP_BYTES)
    except (OSError, ValueError):
        return None
    try:
        stamp = CacheStamp(segment.buffer)
        try:
            return stamp.live_incarnation()
        finally:
            stamp.release()
    finally:
        segment.close()
