"""The paged KV cache tensor: every layer's K and V blocks in one allocation.

Layout ``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]`` (NHD per
block, as FlashInfer's "NHD" layout wants). One contiguous tensor means a KV-transfer
backend can expose the whole cache as one region (a shared-memory segment, a CUDA IPC
handle) and address any (layer, block) by offset. Token ``pos`` of a sequence lives at
slot ``block_table[pos // block_size] * block_size + pos % block_size``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.engine.model_config import ModelConfig


@dataclass(frozen=True)
class KVCacheSpec:
    """Shape of a KV cache; identical on both sides of a KV transfer."""

    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_blocks", "block_size", "num_kv_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def for_model(cls, config: ModelConfig, num_blocks: int, block_size: int,
                  dtype: torch.dtype) -> KVCacheSpec:
        return cls(config.num_layers, num_blocks, block_size, config.num_kv_heads,
                   config.head_dim, dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.num_layers, 2, self.num_blocks, self.block_size, self.num_kv_heads,
                self.head_dim)

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def block_bytes_per_layer(self) -> int:
        """Bytes of K (or V) of one block in one layer."""
        return self.block_size * self.num_kv_heads * self.head_dim * self.element_size

    @property
    def nbytes(self) -> int:
        return self.num_layers * 2 * self.num_blocks * self.block_bytes_per_layer

    def tokens_to_bytes(self, num_tokens: int) -> int:
        return num_tokens * 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.element_size


class KVCache:
    """Owns (or wraps) the cache tensor; hands out per-layer (K, V) views."""

    def __init__(self, spec: KVCacheSpec, device: torch.device | str = "cpu",
                 buffer: torch.Tensor | None = None):
        """Allocate a zeroed cache, or wrap ``buffer`` (e.g. a shared-memory tensor)."""
        self.spec = spec
        if buffer is None:
            buffer = torch.zeros(spec.shape, dtype=spec.dtype, device=device)
        elif tuple(buffer.shape) != spec.shape or buffer.dtype != spec.dtype:
            raise ValueError(
                f"KV buffer has shape {tuple(buffer.shape)} {buffer.dtype}, "
                f"spec wants {spec.shape} {spec.dtype}"
            )
        self.data = buffer
        self._layers = [(buffer[i, 0], buffer[i, 1]) for i in range(spec.num_layers)]

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) of layer i, each [num_blocks, block_size, num_kv_heads, head_dim]."""
        return self._layers[i]
