"""The ``Trace`` type: requests with arrival times and prompt/output lengths.

A ``Trace`` is frozen, non-empty and sorted by arrival; arrival times start at 0 for
every loader (``formats``, ``synthetic``). ``Trace.scaled`` fits a trace to the hardware
at hand: time scaling changes the rate, length scaling shrinks prompts/outputs for a
small model on a CPU. ``at_rate``, ``head`` and ``window`` cut and re-time it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    prompt_len: int
    output_len: int

    def __post_init__(self) -> None:
        if self.arrival_s < 0 or self.prompt_len < 1 or self.output_len < 1:
            raise ValueError(f"invalid trace request {self}")


@dataclass(frozen=True)
class Trace:
    name: str
    requests: tuple[TraceRequest, ...]

    def __post_init__(self) -> None:
        if not self.requests:
            raise ValueError(f"trace {self.name!r} is empty")
        if any(b.arrival_s < a.arrival_s for a, b in zip(self.requests, self.requests[1:], strict=False)):
            raise ValueError(f"trace {self.name!r} is not sorted by arrival time")

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def duration_s(self) -> float:
        return self.requests[-1].arrival_s - self.requests[0].arrival_s

    @property
    def rate(self) -> float:
        """Mean arrival rate (requests/s)."""
        return (len(self) - 1) / self.duration_s if self.duration_s > 0 else float("inf")

    def scaled(self, time_scale: float = 1.0, length_scale: float = 1.0,
               max_prompt_len: int | None = None, max_output_len: int | None = None) -> Trace:
        """Arrival times multiplied by ``time_scale`` (< 1 = faster); lengths multiplied by
        ``length_scale`` (at least 1 token) and clipped to the maxima."""
        if time_scale <= 0 or length_scale <= 0:
            raise ValueError("scales must be positive")

        def length(n: int, cap: int | None) -> int:
            n = max(1, round(n * length_scale))
            return min(n, cap) if cap else n

        return Trace(f"{self.name}", tuple(
            TraceRequest(r.arrival_s * time_scale, length(r.prompt_len, max_prompt_len),
                         length(r.output_len, max_output_len)) for r in self.requests))

    def at_rate(self, rate: float) -> Trace:
        """The same requests with arrivals rescaled to a mean rate of ``rate`` req/s."""
        if rate <= 0:
            raise ValueError("rate must be positive")
        return self.scaled(time_scale=self.rate / rate) if math.isfinite(self.rate) else self

    def head(self, n: int) -> Trace:
        return Trace(self.name, self.requests[:n])

    def window(self, start_s: float, duration_s: float) -> Trace:
        """Requests arriving in [start_s, start_s + duration_s), re-based to start at 0."""
        sel = [r for r in self.requests if start_s <= r.arrival_s < start_s + duration_s]
        t0 = sel[0].arrival_s if sel else 0.0
        return Trace(self.name, tuple(replace(r, arrival_s=r.arrival_s - t0) for r in sel))
