"""Typed messages that cross process boundaries in the KV transfer layer.

Lifecycle: a decode worker creates a receiver, which publishes a ``KVEndpoint`` (how a
sender reaches its cache). When the decode worker reserves blocks for a request it builds
a ``KVDestination`` (endpoint + reserved block ids) and hands it, through the router, to
the prefill worker, whose sender writes there. Both are frozen and validated on
construction, so a malformed message fails where it is built, not deep inside a backend.
``KVDigest`` (what a sender wrote, ``checksum.py``) travels back to the decode worker
through the router. The module imports no torch: the router handles these messages and
stays torch-free (the conversions to torch types import it when called).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from pdserve.engine.kv_cache import KVCacheSpec

# Bounded so a transfer id always fits the TCP frame header's u16 length field, with room.
MAX_TRANSFER_ID_BYTES = 1024
# The dtypes a KV cache may hold, by name, and their size in bytes.
KV_DTYPE_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2,
                  "float8_e4m3fn": 1, "float8_e5m2": 1, "int8": 1, "uint8": 1}
CHECKSUM_MODES = ("off", "sample", "full")


def check_mode(mode: str) -> str:
    """``mode`` if it is a checksum mode (``checksum.py``), else ``ValueError``."""
    if mode not in CHECKSUM_MODES:
        raise ValueError(f"checksum must be one of {CHECKSUM_MODES}, got {mode!r}")
    return mode


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: a dtype travels as a plain string."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    if name not in KV_DTYPE_BYTES:
        raise ValueError(f"unknown KV cache dtype name {name!r}")
    import torch

    return getattr(torch, name)


@dataclass(frozen=True)
class KVCacheSpecMsg:
    """A ``KVCacheSpec`` in wire form (dtype as its name)."""

    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_blocks", "block_size", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.num_layers > 0xFFFF:
            raise ValueError("num_layers must fit in 16 bits (the TCP frame's layer field)")
        if self.dtype not in KV_DTYPE_BYTES:
            raise ValueError(f"unknown KV cache dtype name {self.dtype!r}")

    @classmethod
    def from_spec(cls, spec: KVCacheSpec) -> KVCacheSpecMsg:
        return cls(spec.num_layers, spec.num_blocks, spec.block_size, spec.num_kv_heads,
                   spec.head_dim, dtype_name(spec.dtype))

    def to_spec(self) -> KVCacheSpec:
        from pdserve.engine.kv_cache import KVCacheSpec

        return KVCacheSpec(self.num_layers, self.num_blocks, self.block_size,
                           self.num_kv_heads, self.head_dim, self.torch_dtype)

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_from_name(self.dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.num_layers, 2, self.num_blocks, self.block_size, self.num_kv_heads,
                self.head_dim)

    @property
    def block_bytes(self) -> int:
        """Bytes of K (or V) of one block in one layer: one contiguous row of the cache."""
        return (self.block_size * self.num_kv_heads * self.head_dim
                * KV_DTYPE_BYTES[self.dtype])

    @property
    def nbytes(self) -> int:
        return self.num_layers * 2 * self.num_blocks * self.block_bytes

    def layer_payload_bytes(self, num_blocks: int) -> int:
        """Bytes of one layer's K and V for ``num_blocks`` blocks ([2, n, P, H, D])."""
        return 2 * num_blocks * self.block_bytes

    def mismatch(self, spec: KVCacheSpec, any_heads: bool = False) -> str:
        """Why a sender's cache cannot fill this one ("" if it can). Block counts may differ;
        with ``any_heads`` so may the KV head counts (a transfer of a ``HeadSlice``)."""
        names = ("num_layers", "block_size", "head_dim") if any_heads else (
            "num_layers", "block_size", "num_kv_heads", "head_dim")
        problems = [
            f"{name} {getattr(spec, name)} != {getattr(self, name)}"
            for name in names if getattr(spec, name) != getattr(self, name)
        ]
        if dtype_name(spec.dtype) != self.dtype:
            problems.append(f"dtype {dtype_name(spec.dtype)} != {self.dtype}")
        return "; ".join(problems)


@dataclass(frozen=True)
class HeadSlice:
    """``count`` KV heads, at local head index ``src_offset`` in the sending cache and
    ``dst_offset`` in the receiving one: what one rank of a prefill instance sends one rank
    of a decode instance of another TP degree (``tp_plan.HeadTransfer``)."""

    src_offset: int
    dst_offset: int
    count: int

    def __post_init__(self) -> None:
        for name in ("src_offset", "dst_offset", "count"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"HeadSlice.{name} must be an int >= 0, got {value!r}")
        if self.count < 1:
            raise ValueError("HeadSlice.count must be >= 1")

    @property
    def dst_window(self) -> tuple[int, int]:
        """(first head, count) in the receiving cache."""
        return self.dst_offset, self.count


@dataclass(frozen=True)
class CudaIpcHandleMsg:
    """The fields of ``UntypedStorage._share_cuda_()`` in a typed, pickle-free form.

    Byte strings travel as hex. ``device_uuid`` lets a sender whose process numbers the
    GPUs differently (another ``CUDA_VISIBLE_DEVICES``) find the same physical device.
    """

    device_index: int
    device_uuid: str
    handle_hex: str
    storage_size_bytes: int
    storage_offset_bytes: int
    ref_counter_handle_hex: str
    ref_counter_offset: int
    event_handle_hex: str  # "" when the producer needs no event sync
    event_sync_required: bool
    tensor_offset_bytes: int = 0  # where the cache tensor starts inside the storage

    def __post_init__(self) -> None:
        for name in ("handle_hex", "ref_counter_handle_hex", "event_handle_hex"):
            value = getattr(self, name)
            try:
                bytes.fromhex(value)
            except ValueError as exc:
                raise ValueError(f"{name} is not a hex string") from exc
        if not self.handle_hex:
            raise ValueError("handle_hex must not be empty")
        for name in ("device_index", "storage_size_bytes", "storage_offset_bytes",
                     "ref_counter_offset", "tensor_offset_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")


@dataclass(frozen=True)
class KVEndpoint:
    """Published by a decode worker's receiver: how senders reach its cache.

    ``address`` is backend-specific: the in-process registry key, the shared-memory
    segment name, ``"host:port"`` for TCP, the CUDA IPC control segment's name (the handle
    itself is ``cuda_ipc``). ``incarnation`` names this life of the receiving cache (see
    ``incarnation.py``): a sender refuses a destination whose incarnation is not the one
    live behind the address. It carries no secret: endpoints are handed around (router,
    logs, stats), so the TCP backend's shared secret is configuration given to both sides
    (``KVTransferConfig``) instead.
    """

    backend: str
    worker_id: str
    address: str
    spec: KVCacheSpecMsg
    incarnation: str
    cuda_ipc: CudaIpcHandleMsg | None = None

    def __post_init__(self) -> None:
        for name in ("backend", "worker_id", "address", "incarnation"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"KVEndpoint.{name} must be a non-empty string")
        if len(self.incarnation) > 64:
            raise ValueError("KVEndpoint.incarnation is too long")
        if not isinstance(self.spec, KVCacheSpecMsg):
            raise ValueError("KVEndpoint.spec must be a KVCacheSpecMsg")
        if len(self.worker_id.encode()) > MAX_TRANSFER_ID_BYTES:
            raise ValueError("worker_id is too long")


@dataclass(frozen=True)
class KVDestination:
    """One transfer: the decode worker's reserved blocks (in sequence order) for a request.

    ``rank_endpoints``: when the decode instance spans tp > 1 ranks, the receivers of ranks
    1 .. tp-1 (``endpoint`` is rank 0's); every rank reserved the same ``block_ids``, each
    holding its KV heads (``tp_destination.TPKVDestination`` is the whole view)."""

    transfer_id: str
    endpoint: KVEndpoint
    block_ids: tuple[int, ...]
    num_tokens: int
    rank_endpoints: tuple[KVEndpoint, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.transfer_id, str) or not self.transfer_id:
            raise ValueError("transfer_id must be a non-empty string")
        if len(self.transfer_id.encode()) > MAX_TRANSFER_ID_BYTES:
            raise ValueError(f"transfer_id is longer than {MAX_TRANSFER_ID_BYTES} bytes")
        if not isinstance(self.endpoint, KVEndpoint):
            raise ValueError("KVDestination.endpoint must be a KVEndpoint")
        try:
            ids = tuple(operator.index(b) for b in self.block_ids)
        except TypeError as exc:
            raise ValueError("block_ids must be integers") from exc
        object.__setattr__(self, "block_ids", ids)  # accept any sequence, store a tuple
        validate_block_ids(ids, self.endpoint.spec.num_blocks)
        if not isinstance(self.num_tokens, int) or self.num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {self.num_tokens!r}")
        object.__setattr__(self, "rank_endpoints", tuple(self.rank_endpoints))
        if any(not isinstance(ep, KVEndpoint) or ep.backend != self.endpoint.backend
               for ep in self.rank_endpoints):
            raise ValueError("rank_endpoints must be KVEndpoints of the endpoint's backend")


def validate_block_ids(block_ids: tuple[int, ...], num_blocks: int) -> None:
    """Non-empty, in range and unique: a duplicate would make the scatter order-dependent."""
    if not block_ids:
        raise ValueError("block_ids must not be empty")
    bad = [b for b in block_ids if not 0 <= b < num_blocks]
    if bad:
        raise ValueError(f"block ids {bad[:5]} out of range [0, {num_blocks})")
    if len(set(block_ids)) != len(block_ids):
        raise ValueError("block_ids contains duplicates")


@dataclass(frozen=True)
class KVDigest:
    """A request's KV digest and the mode it was computed in (decode recomputes alike)."""

    mode: str
    value: int

    def __post_init__(self) -> None:
        if self.mode not in CHECKSUM_MODES or self.mode == "off":
            raise ValueError(f"KVDigest.mode must be 'sample' or 'full', got {self.mode!r}")
        if not isinstance(self.value, int) or not 0 <= self.value < 2 ** 64:
            raise ValueError("KVDigest.value must be a 64-bit unsigned int")
