"""End-to-end check of one request's KV: the bytes decode reads are the bytes prefill wrote.

Lifecycle: the sender folds every layer payload it ships into the transfer's
``KVChecksum`` (``KVSender.send_layer`` does it for every backend); once the transfer is
finished, ``digest()`` gives a ``KVDigest`` that travels with the first token (prefill
result -> router -> ``StartDecode``). Before the decode worker admits the request it
recomputes the digest over its own reserved blocks with ``checksum_blocks`` and refuses the
request on a mismatch (a transfer failure with reason ``checksum``, retried by the router).
This catches what no per-hop check can: a write that landed in another cache (a stale
mapping), in the wrong blocks, or was overwritten before decode started.

Modes (``KVTransferConfig.checksum``): ``full`` hashes every byte of every layer; ``sample``
hashes the first token slot of every block (K and V, every layer: about 1/block_size of
the bytes, enough to see a wrong or zeroed block); ``off``. The hash is xxh3-64 from the
``xxhash`` package (tens of GB/s on one core). Layers may be sent in any order: the
per-layer digests are combined in layer order at the end.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import numpy as np
import torch
import xxhash

from pdserve.kv_transfer.block_copy import tensor_bytes
from pdserve.kv_transfer.messages import KVDigest, check_mode


def _part(mode: str, kv: torch.Tensor) -> torch.Tensor:
    """What ``mode`` hashes of a [2, n, P, H, D] layer payload."""
    return kv[:, :, 0] if mode == "sample" else kv


def _hash_layer(part: torch.Tensor) -> int:
    if part.device.type != "cpu":
        part = part.cpu()
    return xxhash.xxh3_64_intdigest(tensor_bytes(part.contiguous()))


class KVChecksum:
    """Accumulates one transfer's per-layer digests on the sender (one caller thread)."""

    def __init__(self, mode: str, num_layers: int):
        if check_mode(mode) == "off":
            raise ValueError("no KVChecksum is kept when checksums are off")
        self.mode = mode
        self._layers: list[int | None] = [None] * num_layers

    def add(self, layer: int, kv: torch.Tensor) -> None:
        self._layers[layer] = _hash_layer(_part(self.mode, kv))

    def digest(self) -> KVDigest:
        missing = [i for i, d in enumerate(self._layers) if d is None]
        if missing:
            raise ValueError(f"layers {missing[:8]} were never added")
        return KVDigest(self.mode, _combine(self._layers))


def checksum_blocks(data: torch.Tensor, block_ids: Sequence[int], mode: str) -> KVDigest:
    """The digest of blocks ``block_ids`` (in that order) of a [L, 2, N, P, H, D] cache, as
    the sender computed it over the payloads it shipped."""
    check_mode(mode)
    if data.device.type == "cpu" and data.is_contiguous():
        digests = _cpu_layer_digests(data, block_ids, mode)
    else:
        idx = torch.as_tensor(list(block_ids), dtype=torch.long, device=data.device)
        # Select the slice first, then the blocks: sample mode copies only what it hashes.
        digests = [_hash_layer((data[layer, :, :, 0] if mode == "sample" else data[layer])
                               .index_select(1, idx)) for layer in range(data.shape[0])]
    return KVDigest(mode, _combine(digests))


def _cpu_layer_digests(data: torch.Tensor, block_ids: Sequence[int], mode: str) -> list[int]:
    """Each (K|V, block) of a layer is one contiguous row of the cache. ``full`` hashes the
    rows where they lie, without gathering them: xxh3 fed the rows in payload order (K of
    every block, then V) gives the digest of the gathered payload. ``sample`` gathers each
    row's first token slot (1/block_size of the bytes, one numpy copy per layer) and
    hashes that."""
    num_layers, _, num_blocks, block_size = data.shape[:4]
    row = data[0, 0, 0].numel() * data.element_size()
    if mode == "sample":
        slot = row // block_size
        word = next(w for w in (8, 4, 2, 1) if slot % w == 0)  # move words, not bytes
        rows = tensor_bytes(data).reshape(num_layers, 2, num_blocks, row).view(f"<u{word}")
        idx = np.asarray(block_ids, dtype=np.intp)
        return [xxhash.xxh3_64_intdigest(np.ascontiguousarray(rows[layer][:, idx, :slot // word]))
                for layer in range(num_layers)]
    raw = memoryview(tensor_bytes(data))
    digests = []
    for layer in range(num_layers):
        h = xxhash.xxh3_64()
        for kv in (0, 1):
            base = (layer * 2 + kv) * num_blocks * row
            for b in block_ids:
                start = base + b * row
                h.update(raw[start:start + row])
        digests.append(h.intdigest())
    return digests


def _combine(layer_digests: Sequence[int]) -> int:
    return xxhash.xxh3_64_intdigest(struct.pack(f"<{len(layer_digests)}Q", *layer_digests))
