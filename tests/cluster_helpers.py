"""Helpers shared by the tests that run a whole cluster (in-process or on Ray)."""

from __future__ import annotations

import time

from pdserve.engine.config import EngineConfig


def engine_config(model, **overrides) -> EngineConfig:
    """A small CPU engine for the demo model: 512 blocks of 16, 32 sequences, 1024-token
    steps (``overrides`` changes any field)."""
    fields = dict(model=str(model), device="cpu", num_kv_blocks=512, block_size=16,
                  max_num_seqs=32, max_num_batched_tokens=1024)
    return EngineConfig(**(fields | overrides))


def wait_until(pred, timeout: float = 15.0, interval: float = 0.05) -> bool:
    """Poll ``pred`` until it holds or ``timeout`` seconds pass; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return pred()


def local_idle(cluster) -> bool:
    """A ``LocalCluster`` holds no KV blocks, reservations or queued prefill work."""
    return (all(s.num_used_blocks == 0 and s.num_reserved == 0 for s in cluster.decode_stats())
            and all(s.num_running == 0 and s.num_waiting == 0 for s in cluster.prefill_stats()))


def ray_held(cluster) -> int:
    """Blocks, reservations and requests still held by a Ray ``Cluster``'s workers."""
    total = 0
    for s in cluster.stats().values():
        total += getattr(s, "num_used_blocks", 0) + getattr(s, "num_reserved", 0)
        total += getattr(s, "num_running", 0) + getattr(s, "num_waiting", 0)
    return total
