"""What a simulation reports: per-request timings, SLO attainment, latency percentiles.

A ``SimResult`` is produced once by an event loop and never mutated. It keeps flat tuples
(cheap to build, the planner runs thousands of simulations); ``records`` materialises
one ``RequestRecord`` per request on demand. A request the plan cannot hold at all (its
prompt + output exceed every instance's KV capacity) is *rejected*: its TTFT is
infinite, so it counts as an SLO miss. With prefix caching (``SimConfig.prefix_caching``)
it also keeps each request's cached prompt tokens (those its prefill did not compute) and
reports the hit rate, cached prompt tokens / prompt tokens. With conditional
disaggregation (``SimConfig.local_prefill``) it counts the rule's decisions by reason;
``num_kv_transfers`` counts the requests whose KV moved from prefill to decode.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.cluster.planning.simulator.workload import Workload
from pdserve.router.slo import SloConfig


@dataclass(frozen=True)
class RequestRecord:
    arrival_s: float
    prompt_len: int
    output_len: int
    first_token_s: float
    last_token_s: float
    ttft_s: float
    tpot_s: float | None
    cached_tokens: int = 0


@dataclass(frozen=True)
class LatencyPercentiles:
    ttft_p50: float
    ttft_p90: float
    ttft_p99: float
    tpot_p50: float
    tpot_p90: float
    tpot_p99: float

    def as_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default); NaN for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass(frozen=True)
class SimResult:
    label: str
    phase: str
    num_gpus: int
    rate: float  # mean arrival rate of the simulated workload, req/s
    arrival: tuple[float, ...]
    prompt_len: tuple[int, ...]
    output_len: tuple[int, ...]
    first_token: tuple[float, ...]
    last_token: tuple[float, ...]
    ttft: tuple[float, ...]
    tpot: tuple[float | None, ...]
    num_rejected: int = 0
    num_events: int = 0
    # Per request: rejected by admission control (TTFT predicted to miss); empty = none.
    admission_rejected: tuple[bool, ...] = ()
    stopped_early: bool = False  # a ``StopRule`` ended the run: attainment is a bound
    # Per request: prompt tokens found in the prefill instance's prefix cache; empty = the
    # run modelled no prefix caching.
    cached_tokens: tuple[int, ...] = ()
    # (reason, requests) of the local-prefill rule (``router.local_prefill.REASONS``);
    # empty = the rule was off.
    prefill_decisions: tuple[tuple[str, int], ...] = ()
    num_kv_transfers: int = 0
    num_local_prefills: int = 0  # requests the rule prefilled on their decode instance

    def __post_init__(self) -> None:
        n = len(self.arrival)
        if any(len(x) != n for x in (self.prompt_len, self.output_len, self.first_token,
                                     self.last_token, self.ttft, self.tpot)):
            raise ValueError("SimResult arrays differ in length")
        if self.cached_tokens and len(self.cached_tokens) != n:
            raise ValueError("SimResult cached_tokens differ in length")

    def __len__(self) -> int:
        return len(self.arrival)

    @classmethod
    def from_run(cls, label: str, phase: str, num_gpus: int, w: Workload, first: list[float],
                 last: list[float], rejected: list[bool], overhead_s: float, num_events: int,
                 decoded: bool = True, admission_rejected: tuple[bool, ...] = (),
                 stopped_early: bool = False, cached_tokens: tuple[int, ...] = (),
                 prefill_decisions: tuple[tuple[str, int], ...] = (),
                 num_kv_transfers: int = 0, num_local_prefills: int = 0) -> SimResult:
        """What an event loop hands over, per request: TTFT = first token - arrival +
        ``overhead_s`` (infinite when rejected), TPOT = (last - first) / (output - 1) for
        requests that ``decoded`` more than one token."""
        arr, out = w.arrival, w.output
        n = len(arr)
        # A stopped run leaves NaN times: TTFT stays NaN (never <= a target), TPOT infinite.
        ttft = tuple(math.inf if rejected[r] else first[r] - arr[r] + overhead_s
                     for r in range(n))
        tpot = tuple(None if (rejected[r] or not decoded or out[r] < 2)
                     else (last[r] - first[r]) / (out[r] - 1) if last[r] == last[r]
                     else math.inf for r in range(n))
        return cls(label, phase, num_gpus, w.rate, arr, w.prompt, out, tuple(first),
                   tuple(last), ttft, tpot, sum(rejected), num_events, admission_rejected,
                   stopped_early, cached_tokens, prefill_decisions, num_kv_transfers,
                   num_local_prefills)

    @property
    def records(self) -> tuple[RequestRecord, ...]:
        cached = self.cached_tokens or (0,) * len(self)
        return tuple(RequestRecord(*row) for row in zip(
            self.arrival, self.prompt_len, self.output_len, self.first_token,
            self.last_token, self.ttft, self.tpot, cached, strict=True))

    @property
    def prefix_hit_rate(self) -> float | None:
        """Cached prompt tokens / prompt tokens over all requests; None without caching."""
        if not self.cached_tokens:
            return None
        return sum(self.cached_tokens) / sum(self.prompt_len)

    def attainment(self, slo: SloConfig, lo: int = 0, hi: int | None = None) -> float:
        """Share of requests ``[lo, hi)`` (default all) meeting both TTFT and TPOT (TPOT
        trivially met when None). A request a stopped run never finished counts as a miss."""
        t_ttft, t_tpot = slo.ttft_s, slo.tpot_s
        hi = len(self.ttft) if hi is None else hi
        ok = sum(1 for f, p in zip(self.ttft[lo:hi], self.tpot[lo:hi], strict=True)
                 if f <= t_ttft and (p is None or p <= t_tpot))
        return ok / (hi - lo)

    def attainment_admitted(self, slo: SloConfig) -> float:
        """Attainment among the requests admission control let in."""
        flags = self.admission_rejected or (False,) * len(self.ttft)
        kept = [(f, p) for f, p, r in zip(self.ttft, self.tpot, flags, strict=True) if not r]
        if not kept:
            return 0.0
        return sum(1 for f, p in kept if f <= slo.ttft_s and (p is None or p <= slo.tpot_s)) \
            / len(kept)

    def goodput_rps(self, slo: SloConfig) -> float:
        """SLO-meeting requests per second of trace time."""
        span = (self.arrival[-1] - self.arrival[0]) if len(self.arrival) > 1 else 0.0
        met = self.attainment(slo) * len(self)
        return met / span if span > 0 else 0.0

    def ttft_attainment(self, slo: SloConfig) -> float:
        return sum(1 for f in self.ttft if f <= slo.ttft_s) / len(self.ttft)

    def tpot_attainment(self, slo: SloConfig) -> float:
        return sum(1 for p in self.tpot if p is None or p <= slo.tpot_s) / len(self.tpot)

    def percentiles(self) -> LatencyPercentiles:
        ttft = [x for x in self.ttft if math.isfinite(x)]
        tpot = [x for x in self.tpot if x is not None]
        return LatencyPercentiles(*(percentile(ttft, q) for q in (50, 90, 99)),
                                  *(percentile(tpot, q) for q in (50, 90, 99)))

    def summary(self, slo: SloConfig | None = None) -> dict:
        d: dict = {"plan": self.label, "phase": self.phase, "num_gpus": self.num_gpus,
                   "rate": self.rate, "num_requests": len(self),
                   "num_rejected": self.num_rejected, **self.percentiles().as_dict()}
        if self.cached_tokens:
            d["prefix_hit_rate"] = self.prefix_hit_rate
        if self.prefill_decisions:
            d["prefill_decisions"] = dict(self.prefill_decisions)
        if slo is not None:
            d.update(attainment=self.attainment(slo),
                     attainment_admitted=self.attainment_admitted(slo),
                     num_admission_rejected=sum(self.admission_rejected),
                     ttft_attainment=self.ttft_attainment(slo),
                     tpot_attainment=self.tpot_attainment(slo))
        return d
