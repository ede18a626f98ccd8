"""Scatter one layer's K/V blocks into a paged cache: the copy every backend ends in.

Usage: build one ``BlockWriter`` per destination cache (it precomputes views of the whole
cache), turn a transfer's reserved block ids into an index once with ``index(...)``, then
call ``write(layer, index, kv)`` (a tensor) or ``write_bytes(layer, index, payload)``
(raw bytes off a socket) for each layer. ``heads=(first, count)`` writes a payload of
``count`` heads into those heads of each block only (a transfer between TP degrees): the
destination is then strided (NHD layout: a block's heads interleave with its token slots),
so it is an element-wise strided assignment rather than whole rows.

Why not ``cache[layer].index_copy_(1, idx, kv)`` on the CPU: torch's CPU index_copy_
walks the blocks element by element and splits that walk over the intra-op thread pool;
for bf16 KV we measured 0.3-6 GB/s against 12-25 GB/s for a plain memcpy of the same
bytes (and far worse when the cores are shared). Each (K|V, block) of one layer is one
contiguous row of ``block_size * heads * head_dim`` elements, so we view the cache as
rows of 8-byte words and let numpy's fancy assignment copy whole rows, which runs at
memcpy speed and releases the GIL. On CUDA, ``index_copy_`` is one kernel and is used.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

_WORDS = ((8, np.uint64), (4, np.uint32), (2, np.uint16), (1, np.uint8))
_ELEMENT_WORDS = {size: dtype for size, dtype in _WORDS}
HeadWindow = tuple[int, int]  # (first head, count) of the destination cache


def _word_dtype(row_bytes: int) -> tuple[int, type]:
    """The widest unsigned word that tiles a row exactly (fewer, bigger element moves)."""
    for size, dtype in _WORDS:
        if row_bytes % size == 0:
            return size, dtype
    raise AssertionError("unreachable: 1 divides everything")


def tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """A flat uint8 numpy view of a contiguous CPU tensor's bytes (any dtype, bf16 too)."""
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("tensor_bytes needs a contiguous CPU tensor")
    return t.detach().reshape(-1).view(torch.uint8).numpy()


class BlockWriter:
    """Writes [2, n, P, H, D] layer payloads into chosen blocks of one cache tensor."""

    def __init__(self, data: torch.Tensor):
        if data.dim() != 6 or data.shape[1] != 2:
            raise ValueError(f"expected a [L, 2, N, P, H, D] cache, got {tuple(data.shape)}")
        if not data.is_contiguous():
            raise ValueError("the KV cache tensor must be contiguous")
        self.data = data
        self.num_layers, _, self.num_blocks = data.shape[:3]
        self.block_shape = tuple(data.shape[3:])
        self.row_bytes = data[0, 0, 0].numel() * data.element_size()
        self.num_heads = data.shape[4]
        self._rows: np.ndarray | None = None
        self._elements: np.ndarray | None = None
        if data.device.type == "cpu":
            word, np_dtype = _word_dtype(self.row_bytes)
            self._word_dtype = np_dtype
            # [L, 2, N, row_words] sharing memory with the cache tensor.
            self._rows = tensor_bytes(data).reshape(
                self.num_layers, 2, self.num_blocks, self.row_bytes).view(np_dtype)
            # [L, 2, N, P, H, D] of same-size words, for head windows (bf16 has no numpy type)
            self._element_dtype = _ELEMENT_WORDS[data.element_size()]
            self._elements = tensor_bytes(data).view(self._element_dtype).reshape(data.shape)

    def index(self, block_ids: Sequence[int]) -> np.ndarray | torch.Tensor:
        """The form ``write`` wants the destination blocks in (reuse it for every layer)."""
        if self._rows is not None:
            return np.asarray(block_ids, dtype=np.intp)
        return torch.as_tensor(list(block_ids), dtype=torch.long, device=self.data.device)

    def payload_bytes(self, num_blocks: int, heads: HeadWindow | None = None) -> int:
        count = self.num_heads if heads is None else heads[1]
        return 2 * num_blocks * self.row_bytes // self.num_heads * count

    def _payload_shape(self, n: int, heads: HeadWindow | None) -> tuple[int, ...]:
        block_size, num_heads, head_dim = self.block_shape
        if heads is not None and not (heads[1] >= 1 and heads[0] >= 0
                                      and heads[0] + heads[1] <= num_heads):
            raise ValueError(f"heads {heads} outside the cache's {num_heads} KV heads")
        return 2, n, block_size, num_heads if heads is None else heads[1], head_dim

    def write(self, layer: int, index: np.ndarray | torch.Tensor, kv: torch.Tensor,
              heads: HeadWindow | None = None) -> None:
        """``kv`` [2, n, P, H, D] (same dtype as the cache) -> blocks ``index`` of ``layer``;
        with ``heads`` (first, count), ``kv`` holds ``count`` heads, written to those."""
        n = len(index)
        shape = self._payload_shape(n, heads)
        if tuple(kv.shape) != shape or kv.dtype != self.data.dtype:
            raise ValueError(f"layer payload is {tuple(kv.shape)} {kv.dtype}, expected "
                             f"{shape} {self.data.dtype}")
        if heads is not None and heads[1] != self.num_heads:
            self._write_heads(layer, index, kv, heads)
            return
        if self._rows is None:
            self.data[layer].index_copy_(1, index, kv.to(self.data.device, non_blocking=True))
            return
        src = kv.detach()
        if src.device.type != "cpu":
            src = src.cpu()
        self._scatter_rows(layer, index, tensor_bytes(src.contiguous()))

    def write_bytes(self, layer: int, index: np.ndarray | torch.Tensor,
                    payload: np.ndarray, heads: HeadWindow | None = None) -> None:
        """Like ``write`` for a raw uint8 payload laid out as a contiguous [2, n, P, H, D]
        (``H`` the window's count with ``heads``)."""
        n = len(index)
        shape = self._payload_shape(n, heads)
        if payload.dtype != np.uint8 or payload.size != self.payload_bytes(n, heads):
            raise ValueError(f"payload has {payload.size} bytes, expected "
                             f"{self.payload_bytes(n, heads)} for {n} blocks")
        if heads is not None and heads[1] != self.num_heads:
            if self._elements is not None:
                self._scatter_heads(layer, index, payload, heads)
            else:
                kv = torch.from_numpy(payload).view(self.data.dtype).view(shape)
                self._write_heads(layer, index, kv, heads)
            return
        if self._rows is None:
            kv = torch.from_numpy(payload).view(self.data.dtype).view(2, n, *self.block_shape)
            self.data[layer].index_copy_(1, index, kv.to(self.data.device))
            return
        self._scatter_rows(layer, index, payload)

    def _write_heads(self, layer: int, index, kv: torch.Tensor, heads: HeadWindow) -> None:
        first, count = heads
        if self._elements is None:
            self.data[layer][:, index, :, first:first + count] = kv.to(self.data.device)
            return
        src = kv.detach()
        if src.device.type != "cpu":
            src = src.cpu()
        self._scatter_heads(layer, index, tensor_bytes(src.contiguous()), heads)

    def _scatter_heads(self, layer: int, index: np.ndarray, payload: np.ndarray,
                       heads: HeadWindow) -> None:
        first, count = heads
        block_size, _, head_dim = self.block_shape
        src = payload.view(self._element_dtype).reshape(2, len(index), block_size, count,
                                                        head_dim)
        self._elements[layer][:, index, :, first:first + count] = src

    def _scatter_rows(self, layer: int, index: np.ndarray, payload: np.ndarray) -> None:
        rows = payload.reshape(2, len(index), self.row_bytes).view(self._word_dtype)
        self._rows[layer][:, index] = rows
