"""Arrival models a planner or simulator may assume for a trace's requests.

``trace`` keeps the trace's own timestamps (its burstiness: the default, since a plan
sized on smoothed arrivals overstates what a bursty service holds); ``poisson`` and
``gamma`` keep the requests and their order but redraw the arrival times at the trace's
mean rate, exponential or Gamma gaps with coefficient of variation ``cv`` (seeded).
Every model is later rescaled to the rate under test, so only its shape matters.
"""

from __future__ import annotations

from dataclasses import replace

from pdserve.workloads.synthetic import arrival_times
from pdserve.workloads.trace import Trace

ARRIVALS = ("trace", "poisson", "gamma")


def describe(kind: str, cv: float) -> str:
    """How a plan records the model: ``trace``, ``poisson`` or ``gamma(cv=2)``."""
    return f"gamma(cv={cv:g})" if kind == "gamma" else kind


def with_arrivals(trace: Trace, kind: str = "trace", cv: float = 2.0, seed: int = 0) -> Trace:
    """``trace`` with arrivals drawn from model ``kind`` (see the module docstring)."""
    if kind not in ARRIVALS:
        raise ValueError(f"arrivals must be one of {ARRIVALS}, got {kind!r}")
    if kind == "trace" or len(trace) < 2:
        return trace
    rate = trace.rate if trace.duration_s > 0 else 1.0
    times = arrival_times(len(trace), rate, cv if kind == "gamma" else 1.0, seed)
    return Trace(f"{trace.name}~{describe(kind, cv)}",
                 tuple(replace(r, arrival_s=t) for r, t in zip(trace.requests, times,
                                                               strict=True)))
