"""Traces whose request rate changes over time: the load an autoscaler has to follow.

``RateStepsSpec`` describes a rate profile as consecutive steps ``(seconds, req/s)``
(default: 20 minutes at 2 req/s, 20 at 8, 20 at 2: a 4x swing within the hour) and
``rate_steps_trace`` draws it (seeded: the same spec gives the same trace): Poisson
arrivals within each step, each request's (prompt, output) lengths drawn from ``lengths``
(pairs, e.g. a real trace's, so the length mix is real) or, when none are given,
uniformly from ``prompt_tokens`` and ``output_tokens``. Arrivals are kept on a
millisecond grid, the Mooncake format's resolution, so ``write_mooncake_jsonl`` writes a
trace that loads back equal.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from pdserve.workloads.trace import Trace, TraceRequest


@dataclass(frozen=True)
class RateStepsSpec:
    steps: tuple[tuple[float, float], ...] = ((1200.0, 2.0), (1200.0, 8.0), (1200.0, 2.0))
    prompt_tokens: tuple[int, int] = (64, 2048)
    output_tokens: tuple[int, int] = (16, 512)
    lengths: tuple[tuple[int, int], ...] = ()  # (prompt, output) pairs to draw from
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.steps:
            raise ValueError("need at least one (seconds, req/s) step")
        for dur, rate in self.steps:
            if not (math.isfinite(dur) and dur > 0 and math.isfinite(rate) and rate >= 0):
                raise ValueError(f"a step needs seconds > 0 and req/s >= 0, got {(dur, rate)}")
        if not any(rate > 0 for _, rate in self.steps):
            raise ValueError("every step has rate 0: the trace would be empty")
        for name in ("prompt_tokens", "output_tokens"):
            lo, hi = getattr(self, name)
            if not (1 <= lo <= hi):
                raise ValueError(f"{name} must be (lo, hi) with 1 <= lo <= hi, got {(lo, hi)}")
        if any(p < 1 or o < 1 for p, o in self.lengths):
            raise ValueError("length pairs must be >= 1 token each")

    @property
    def duration_s(self) -> float:
        return sum(d for d, _ in self.steps)

    def rate_at(self, t: float) -> float:
        """The profile's rate at ``t`` seconds (0 past the end)."""
        for dur, rate in self.steps:
            if t < dur:
                return rate
            t -= dur
        return 0.0

    def describe(self) -> str:
        steps = ", ".join(f"{d / 60:g} min at {r:g} req/s" for d, r in self.steps)
        lens = (
            f"lengths drawn from {len(self.lengths)} (prompt, output) pairs"
            if self.lengths
            else f"prompts {self.prompt_tokens[0]}-"
            f"{self.prompt_tokens[1]} tokens, outputs {self.output_tokens[0]}-"
            f"{self.output_tokens[1]}"
        )
        return f"Poisson arrivals: {steps}; {lens}; seed {self.seed}"


def rate_steps_trace(spec: RateStepsSpec, name: str | None = None) -> Trace:
    rng = random.Random(spec.seed)
    reqs, start = [], 0.0
    for dur, rate in spec.steps:
        t = start
        while rate > 0:
            t += rng.expovariate(rate)
            if t >= start + dur:
                break
            if spec.lengths:
                prompt, output = rng.choice(spec.lengths)
            else:
                prompt, output = rng.randint(*spec.prompt_tokens), rng.randint(*spec.output_tokens)
            reqs.append(TraceRequest(round(t, 3), prompt, output))
        start += dur
    peak = max(r for _, r in spec.steps)
    low = min(r for _, r in spec.steps)
    return Trace.rebased(name or f"rate-steps-{low:g}-{peak:g}rps-seed{spec.seed}", reqs)
