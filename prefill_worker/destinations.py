"""Where KV destinations that follow their prompt wait for the prefill worker to take them.

The router sends a prompt before its decode reservation exists (``PrefillRequest.
destination_follows``) and the destination once it does (``PrefillHost.set_destination``).
The step loop must see it as soon as it lands, even in the middle of a model step, where
a layer hook can start the transfer and catch up on the layers already computed; so this
mailbox, unlike the rest of the worker, is written from another thread (the host's event
loop) and read by the step loop thread, under its own lock.

Lifecycle of an entry: ``put`` (any thread) -> ``take`` by the request it names (loop
thread), or ``discard`` when that request is aborted, or ``expire`` when nobody took it
within the worker's transfer timeout (its request was aborted before the destination
arrived, or never reached this worker).
"""

from __future__ import annotations

import threading
import time

from pdserve.kv_transfer.messages import KVDestination


class DestinationMailbox:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, tuple[KVDestination, float]] = {}

    def put(self, destination: KVDestination) -> None:
        """File ``destination`` under its transfer id (= the request id); stamps when."""
        with self._lock:
            self._entries[destination.transfer_id] = (destination, time.monotonic())

    def take(self, request_id: str) -> tuple[KVDestination, float] | None:
        """The destination for ``request_id`` and when it arrived, removed; None if none."""
        if not self._entries:  # (the common case in a layer hook: nothing to take)
            return None
        with self._lock:
            return self._entries.pop(request_id, None)

    def has(self, request_id: str) -> bool:
        return request_id in self._entries

    def discard(self, request_id: str) -> None:
        with self._lock:
            self._entries.pop(request_id, None)

    def expire(self, older_than_s: float) -> int:
        """Drop entries that waited longer than ``older_than_s``; how many."""
        if not self._entries:
            return 0
        cutoff = time.monotonic() - older_than_s
        with self._lock:
            stale = [rid for rid, (_, at) in self._entries.items() if at < cutoff]
            for rid in stale:
                del self._entries[rid]
        return len(stale)

    def __len__(self) -> int:
        return len(self._entries)
