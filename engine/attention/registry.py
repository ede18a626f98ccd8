"""Attention backends by name. FlashInfer is imported only when asked for."""

from __future__ import annotations

import importlib.util

import torch

from pdserve.engine.attention.base import AttentionBackend
from pdserve.engine.model_config import ModelConfig
from pdserve.engine.registry import Registry


def _torch():
    from pdserve.engine.attention.torch_ref import TorchAttention

    return TorchAttention


def _flashinfer():
    from pdserve.engine.attention.flashinfer_backend import FlashInferAttention

    return FlashInferAttention


BACKENDS: Registry[type[AttentionBackend]] = Registry(
    "attention backend", {"torch": _torch, "flashinfer": _flashinfer})


def resolve_backend_name(name: str, device: torch.device) -> str:
    """'auto' picks FlashInfer on CUDA when it is installed, else the torch reference."""
    if name != "auto":
        if name not in BACKENDS:
            raise ValueError(f"unknown attention backend {name!r}; choose from auto, "
                             f"{', '.join(BACKENDS.names())}")
        if name == "flashinfer" and device.type != "cuda":
            raise ValueError("the flashinfer attention backend needs a CUDA device")
        return name
    if device.type == "cuda" and importlib.util.find_spec("flashinfer") is not None:
        return "flashinfer"
    return "torch"


def create_backend(name: str, config: ModelConfig, device: torch.device,
                   dtype: torch.dtype, *, flashinfer_prefill_backend: str = "auto"
                   ) -> AttentionBackend:
    """``flashinfer_prefill_backend``: the FlashInfer prefill kernel family (auto, fa2,
    fa3); the other backends have no such choice and ignore it."""
    resolved = resolve_backend_name(name, device)
    if resolved == "flashinfer":
        return BACKENDS.get(resolved)(config, device, dtype,
                                      prefill_backend=flashinfer_prefill_backend)
    return BACKENDS.get(resolved)(config, device, dtype)
