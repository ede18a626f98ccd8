"""Synthetic traces: Poisson or Gamma (bursty) arrivals with given length distributions.

Seeded, so the same arguments always give the same trace. ``arrival_times`` draws the
same arrival process alone, for trace formats that have lengths but no timestamps
(ShareGPT).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

from pdserve.workloads.trace import Trace, TraceRequest


def _check(rate: float, cv: float) -> None:
    if not rate > 0 or not cv > 0:
        raise ValueError(f"need rate > 0 and cv > 0, got rate={rate!r}, cv={cv!r}")


def _gaps(rng: random.Random, rate: float, cv: float) -> Iterator[float]:
    """Inter-arrival times with mean 1/rate: exponential (Poisson arrivals) at ``cv`` = 1,
    Gamma with that coefficient of variation otherwise."""
    shape = 1.0 / (cv * cv)
    scale = 1.0 / (shape * rate)
    while True:
        yield rng.gammavariate(shape, scale)


def arrival_times(n: int, rate: float, cv: float = 1.0, seed: int = 0) -> list[float]:
    """``n`` arrival times (seconds, the first at 0) at mean ``rate`` req/s."""
    if n < 1:
        raise ValueError(f"need n >= 1, got {n}")
    _check(rate, cv)
    gaps = _gaps(random.Random(seed), rate, cv)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += next(gaps)
    return out


def synthetic(n: int, rate: float, prompt_lens: Sequence[int] | tuple[int, int],
              output_lens: Sequence[int] | tuple[int, int], cv: float = 1.0,
              seed: int = 0, name: str | None = None) -> Trace:
    """``n`` requests at mean ``rate`` req/s. ``cv`` = 1 is Poisson; ``cv`` > 1 draws Gamma
    inter-arrivals with that coefficient of variation (bursty). Lengths are drawn
    uniformly from ``(lo, hi)`` when given a pair, else sampled from the given list."""
    if n < 1:
        raise ValueError(f"need n >= 1, got {n}")
    _check(rate, cv)
    rng = random.Random(seed)
    gaps = _gaps(rng, rate, cv)  # shares rng with the lengths: one stream per seed

    def draw(spec) -> int:
        if isinstance(spec, tuple) and len(spec) == 2:
            return rng.randint(spec[0], spec[1])
        return rng.choice(list(spec))

    t, reqs = 0.0, []
    for _ in range(n):
        reqs.append(TraceRequest(t, draw(prompt_lens), draw(output_lens)))
        t += next(gaps)
    kind = "poisson" if cv == 1.0 else f"gamma-cv{cv:g}"
    return Trace(name or f"{kind}-{rate:g}rps", tuple(reqs))
