"""The KV transfer plug-in interface: "decode reserves, prefill writes".

Lifecycle of one transfer (id = request id):

1. Decode side, once per worker: ``receiver, cache = Backend.create(spec, worker_id, ...)``
   allocates the decode cache the way the backend needs it and publishes
   ``receiver.endpoint``.
2. Decode reserves blocks and calls ``receiver.expect(tid, block_ids)`` (PENDING), then
   sends a ``KVDestination`` to the prefill worker (through the router).
3. Prefill side: ``t = sender.begin(dest, src_spec)`` checks that the two caches agree and
   that the receiving cache is still the incarnation the blocks were reserved on
   (``incarnation.py``; else ``StaleDestination``, and nothing is written); after each layer of the prefill forward, ``sender.send_layer(t, layer, kv)`` with that
   layer's K/V of the request's blocks, so the transfer overlaps the next layers' compute
   (or ``sender.send_layers(t, first, kv)`` with several consecutive layers stacked, when
   they are all ready at once: a backend may then move them in one copy);
   ``sender.finish(t)`` returns once every layer is delivered and the receiver is still that
   incarnation (or raises ``TransferError``); ``t.digest()`` is then the request's KV
   checksum (``checksum.py``) if one was asked for; ``sender.abort(t)`` gives up.
4. Decode side learns of completion either from its backend (TCP frames: the receiver
   moves to DONE by itself) or, for backends where the sender writes the memory directly
   (in-process, shared memory, CUDA IPC), from the caller's ``receiver.mark_delivered``
   after the prefill's ``finish`` returned. ``wait``/``state`` observe it; ``forget``
   drops it once the blocks are adopted or freed.

``KVSender`` implements the validation, the incarnation check, the checksum and the state
machine once; a backend supplies the ``_open``/``_live_incarnation``/``_write_layer``/
``_complete``/``_cancel`` hooks. A ``Transfer`` is a live
handle driven by one caller thread; backends may only bump its ``bytes_sent``.
"""

from __future__ import annotations

import contextlib
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from pdserve.engine.kv_cache import KVCache, KVCacheSpec
from pdserve.kv_transfer.checksum import KVChecksum, KVDigest, check_mode
from pdserve.kv_transfer.messages import (
    CudaIpcHandleMsg,
    HeadSlice,
    KVCacheSpecMsg,
    KVDestination,
    KVEndpoint,
)
from pdserve.kv_transfer.tracker import TransferState, TransferTable

__all__ = [
    "CudaIpcHandleMsg", "HeadSlice", "KVCacheSpecMsg", "KVDestination", "KVEndpoint", "KVReceiver",
    "KVSender", "StaleDestination", "Transfer", "TransferError", "TransferState",
    "send_kv_blocks",
]


class TransferError(RuntimeError):
    """A transfer cannot start or did not complete; ``transfer_id`` says which, ``reason``
    is a metrics label (``error``, ``stale_incarnation``, ``checksum``)."""

    reason: ClassVar[str] = "error"

    def __init__(self, transfer_id: str, message: str):
        super().__init__(f"KV transfer {transfer_id!r}: {message}")
        self.transfer_id = transfer_id


class StaleDestination(TransferError):
    """The destination was reserved on another incarnation of the receiving cache (the
    decode worker restarted): writing would corrupt the new cache or vanish into the old."""

    reason = "stale_incarnation"


@dataclass(eq=False)
class Transfer:
    """Sender-side handle of one transfer (mutable on purpose: it tracks progress)."""

    dest: KVDestination
    state: TransferState = TransferState.PENDING
    layers_sent: int = 0
    bytes_sent: int = 0
    started_at: float = field(default_factory=time.perf_counter)
    finished_at: float | None = None
    error: str = ""
    context: Any = field(default=None, repr=False)  # backend-private per-transfer data
    checksum: KVChecksum | None = field(default=None, repr=False)
    error_reason: str = "error"  # the failing TransferError's reason (metrics label)
    # The KV heads sent (all of the receiver's when None): a transfer between TP degrees
    heads: HeadSlice | None = None
    _sent: set[int] = field(default_factory=set, repr=False)
    _cancelled: bool = field(default=False, repr=False)

    @property
    def transfer_id(self) -> str:
        return self.dest.transfer_id

    @property
    def num_layers(self) -> int:
        return self.dest.endpoint.spec.num_layers

    @property
    def num_heads(self) -> int:
        """KV heads per layer payload."""
        return self.dest.endpoint.spec.num_kv_heads if self.heads is None else self.heads.count

    @property
    def head_window(self) -> tuple[int, int] | None:
        """(first, count) of the receiver's heads this transfer writes; None: all of them."""
        return None if self.heads is None else self.heads.dst_window

    def digest(self) -> KVDigest | None:
        """The KV checksum of what was sent (None when checksums are off); DONE only."""
        if self.checksum is None:
            return None
        if self.state is not TransferState.DONE:
            raise ValueError(f"transfer is {self.state.value}, not done")
        return self.checksum.digest()


class KVSender(ABC):
    """Prefill side. One per worker; caches connections/attachments per endpoint."""

    name: ClassVar[str] = ""

    def begin(self, dest: KVDestination, src_spec: KVCacheSpec, checksum: str = "off",
              heads: HeadSlice | None = None) -> Transfer:
        """Start a transfer to ``dest``; ``checksum`` (``checksum.CHECKSUM_MODES``) asks for
        a digest of everything sent. ``heads``: send only those KV heads (the sender's
        ``src_offset..`` into the receiver's ``dst_offset..``; the caches' head counts may
        then differ: TP degrees); layer payloads then hold ``heads.count`` heads. Raises
        ``TransferError`` before anything is written."""
        tid, spec = dest.transfer_id, dest.endpoint.spec
        if dest.endpoint.backend != self.name:
            raise TransferError(tid, f"endpoint is for backend {dest.endpoint.backend!r}, "
                                     f"this sender is {self.name!r}")
        problem = spec.mismatch(src_spec, any_heads=heads is not None)
        if heads is not None and not problem:
            if heads.src_offset + heads.count > src_spec.num_kv_heads:
                problem = f"{heads} exceeds the sender's {src_spec.num_kv_heads} KV heads"
            elif heads.dst_offset + heads.count > spec.num_kv_heads:
                problem = f"{heads} exceeds the receiver's {spec.num_kv_heads} KV heads"
            elif heads.count != spec.num_kv_heads and check_mode(checksum) != "off":
                # A receiver's digest would span several senders' slices: not built yet.
                problem = "KV checksums of part of a receiver's heads are not supported"
        if problem:
            raise TransferError(tid, f"KV cache specs differ: {problem}")
        need = math.ceil(dest.num_tokens / spec.block_size)
        if len(dest.block_ids) != need:
            raise TransferError(tid, f"{dest.num_tokens} tokens need {need} blocks of "
                                     f"{spec.block_size}, destination has {len(dest.block_ids)}")
        transfer = Transfer(dest, heads=heads)
        if check_mode(checksum) != "off":
            transfer.checksum = KVChecksum(checksum, spec.num_layers)
        try:
            self._open(transfer)
            self._check_incarnation(transfer, "before writing")
        except Exception as exc:
            err = _as_transfer_error(tid, exc)
            self._fail(transfer, str(exc), err.reason)
            raise err from exc
        return transfer

    def send_layer(self, transfer: Transfer, layer: int, kv: torch.Tensor) -> None:
        """Ship ``kv`` [2, n_blocks, P, H, D] (blocks in ``dest.block_ids`` order; ``H``
        is ``transfer.num_heads``: the head slice's count when it has one).

        May return before the bytes are delivered, so ``kv`` must be a tensor the caller
        will not modify afterwards (``index_select`` output is a fresh copy: fine).
        Any ``TransferError`` leaves the transfer FAILED (the receiver is told if it can be).
        """
        self._check_layers(transfer, range(layer, layer + 1), tuple(kv.shape), kv.dtype)
        try:
            if transfer.checksum is not None:
                transfer.checksum.add(layer, kv)
            self._write_layer(transfer, layer, kv)
        except Exception as exc:
            err = _as_transfer_error(transfer.transfer_id, exc)
            self._fail(transfer, str(exc), err.reason)
            raise err from exc
        self._mark_sent(transfer, range(layer, layer + 1))

    def send_layers(self, transfer: Transfer, first_layer: int, kv: torch.Tensor) -> None:
        """Ship layers ``first_layer .. first_layer + k - 1`` at once: ``kv`` [k, 2, n_blocks,
        P, H, D] holds them stacked (``kv[i]`` is what ``send_layer`` would get for layer
        ``first_layer + i``). Same contract as ``send_layer`` otherwise; a backend may move
        all k layers in one copy (``_write_layers``)."""
        if kv.dim() != 6 or kv.shape[0] < 1:
            problem = f"stacked layer payload is {tuple(kv.shape)}, expected [k >= 1, 2, n, P, H, D]"
            self._fail(transfer, problem)
            raise TransferError(transfer.transfer_id, problem)
        layers = range(first_layer, first_layer + kv.shape[0])
        self._check_layers(transfer, layers, tuple(kv.shape[1:]), kv.dtype)
        try:
            if transfer.checksum is not None:
                for i, layer in enumerate(layers):
                    transfer.checksum.add(layer, kv[i])
            self._write_layers(transfer, first_layer, kv)
        except Exception as exc:
            err = _as_transfer_error(transfer.transfer_id, exc)
            self._fail(transfer, str(exc), err.reason)
            raise err from exc
        self._mark_sent(transfer, layers)

    def _check_layers(self, transfer: Transfer, layers: range, shape: tuple[int, ...],
                      dtype: torch.dtype) -> None:
        """TransferError (and the transfer FAILED) unless ``layers`` may be sent now with
        per-layer payloads of ``shape`` and ``dtype``."""
        tid, spec = transfer.transfer_id, transfer.dest.endpoint.spec
        if transfer.state.terminal:
            raise TransferError(tid, f"transfer is already {transfer.state.value}")
        want = (2, len(transfer.dest.block_ids), spec.block_size, transfer.num_heads,
                spec.head_dim)
        problem = ""
        bad = [x for x in layers if not 0 <= x < spec.num_layers]
        again = [x for x in layers if x in transfer._sent]
        if bad:
            problem = f"layer {bad[0]} out of range [0, {spec.num_layers})"
        elif again:
            problem = f"layer {again[0]} was already sent"
        elif shape != want or dtype != spec.torch_dtype:
            problem = f"layer payload is {shape} {dtype}, expected {want} {spec.torch_dtype}"
        if problem:
            self._fail(transfer, problem)
            raise TransferError(tid, problem)

    @staticmethod
    def _mark_sent(transfer: Transfer, layers: range) -> None:
        transfer._sent.update(layers)
        transfer.layers_sent += len(layers)
        transfer.state = TransferState.TRANSFERRING

    def finish(self, transfer: Transfer, timeout: float = 30.0) -> None:
        """Return once every layer is delivered (state DONE); else ``TransferError``."""
        tid = transfer.transfer_id
        if transfer.state is TransferState.DONE:
            return
        if transfer.state is TransferState.FAILED:
            raise TransferError(tid, f"transfer failed: {transfer.error}")
        if transfer.layers_sent != transfer.num_layers:
            missing = sorted(set(range(transfer.num_layers)) - transfer._sent)
            self._fail(transfer, f"finish() before layers {missing[:8]} were sent")
            raise TransferError(tid, transfer.error)
        try:
            self._complete(transfer, timeout)
            # The receiver may have restarted while we wrote: then the bytes went nowhere
            # the new cache can see, and the transfer must not count as delivered.
            self._check_incarnation(transfer, "after writing")
        except Exception as exc:
            err = _as_transfer_error(tid, exc)
            self._fail(transfer, str(exc), err.reason)
            raise err from exc
        transfer.state = TransferState.DONE
        transfer.finished_at = time.perf_counter()

    def abort(self, transfer: Transfer) -> None:
        """Give up (idempotent); tells the receiver where the backend can."""
        if transfer.state is not TransferState.DONE:
            self._fail(transfer, transfer.error or "aborted by the sender")

    @abstractmethod
    def close(self) -> None:
        """Drop cached connections/attachments. Never destroys the receiver's memory."""

    # -- backend hooks -----------------------------------------------------------------
    @abstractmethod
    def _open(self, transfer: Transfer) -> None:
        """Reach the endpoint (cached per endpoint); may set ``transfer.context``."""

    @abstractmethod
    def _live_incarnation(self, transfer: Transfer) -> str | None:
        """The incarnation of the cache this sender reaches for ``transfer`` now (after
        ``_open``): None if it cannot tell (a retired or vanished cache)."""

    @abstractmethod
    def _write_layer(self, transfer: Transfer, layer: int, kv: torch.Tensor) -> None:
        """Write or queue one validated layer."""

    def _write_layers(self, transfer: Transfer, first_layer: int, kv: torch.Tensor) -> None:
        """Write or queue validated stacked layers (default: one ``_write_layer`` each)."""
        for i in range(kv.shape[0]):
            self._write_layer(transfer, first_layer + i, kv[i])

    @abstractmethod
    def _complete(self, transfer: Transfer, timeout: float) -> None:
        """Block until everything queued for ``transfer`` is delivered."""

    def _cancel(self, transfer: Transfer) -> None:
        """Best effort: tell the receiver the transfer is abandoned (default: cannot)."""
        return None

    def _check_incarnation(self, transfer: Transfer, when: str) -> None:
        live = self._live_incarnation(transfer)
        if live != transfer.dest.endpoint.incarnation:
            raise stale_destination(transfer.dest, live, when)

    def _fail(self, transfer: Transfer, error: str, reason: str = "error") -> None:
        if transfer.state is not TransferState.FAILED:
            transfer.error_reason = reason
        transfer.state, transfer.error = TransferState.FAILED, error
        transfer.finished_at = time.perf_counter()
        if not transfer._cancelled:
            transfer._cancelled = True
            # Best effort only: the transfer is failed whatever the backend says.
            with contextlib.suppress(Exception):
                self._cancel(transfer)


def stale_destination(dest: KVDestination, live: str | None, when: str) -> StaleDestination:
    """The error for a write refused because ``dest`` names another incarnation."""
    now = f"now runs incarnation {live[:8]}" if live else "is no longer live"
    return StaleDestination(dest.transfer_id, f"{when}: the blocks were reserved on "
                            f"incarnation {dest.endpoint.incarnation[:8]} of "
                            f"{dest.endpoint.worker_id}'s cache, which {now}")


def _as_transfer_error(transfer_id: str, exc: Exception) -> TransferError:
    if isinstance(exc, TransferError):
        return exc
    return TransferError(transfer_id, f"{type(exc).__name__}: {exc}")


class KVReceiver(ABC):
    """Decode side: owns (or attaches) the decode worker's cache and tracks transfers."""

    name: ClassVar[str] = ""
    # The sender writes the memory itself, so its ``finish`` is delivery (``mark_delivered``);
    # False: the receiver sees the data arrive and knows by itself when it is DONE.
    sender_delivers: ClassVar[bool] = True

    def __init__(self, endpoint: KVEndpoint, cache: KVCache):
        self.endpoint = endpoint
        self.cache = cache
        self._table = TransferTable(cache.spec.num_layers, cache.spec.num_blocks,
                                    cache.spec.num_kv_heads)

    @classmethod
    @abstractmethod
    def create(cls, cache_spec: KVCacheSpec, worker_id: str, device: torch.device | str = "cpu",
               **options) -> tuple[KVReceiver, KVCache]:
        """Allocate the decode cache the way this backend needs it; start serving."""

    def expect(self, transfer_id: str, block_ids: Sequence[int]) -> None:
        """Blocks were reserved for ``transfer_id``: PENDING until they are filled."""
        self._table.expect(transfer_id, block_ids)

    def state(self, transfer_id: str) -> TransferState:
        """Current state; ``KeyError`` if the id is not expected (or was forgotten)."""
        return self._table.state(transfer_id)

    def wait(self, transfer_id: str, timeout: float) -> TransferState:
        """Block until DONE/FAILED or ``timeout`` seconds; returns the state then."""
        return self._table.wait(transfer_id, timeout)

    def mark_delivered(self, transfer_id: str) -> None:
        """The sender's ``finish`` returned: for direct-write backends that is delivery.

        A no-op for unknown (forgotten) or already finished transfers.
        """
        self._table.transition(transfer_id, TransferState.DONE)

    def forget(self, transfer_id: str) -> None:
        """Stop tracking (adopted, finished or cancelled); later news of it is ignored."""
        self._table.forget(transfer_id)

    @abstractmethod
    def close(self) -> None:
        """Stop serving; unfinished transfers become FAILED."""


def send_kv_blocks(sender: KVSender, dest: KVDestination, cache: KVCache,
                   src_block_ids: Sequence[int], layers: Iterable[int] | None = None,
                   timeout: float = 30.0, checksum: str = "off") -> Transfer:
    """Copy blocks ``src_block_ids`` of ``cache`` to ``dest``, all layers in one go.

    The non-overlapped path (tests, benchmarks, resending a cached prefix). ``layers``
    picks the order (default: all, ascending); ``finish`` runs once every layer is sent.
    """
    transfer = sender.begin(dest, cache.spec, checksum)
    idx = torch.as_tensor(list(src_block_ids), dtype=torch.long, device=cache.data.device)
    try:
        if layers is None:  # every layer, in order: one gather, one stacked send
            sender.send_layers(transfer, 0, cache.data.index_select(2, idx))
        for layer in () if layers is None else layers:
            sender.send_layer(transfer, layer, cache.data[layer].index_select(1, idx))
        if transfer.layers_sent == transfer.num_layers:
            sender.finish(transfer, timeout)
    except BaseException:
        sender.abort(transfer)
        raise
    return transfer
