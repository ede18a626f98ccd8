"""Synthetic traces: Poisson or Gamma (bursty) arrivals with given length distributions.

Seeded, so the same arguments always give the same trace.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from pdserve.workloads.trace import Trace, TraceRequest


def synthetic(n: int, rate: float, prompt_lens: Sequence[int] | tuple[int, int],
              output_lens: Sequence[int] | tuple[int, int], cv: float = 1.0,
              seed: int = 0, name: str | None = None) -> Trace:
    """``n`` requests at mean ``rate`` req/s. ``cv`` = 1 is Poisson; ``cv`` > 1 draws Gamma
    inter-arrivals with that coefficient of variation (bursty). Lengths are drawn
    uniformly from ``(lo, hi)`` when given a pair, else sampled from the given list."""
    if n < 1 or rate <= 0 or cv <= 0:
        raise ValueError("need n >= 1, rate > 0, cv > 0")
    rng = random.Random(seed)
    shape = 1.0 / (cv * cv)

    def draw(spec) -> int:
        if isinstance(spec, tuple) and len(spec) == 2:
            return rng.randint(spec[0], spec[1])
        return rng.choice(list(spec))

    t, reqs = 0.0, []
    for _ in range(n):
        reqs.append(TraceRequest(t, draw(prompt_lens), draw(output_lens)))
        t += rng.gammavariate(shape, 1.0 / (shape * rate))
    kind = "poisson" if cv == 1.0 else f"gamma-cv{cv:g}"
    return Trace(name or f"{kind}-{rate:g}rps", tuple(reqs))
