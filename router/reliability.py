"""How the router bounds its work and rides out worker failures (one frozen config).

* ``max_retries``: a request whose worker dies (or whose KV transfer fails) is tried
  again this many times: from scratch if nothing was sent yet, else resumed on another
  decode worker by prefilling its prompt plus the tokens already sent. After that it
  fails with UNAVAILABLE, naming the last failure.
* ``retry_backoff_s``: the pause before attempt ``k`` is ``k * retry_backoff_s`` (a dying
  worker often takes a moment to be reported; hammering the survivors does not help).
* ``heartbeat_interval_s`` / ``heartbeat_timeout_s``: each worker's ``stats`` is polled
  at that interval; no answer within the timeout marks it dead (a hung process), and its
  requests are recovered as if it had died. Keep the timeout above the longest model
  step: on CPU a 2k-token prefill takes about half a second.
* ``max_in_flight``: requests the router holds at once (all phases);
  ``max_queued_per_prefill``: requests assigned to one prefill worker and not yet
  prefilled. Beyond either, a request gets RESOURCE_EXHAUSTED with a retry hint at once,
  so a burst costs the router bounded memory instead of an ever longer queue.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ReliabilityConfig:
    max_retries: int = 3
    retry_backoff_s: float = 0.05
    heartbeat_interval_s: float = 0.5
    heartbeat_timeout_s: float = 10.0
    max_in_flight: int = 1024
    max_queued_per_prefill: int = 128

    def __post_init__(self) -> None:
        if not (isinstance(self.max_retries, int) and 0 <= self.max_retries <= 100):
            raise ValueError(f"max_retries must be an integer in [0, 100], got {self.max_retries!r}")
        for name in ("retry_backoff_s", "heartbeat_interval_s", "heartbeat_timeout_s"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {v!r}")
        if self.heartbeat_interval_s <= 0 or self.heartbeat_timeout_s <= 0:
            raise ValueError("heartbeat_interval_s and heartbeat_timeout_s must be > 0")
        for name in ("max_in_flight", "max_queued_per_prefill"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
