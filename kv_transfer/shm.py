"""Shared-memory backend: same host, CPU tensors, one copy per layer.

Lifecycle: ``ShmReceiver.create`` puts the decode worker's whole KV cache inside a named
shared-memory segment (``pdserve-kv-<worker>-<key>``, the endpoint's address), after a
one-page ``CacheStamp`` holding the cache's incarnation (``incarnation.py``), and returns
it as the worker's ``KVCache``. A prefill worker's ``ShmSender`` attaches that segment the
first time it meets the address (then reuses the mapping), and each ``send_layer``
scatters the layer's blocks straight into the decode worker's reserved blocks,
synchronously, in the calling thread (the copy releases the GIL). ``finish`` has nothing
left to wait for; the decode worker records delivery with ``mark_delivered``.
``ShmReceiver.close`` retires the stamp and unlinks the segment; ``ShmSender.close`` only
unmaps.

Restarts: the name is stable per Ray actor, so a restarted decode worker finds the segment
its killed predecessor left (unless the resource tracker unlinked it first), retires its
stamp and unlinks it before creating its own. A sender reads the incarnation live under
the name (``live_incarnation``) at ``begin`` and after the last layer, and the stamp of its
own mapping: a destination of another incarnation than the live one fails with
``StaleDestination`` before any byte is written; a mapping that is not of the live
incarnation (a dead cache, retired or not) is replaced by a fresh attach.

Segments are created with mode 0600, so only processes of the same user can attach:
that, not a token, is the access control here.
"""

from __future__ import annotations

import threading

import torch

from pdserve.engine.kv_cache import KVCache, KVCacheSpec
from pdserve.kv_transfer.base import (
    KVReceiver,
    KVSender,
    Transfer,
    TransferError,
    stale_destination,
)
from pdserve.kv_transfer.block_copy import BlockWriter
from pdserve.kv_transfer.incarnation import (
    STAMP_BYTES,
    CacheStamp,
    live_incarnation,
    new_incarnation,
    publish_stamped_segment,
)
from pdserve.kv_transfer.messages import KVCacheSpecMsg, KVEndpoint
from pdserve.kv_transfer.shm_segment import ShmSegment, segment_name


class ShmReceiver(KVReceiver):
    name = "shm"

    def __init__(self, endpoint: KVEndpoint, cache: KVCache, segment: ShmSegment):
        super().__init__(endpoint, cache)
        self._segment = segment
        self._stamp = CacheStamp(segment.buffer)
        self._closed = False

    @classmethod
    def create(cls, cache_spec: KVCacheSpec, worker_id: str, device: torch.device | str = "cpu",
               *, prefault: bool = True, bind_host: str = "",
               auth_token: str = "", instance_key: str = "") -> tuple[ShmReceiver, KVCache]:
        """``prefault`` touches every page now, so a host short of memory fails at startup
        rather than mid-transfer. ``instance_key``: see ``segment_name``; a segment of that
        name can only be a killed predecessor's, and is retired and replaced. ``bind_host``
        and ``auth_token`` are accepted and unused."""
        if torch.device(device).type != "cpu":
            raise ValueError(f"the shm backend keeps the KV cache in host memory, not {device}")
        name = segment_name("kv", worker_id, instance_key)
        incarnation = new_incarnation()
        segment = publish_stamped_segment(name, cache_spec.nbytes, incarnation,
                                          replace=bool(instance_key))
        try:
            data = segment.tensor(cache_spec.shape, cache_spec.dtype, offset=STAMP_BYTES)
            if prefault:
                data.zero_()
            cache = KVCache(cache_spec, "cpu", buffer=data)
        except BaseException:
            segment.unlink()
            segment.close()
            raise
        endpoint = KVEndpoint(cls.name, worker_id, segment.name,
                              KVCacheSpecMsg.from_spec(cache_spec), incarnation)
        return cls(endpoint, cache, segment), cache

    @property
    def segment_name(self) -> str:
        return self._segment.name

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._table.fail_all("receiver closed")
        self._stamp.retire()  # senders still mapping it must not think it is live
        self._stamp.release()
        self._segment.unlink()  # first: it must happen even if tensors still map it
        self._segment.close()


class _Attachment:
    def __init__(self, address: str, segment: ShmSegment, writer: BlockWriter):
        self.address = address
        self.segment = segment
        self.writer = writer
        self.stamp = CacheStamp(segment.buffer)


class ShmSender(KVSender):
    name = "shm"

    def __init__(self, *, auth_token: str | None = None, populate: bool = True):
        """``populate``: map each decode cache with its page tables built up front (a
        one-off cost per endpoint) instead of faulting pages in during transfers."""
        del auth_token  # same-host segments are guarded by file permissions
        self._populate = populate
        self._attachments: dict[str, _Attachment] = {}  # by receiver worker_id
        self._lock = threading.Lock()

    def _open(self, transfer: Transfer) -> None:
        dest = transfer.dest
        live = live_incarnation(dest.endpoint.address)
        if live != dest.endpoint.incarnation:
            # Refused by name alone: no need to map (and populate) a cache we won't write.
            raise stale_destination(dest, live, "before writing")
        att = self._attachment(transfer)
        transfer.context = (att, att.writer.index(dest.block_ids))

    def _live_incarnation(self, transfer: Transfer) -> str | None:
        att, _ = transfer.context
        mine = att.stamp.live_incarnation()  # the cache the bytes went into
        live = live_incarnation(transfer.dest.endpoint.address)  # the one the name means now
        return live if mine == live else None

    def _write_layer(self, transfer: Transfer, layer: int, kv: torch.Tensor) -> None:
        att, index = transfer.context
        att.writer.write(layer, index, kv, transfer.head_window)
        transfer.bytes_sent += att.writer.payload_bytes(len(index), transfer.head_window)

    def _complete(self, transfer: Transfer, timeout: float) -> None:
        """Every ``send_layer`` already copied synchronously: nothing is in flight."""

    def close(self) -> None:
        with self._lock:
            attachments, self._attachments = list(self._attachments.values()), {}
        for att in attachments:
            _detach(att)

    def _attachment(self, transfer: Transfer) -> _Attachment:
        endpoint = transfer.dest.endpoint
        with self._lock:
            att = self._attachments.get(endpoint.worker_id)
            if (att is not None and att.address == endpoint.address
                    and att.stamp.live_incarnation() == endpoint.incarnation):
                return att
            if att is not None:
                # A mapping of an earlier life of the cache: replace it. Not unmapped here,
                # as a transfer started before may still hold it (it will fail its check at
                # finish); the last reference going unmaps it, so a dead cache's memory is
                # not pinned for as long as we live.
                del self._attachments[endpoint.worker_id]
            try:
                segment = ShmSegment.attach(endpoint.address, populate=self._populate)
            except FileNotFoundError as exc:
                raise TransferError(transfer.transfer_id,
                                    f"shared-memory segment {endpoint.address!r} is gone") from exc
            try:
                spec = endpoint.spec
                writer = BlockWriter(segment.tensor(spec.shape, spec.torch_dtype,
                                                    offset=STAMP_BYTES))
            except ValueError as exc:
                segment.close()
                raise TransferError(transfer.transfer_id, str(exc)) from exc
            att = self._attachments[endpoint.worker_id] = _Attachment(
                endpoint.address, segment, writer)
            return att


def _detach(att: _Attachment) -> None:
    att.writer = None  # drop the views first so the unmap is not deferred
    att.stamp.release()
    att.segment.close()
