"""The simulator's view of a trace: flat arrays, cheap to rescale to another rate.

``Workload.from_trace`` copies a ``Trace`` into three lists once; ``at_rate`` rescales the
arrival times the same way ``Trace.at_rate`` does (time_scale = trace rate / new rate)
without building thousands of frozen ``TraceRequest`` objects per bisection step.
``representative_slice`` picks ``n`` consecutive requests whose prompt and output length
distributions are closest to the whole trace's (keeping the real arrival burstiness):
the head of a trace is often unrepresentative (the Azure conversation trace's first 1,500
prompts have a 90th percentile of 1.8k tokens against 2.7k for the hour).

``prefix`` keeps, per request, the keys of its prompt's *full* blocks of ``block_size``
tokens (a trace's ``prefix_hashes`` cut to ``prompt // block_size``: a partial last block
is never cached), for the simulator's prefix caches; ``()`` when no request has any.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, replace

from pdserve.workloads.trace import DEFAULT_PREFIX_BLOCK_SIZE, Trace


@dataclass(frozen=True)
class Workload:
    name: str
    arrival: tuple[float, ...]
    prompt: tuple[int, ...]
    output: tuple[int, ...]
    prefix: tuple[tuple[int, ...], ...] = ()  # per request, full-block keys; () = none known
    block_size: int = DEFAULT_PREFIX_BLOCK_SIZE

    def __post_init__(self) -> None:
        if not self.arrival:
            raise ValueError("empty workload")
        if not (len(self.arrival) == len(self.prompt) == len(self.output)):
            raise ValueError("workload arrays differ in length")
        if self.prefix and len(self.prefix) != len(self.arrival):
            raise ValueError("workload prefix keys differ in length from its requests")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")

    @classmethod
    def from_trace(cls, trace: Trace) -> Workload:
        """The trace's arrays; its prefix hashes when any request has some (all of them on
        one block size: a cache has one block size)."""
        reqs = trace.requests
        sizes = {r.prefix_block_size for r in reqs if r.prefix_hashes}
        if len(sizes) > 1:
            raise ValueError(f"trace {trace.name!r} mixes prefix block sizes {sorted(sizes)}")
        bs = next(iter(sizes)) if sizes else DEFAULT_PREFIX_BLOCK_SIZE
        prefix = tuple(r.prefix_hashes[:r.prompt_len // bs] for r in reqs) if sizes else ()
        return cls(trace.name, tuple(r.arrival_s for r in reqs),
                   tuple(r.prompt_len for r in reqs), tuple(r.output_len for r in reqs),
                   prefix, bs)

    def __len__(self) -> int:
        return len(self.arrival)

    @property
    def rate(self) -> float:
        span = self.arrival[-1] - self.arrival[0]
        return (len(self) - 1) / span if span > 0 else math.inf

    def at_rate(self, rate: float) -> Workload:
        if not (rate > 0):
            raise ValueError("rate must be positive")
        if not math.isfinite(self.rate):
            return self
        k = self.rate / rate
        return replace(self, arrival=tuple(t * k for t in self.arrival))

    def cycle(self, start: int, n: int) -> Workload:
        """``n`` consecutive requests from index ``start``, wrapping around to the first
        (a window longer than the workload replays it again). The arrival gaps are the
        workload's own; the gap across the wrap is the mean gap. Arrivals start at 0."""
        size = len(self)
        if n < 1 or not (0 <= start < size):
            raise ValueError(f"need n >= 1 and 0 <= start < {size}, got {start}, {n}")
        if start == 0 and n == size:
            return self
        arr = self.arrival
        mean_gap = (arr[-1] - arr[0]) / (size - 1) if size > 1 else 0.0
        idx = [(start + i) % size for i in range(n)]
        times, t = [0.0] * n, 0.0
        for k in range(1, n):
            i = idx[k]
            t += arr[i] - arr[i - 1] if i > 0 else mean_gap
            times[k] = t
        prompt, output = self.prompt, self.output
        prefix = tuple(self.prefix[i] for i in idx) if self.prefix else ()
        return Workload(f"{self.name}[{start}+{n}]", tuple(times),
                        tuple(prompt[i] for i in idx), tuple(output[i] for i in idx), prefix,
                        self.block_size)

    @property
    def max_footprint(self) -> int:
        return max(p + o for p, o in zip(self.prompt, self.output, strict=True))


def _ks_distance(sample: list[int], ref_sorted: list[int]) -> float:
    """Kolmogorov-Smirnov distance between ``sample`` and a sorted reference."""
    s = sorted(sample)
    n, m = len(s), len(ref_sorted)
    worst = 0.0
    for i, x in enumerate(s):
        # ECDF of the reference just after x, versus the sample's ECDF on both sides of x.
        f_ref = bisect.bisect_right(ref_sorted, x) / m
        worst = max(worst, abs(f_ref - (i + 1) / n), abs(f_ref - i / n))
    return worst


def representative_start(trace: Trace, n: int, step: int | None = None) -> int:
    """Where the window of ``n`` consecutive requests whose length distributions best
    match the whole trace starts (KS distance on prompt and output lengths, the worse of
    the two); 0 when the trace has at most ``n`` requests."""
    if n < 1:
        raise ValueError("n must be >= 1")
    reqs = trace.requests
    if len(reqs) <= n:
        return 0
    ref_p = sorted(r.prompt_len for r in reqs)
    ref_o = sorted(r.output_len for r in reqs)
    step = step or max(1, n // 4)
    best, best_start = math.inf, 0
    for start in range(0, len(reqs) - n + 1, step):
        win = reqs[start:start + n]
        d = max(_ks_distance([r.prompt_len for r in win], ref_p),
                _ks_distance([r.output_len for r in win], ref_o))
        if d < best:
            best, best_start = d, start
    return best_start


def representative_slice(trace: Trace, n: int, step: int | None = None) -> Trace:
    """The window of ``n`` consecutive requests at ``representative_start``, re-based to
    start at 0; the trace itself when it has at most ``n`` requests."""
    best_start = representative_start(trace, n, step)
    if len(trace) <= n:
        return trace
    reqs = trace.requests
    win = reqs[best_start:best_start + n]
    t0 = win[0].arrival_s
    return Trace(f"{trace.name}[{best_start}:{best_start + n}]",
                 tuple(replace(r, arrival_s=r.arrival_s - t0) for r in win))
