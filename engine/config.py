"""Engine configuration: one frozen, validated object, resolved once at start-up.

Environment variables are read here and nowhere else (``PDSERVE_DEVICE``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from pdserve.engine.attention.flashinfer_backend import PREFILL_BACKENDS
from pdserve.engine.graphs.sizes import DEFAULT_CUDA_GRAPH_SIZES, validate_sizes

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# CPU hosts get a fixed KV budget (the model is small there); CUDA hosts size the cache
# from free memory after the weights are loaded.
DEFAULT_CPU_KV_BYTES = 512 << 20
DEFAULT_GPU_MEMORY_UTILIZATION = 0.85


@dataclass(frozen=True)
class EngineConfig:
    """How to run one model on one device.

    ``num_kv_blocks`` wins over ``kv_cache_memory_bytes``; with neither, the cache takes
    ``DEFAULT_CPU_KV_BYTES`` on CPU or ``gpu_memory_utilization`` of the GPU.

    Decode steps run as CUDA graphs (``engine/graphs/``) on CUDA with the FlashInfer
    backend and one rank, unless ``enforce_eager``: one graph per size of
    ``cuda_graph_sizes`` up to ``max_num_seqs`` (stored sorted). Graphs reserve one KV
    block as scratch for padded rows. ``flashinfer_prefill_backend`` picks FlashInfer's
    prefill kernel family (auto, fa2, fa3); other backends ignore it.
    """

    model: str
    dtype: str = "auto"
    device: str = "auto"
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    attention_backend: str = "auto"
    seed: int = 0
    # Ranks the model is split over (one process each, engine/parallel/); 1 = no split.
    tensor_parallel_size: int = 1
    enforce_eager: bool = False
    cuda_graph_sizes: tuple[int, ...] = DEFAULT_CUDA_GRAPH_SIZES
    flashinfer_prefill_backend: str = "auto"

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model must name a local Hugging Face checkpoint directory")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be auto or one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if not (1 <= self.block_size <= 256):
            raise ValueError(f"block_size must be in [1, 256], got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError("num_kv_blocks must be >= 1")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes < 1:
            raise ValueError("kv_cache_memory_bytes must be >= 1")
        if not (0.0 < self.gpu_memory_utilization <= 1.0):
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be >= 2")
        if (not self.enable_chunked_prefill and self.max_model_len is not None
                and self.max_num_batched_tokens < self.max_model_len):
            raise ValueError(
                "without chunked prefill, max_num_batched_tokens must be >= max_model_len"
            )
        if not isinstance(self.enforce_eager, bool):
            raise ValueError(f"enforce_eager must be a bool, got {self.enforce_eager!r}")
        if isinstance(self.cuda_graph_sizes, (str, bytes)):
            raise ValueError(f"cuda_graph_sizes must be a sequence of ints, got "
                             f"{self.cuda_graph_sizes!r}")
        # Frozen: normalise (a list from JSON or a CLI, any order) through object.__setattr__.
        object.__setattr__(self, "cuda_graph_sizes", validate_sizes(self.cuda_graph_sizes))
        if self.flashinfer_prefill_backend not in PREFILL_BACKENDS:
            raise ValueError(f"flashinfer_prefill_backend must be one of "
                             f"{', '.join(PREFILL_BACKENDS)}, got "
                             f"{self.flashinfer_prefill_backend!r}")

    def resolve_device(self) -> torch.device:
        name = self.device
        if name == "auto":
            name = os.environ.get("PDSERVE_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device cuda requested but no CUDA GPU is available")
        return device

    def resolve_dtype(self, checkpoint_dtype: str, device: torch.device) -> torch.dtype:
        """'auto': float32 on CPU (exact reference numerics), the checkpoint's half type on GPU."""
        if self.dtype != "auto":
            return _DTYPES[self.dtype]
        if device.type == "cpu":
            return torch.float32
        return _DTYPES.get(checkpoint_dtype, torch.bfloat16) if checkpoint_dtype != "float32" \
            else torch.bfloat16
