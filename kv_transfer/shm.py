"""Shared-memory backend: same host, CPU tensors, one copy per layer.

Lifecycle: ``ShmReceiver.create`` puts the decode worker's whole KV cache inside a named
shared-memory segment (``pdserve-kv-<worker>-<uuid8>``, the endpoint's address) and
returns it as the worker's ``KVCache``. A prefill worker's ``ShmSender`` attaches that
segment the first time it meets the endpoint (then reuses the mapping), and each
``send_layer`` scatters the layer's blocks straight into the decode worker's reserved
blocks, synchronously, in the calling thread (the copy releases the GIL). ``finish`` has
nothing left to wait for; the decode worker records delivery with ``mark_delivered``.
``ShmReceiver.close`` unlinks the segment; ``ShmSender.close`` only unmaps.

Segments are created with mode 0600, so only processes of the same user can attach:
that, not a token, is the access control here.
"""

from __future__ import annotations

import logging
import re
import threading
import uuid

import torch

from pdserve.engine.kv_cache import KVCache, KVCacheSpec
from pdserve.kv_transfer.base import KVReceiver, KVSender, Transfer, TransferError
from pdserve.kv_transfer.block_copy import BlockWriter
from pdserve.kv_transfer.messages import KVCacheSpecMsg, KVEndpoint
from pdserve.kv_transfer.shm_segment import ShmSegment, unlink_by_name

log = logging.getLogger(__name__)


def segment_name(worker_id: str, instance_key: str = "") -> str:
    """``instance_key`` (a Ray actor id: the same across the actor's restarts, unique in
    the cluster) makes the name stable, so a restarted worker finds and replaces the
    segment its killed predecessor left; without one the name is random."""
    # POSIX allows ~255 chars and only one leading '/'; keep it short and filename-safe.
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", worker_id)[:40]
    key = re.sub(r"[^A-Za-z0-9]", "", instance_key)[:16] or uuid.uuid4().hex[:8]
    return f"pdserve-kv-{safe}-{key}"


class ShmReceiver(KVReceiver):
    name = "shm"

    def __init__(self, endpoint: KVEndpoint, cache: KVCache, segment: ShmSegment):
        super().__init__(endpoint, cache)
        self._segment = segment
        self._closed = False

    @classmethod
    def create(cls, cache_spec: KVCacheSpec, worker_id: str, device: torch.device | str = "cpu",
               *, prefault: bool = True, bind_host: str = "",
               auth_token: str = "", instance_key: str = "") -> tuple[ShmReceiver, KVCache]:
        """``prefault`` touches every page now, so a host short of memory fails at startup
        rather than mid-transfer. ``instance_key``: see ``segment_name``; a segment of that
        name can only be a killed predecessor's, and is replaced. ``bind_host`` and
        ``auth_token`` are accepted and unused."""
        if torch.device(device).type != "cpu":
            raise ValueError(f"the shm backend keeps the KV cache in host memory, not {device}")
        name = segment_name(worker_id, instance_key)
        if instance_key and unlink_by_name(name):
            log.warning("replaced the shared-memory KV segment %s of a dead worker", name)
        segment = ShmSegment.create(name, cache_spec.nbytes)
        try:
            data = segment.tensor(cache_spec.shape, cache_spec.dtype)
            if prefault:
                data.zero_()
            cache = KVCache(cache_spec, "cpu", buffer=data)
        except BaseException:
            segment.unlink()
            segment.close()
            raise
        endpoint = KVEndpoint(cls.name, worker_id, segment.name,
                              KVCacheSpecMsg.from_spec(cache_spec))
        return cls(endpoint, cache, segment), cache

    @property
    def segment_name(self) -> str:
        return self._segment.name

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._table.fail_all("receiver closed")
        self._segment.unlink()  # first: it must happen even if tensors still map it
        self._segment.close()


class _Attachment:
    def __init__(self, address: str, segment: ShmSegment, writer: BlockWriter):
        self.address = address
        self.segment = segment
        self.writer = writer


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
        att = self._attachment(transfer)
        transfer.context = (att.writer, att.writer.index(transfer.dest.block_ids))

    def _write_layer(self, transfer: Transfer, layer: int, kv: torch.Tensor) -> None:
        writer, index = transfer.context
        writer.write(layer, index, kv)
        transfer.bytes_sent += writer.payload_bytes(len(index))

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
            if att is not None and att.address == endpoint.address:
                return att
            if att is not None:
                # The decode worker restarted with a new segment; keeping the old mapping
                # would pin the old (unlinked) cache's memory for as long as we live.
                del self._attachments[endpoint.worker_id]
                _detach(att)
            try:
                segment = ShmSegment.attach(endpoint.address, populate=self._populate)
            except FileNotFoundError as exc:
                raise TransferError(transfer.transfer_id,
                                    f"shared-memory segment {endpoint.address!r} is gone") from exc
            try:
                spec = endpoint.spec
                writer = BlockWriter(segment.tensor(spec.shape, spec.torch_dtype))
            except ValueError as exc:
                segment.close()
                raise TransferError(transfer.transfer_id, str(exc)) from exc
            att = self._attachments[endpoint.worker_id] = _Attachment(
                endpoint.address, segment, writer)
            return att


def _detach(att: _Attachment) -> None:
    att.writer = None  # drop the views first so the unmap is not deferred
    att.segment.close()
