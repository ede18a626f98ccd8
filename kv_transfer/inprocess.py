"""In-process backend: the fake for tests, and the reference for the benchmark.

Lifecycle: ``InProcessReceiver.create`` allocates an ordinary cache and registers it in a
process-global table under a fresh key (the endpoint's address); an ``InProcessSender``
in the same process looks the key up in ``begin`` and writes each layer straight into the
cache in ``send_layer``. It behaves like the shared-memory backend on purpose (direct
write, delivery recorded by the caller's ``mark_delivered``), so code that works on this
fake does not silently depend on the receiver noticing the bytes. ``close`` unregisters.
"""

from __future__ import annotations

import threading
import uuid

import torch

from pdserve.engine.kv_cache import KVCache, KVCacheSpec
from pdserve.kv_transfer.base import KVReceiver, KVSender, Transfer, TransferError
from pdserve.kv_transfer.block_copy import BlockWriter
from pdserve.kv_transfer.messages import KVCacheSpecMsg, KVEndpoint

_CACHES: dict[str, KVCache] = {}
_CACHES_LOCK = threading.Lock()


class InProcessReceiver(KVReceiver):
    name = "inprocess"

    @classmethod
    def create(cls, cache_spec: KVCacheSpec, worker_id: str, device: torch.device | str = "cpu",
               *, bind_host: str = "", auth_token: str = "") -> tuple[InProcessReceiver, KVCache]:
        """``bind_host``/``auth_token`` are accepted for a uniform call site and unused."""
        cache = KVCache(cache_spec, device)
        key = f"{worker_id}/{uuid.uuid4().hex[:8]}"
        with _CACHES_LOCK:
            _CACHES[key] = cache
        endpoint = KVEndpoint(cls.name, worker_id, key, KVCacheSpecMsg.from_spec(cache_spec))
        return cls(endpoint, cache), cache

    def close(self) -> None:
        with _CACHES_LOCK:
            _CACHES.pop(self.endpoint.address, None)
        self._table.fail_all("receiver closed")


class InProcessSender(KVSender):
    name = "inprocess"

    def __init__(self, *, auth_token: str | None = None):
        del auth_token  # nothing to authenticate inside one process
        self._writers: dict[str, BlockWriter] = {}

    def _open(self, transfer: Transfer) -> None:
        key = transfer.dest.endpoint.address
        with _CACHES_LOCK:
            cache = _CACHES.get(key)
        if cache is None:
            self._writers.pop(key, None)
            raise TransferError(transfer.transfer_id, f"no in-process receiver {key!r}")
        writer = self._writers.get(key)
        if writer is None or writer.data is not cache.data:
            writer = self._writers[key] = BlockWriter(cache.data)
        transfer.context = (writer, writer.index(transfer.dest.block_ids))

    def _write_layer(self, transfer: Transfer, layer: int, kv: torch.Tensor) -> None:
        writer, index = transfer.context
        writer.write(layer, index, kv)
        transfer.bytes_sent += writer.payload_bytes(len(index))

    def _complete(self, transfer: Transfer, timeout: float) -> None:
        if transfer.dest.endpoint.address not in _CACHES:
            raise TransferError(transfer.transfer_id, "the receiver closed during the transfer")

    def close(self) -> None:
        self._writers.clear()
