"""Where each prefill worker's prefix cache probably is: the router's own record.

KV-aware routing needs, per worker, which full-block prefixes it holds. pdserve keeps the
router's own record of where it sent what (as SGLang's cache-aware router does) rather
than a stream of cache events from every worker (Dynamo's KV router, llm-d):

- no traffic and no new failure mode on the workers' side, and nothing to resynchronise
  when a worker restarts (its record is dropped with its incarnation);
- but it is an estimate: it cannot see evictions, nor what another router sent. Each
  worker's record is therefore an LRU bounded by that worker's cache size in blocks (what
  the worker can hold at most), and every prefill result corrects it: a worker that
  reports fewer cached tokens than the record promised has lost the rest, which is
  forgotten (``observe``).

Keys are chained block hashes: equal keys mean equal whole prefixes up to that block
(``engine.block_manager.hash_block`` over token ids on a live cluster; a Mooncake trace's
``hash_ids`` in the simulator). Torch-free, no I/O: the router and the simulator share it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence


class WorkerPrefixes:
    """One worker's record: block keys in least-recently-used order, at most ``capacity``."""

    def __init__(self, capacity_blocks: int):
        if capacity_blocks < 1:
            raise ValueError(f"capacity_blocks must be >= 1, got {capacity_blocks}")
        self.capacity = capacity_blocks
        self._lru: OrderedDict[Hashable, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._lru)

    def match(self, keys: Sequence[Hashable]) -> int:
        """How many leading blocks of ``keys`` this worker holds."""
        n = 0
        for k in keys:
            if k not in self._lru:
                break
            n += 1
        return n

    def record(self, keys: Sequence[Hashable]) -> None:
        """The worker computed (or reused) these blocks: most recently used, the oldest
        records beyond the capacity dropped."""
        for k in keys:
            self._lru[k] = None
            self._lru.move_to_end(k)
        while len(self._lru) > self.capacity:
            self._lru.popitem(last=False)

    def forget_from(self, keys: Sequence[Hashable], start: int) -> None:
        """The worker does not hold ``keys[start:]`` (a prefix result said so)."""
        for k in keys[start:]:
            self._lru.pop(k, None)

    def resize(self, capacity_blocks: int) -> None:
        if capacity_blocks >= 1 and capacity_blocks != self.capacity:
            self.capacity = capacity_blocks
            self.record(())


class PrefixIndex:
    """Every prefill worker's record, by worker id."""

    def __init__(self, default_capacity_blocks: int = 1 << 16):
        self.default_capacity = default_capacity_blocks
        self._workers: dict[str, WorkerPrefixes] = {}

    def worker(self, worker_id: str) -> WorkerPrefixes:
        w = self._workers.get(worker_id)
        if w is None:
            w = self._workers[worker_id] = WorkerPrefixes(self.default_capacity)
        return w

    def match(self, worker_id: str, keys: Sequence[Hashable]) -> int:
        w = self._workers.get(worker_id)
        return 0 if w is None else w.match(keys)

    def record(self, worker_id: str, keys: Sequence[Hashable]) -> None:
        self.worker(worker_id).record(keys)

    def observe(self, worker_id: str, keys: Sequence[Hashable], cached_blocks: int) -> None:
        """A prefill on ``worker_id`` found ``cached_blocks`` of ``keys`` cached: anything
        the record promised beyond that is gone; everything it computed is now held."""
        w = self.worker(worker_id)
        predicted = w.match(keys)
        if cached_blocks < predicted:
            w.forget_from(keys, cached_blocks)
        w.record(keys)

    def resize(self, worker_id: str, capacity_blocks: int) -> None:
        self.worker(worker_id).resize(capacity_blocks)

    def drop(self, worker_id: str) -> None:
        """The worker restarted (or left): its cache is empty."""
        self._workers.pop(worker_id, None)
