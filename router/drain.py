"""When a worker that is leaving its pool holds nothing more.

A worker leaves (``Orchestrator.finish_drain``) only once it is idle twice in a row, ``poll_s``
apart: the router has no request of its own on it (``WorkerLoad.in_flight``) and the
worker's own stats show nothing held (``work_held``). The second look covers a request
ranked onto the worker just before it was marked draining whose call had not reached it
yet at the first look (a Ray call takes milliseconds, a poll a fifth of a second).
"""

from __future__ import annotations


class DrainTimeout(Exception):
    """The worker still held work when the drain's time ran out; it stays in its pool
    (taking requests again) and nothing it held is lost."""

    def __init__(self, worker_id: str, held: int, timeout_s: float):
        super().__init__(f"worker {worker_id} still holds {held} blocks/requests after "
                         f"{timeout_s:g}s of draining; it stays in the pool")
        self.worker_id, self.held = worker_id, held


def work_held(stats: object) -> int:
    """KV blocks, reservations and requests a worker's stats (``DecodeStats`` or
    ``PrefillStats``) say it still holds: 0 when it can leave. Blocks of the prefix cache
    that no request uses are not held (they are evictable and leave with the worker)."""
    return sum(getattr(stats, name, 0) for name in
               ("num_used_blocks", "num_reserved", "num_running", "num_waiting"))
