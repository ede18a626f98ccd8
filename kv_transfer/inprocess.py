"""In-process backend: the fake for tests, and the reference for the benchmark.

Lifecycle: ``InProcessReceiver.create`` allocates an ordinary cache and registers it, with
its incarnation, in a process-global table under the endpoint's address
(``<worker>/<instance_key>``, random without a key); an ``InProcessSender`` in the same
process looks the address up in ``begin`` and writes each layer straight into the cache in
``send_layer``. It behaves like the shared-memory backend on purpose (direct write, stable
address per instance key, a successor replacing its predecessor's entry, delivery recorded
by the caller's ``mark_delivered``), so code that works on this fake does not silently
depend on the receiver noticing the bytes. ``close`` unregisters its own entry only.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass

import torch

from pdserve.engine.kv_cache import KVCache, KVCacheSpec
from pdserve.kv_transfer.base import KVReceiver, KVSender, Transfer, TransferError
from pdserve.kv_transfer.block_copy import BlockWriter
from pdserve.kv_transfer.incarnation import new_incarnation
from pdserve.kv_transfer.messages import KVCacheSpecMsg, KVEndpoint


@dataclass(frozen=True)
class _Registered:
    incarnation: str
    cache: KVCache


_CACHES: dict[str, _Registered] = {}
_CACHES_LOCK = threading.Lock()


class InProcessReceiver(KVReceiver):
    name = "inprocess"

    @classmethod
    def create(cls, cache_spec: KVCacheSpec, worker_id: str, device: torch.device | str = "cpu",
               *, bind_host: str = "", auth_token: str = "", instance_key: str = ""
               ) -> tuple[InProcessReceiver, KVCache]:
        """``instance_key`` makes the address stable (a successor replaces the entry);
        ``bind_host``/``auth_token`` are accepted for a uniform call site and unused."""
        cache = KVCache(cache_spec, device)
        key = f"{worker_id}/{instance_key or uuid.uuid4().hex[:8]}"
        incarnation = new_incarnation()
        with _CACHES_LOCK:
            _CACHES[key] = _Registered(incarnation, cache)
        endpoint = KVEndpoint(cls.name, worker_id, key, KVCacheSpecMsg.from_spec(cache_spec),
                              incarnation)
        return cls(endpoint, cache), cache

    def close(self) -> None:
        with _CACHES_LOCK:
            entry = _CACHES.get(self.endpoint.address)
            if entry is not None and entry.incarnation == self.endpoint.incarnation:
                del _CACHES[self.endpoint.address]
        self._table.fail_all("receiver closed")


class InProcessSender(KVSender):
    name = "inprocess"

    def __init__(self, *, auth_token: str | None = None):
        del auth_token  # nothing to authenticate inside one process
        self._writers: dict[str, BlockWriter] = {}

    def _open(self, transfer: Transfer) -> None:
        key = transfer.dest.endpoint.address
        with _CACHES_LOCK:
            entry = _CACHES.get(key)
        if entry is None:
            self._writers.pop(key, None)
            raise TransferError(transfer.transfer_id, f"no in-process receiver {key!r}")
        if entry.incarnation != transfer.dest.endpoint.incarnation:
            transfer.context = None  # refused by the incarnation check before any write
            return
        writer = self._writers.get(key)
        if writer is None or writer.data is not entry.cache.data:
            writer = self._writers[key] = BlockWriter(entry.cache.data)
        transfer.context = (writer, writer.index(transfer.dest.block_ids))

    def _live_incarnation(self, transfer: Transfer) -> str | None:
        with _CACHES_LOCK:
            entry = _CACHES.get(transfer.dest.endpoint.address)
        return entry.incarnation if entry is not None else None

    def _write_layer(self, transfer: Transfer, layer: int, kv: torch.Tensor) -> None:
        writer, index = transfer.context
        writer.write(layer, index, kv, transfer.head_window)
        transfer.bytes_sent += writer.payload_bytes(len(index), transfer.head_window)

    def _complete(self, transfer: Transfer, timeout: float) -> None:
        """Every write was synchronous; the incarnation check that follows tells whether
        the cache written is still the live one."""

    def close(self) -> None:
        self._writers.clear()
