"""Host-to-device copies that never wait for the device's queued work.

A blocking copy (``torch.tensor(..., device="cuda")``, ``.to("cuda")``) synchronises the
stream: the host stalls until every kernel queued so far has run, which undoes running
ahead of the GPU. A non-blocking copy from pageable memory may do the same (the driver
may synchronise to stage it). From pinned memory it is a plain async copy, and torch's
pinned-memory cache does not reuse the block until the copy is done, so a fresh pinned
tensor per copy is safe.
"""

from __future__ import annotations

import torch


def staged(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (a CPU tensor) ready for ``.to(device, non_blocking=True)`` or
    ``copy_(..., non_blocking=True)``: pinned when ``device`` is CUDA, else itself."""
    return t.pin_memory() if device.type == "cuda" else t


def upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device`` without synchronising the device."""
    return staged(t, device).to(device, non_blocking=True)
