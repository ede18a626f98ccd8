"""Goodput: the highest request rate at which a plan still meets its SLO attainment target.

Following DistServe, goodput is where SLO attainment (both TTFT and TPOT met) crosses the
target as the arrival rate of the trace grows; per-GPU goodput divides by the plan's
GPUs. ``GoodputSearch`` replays the same requests rescaled to each probed rate (like
``Trace.at_rate``), caching attainment per rate:

1. bracket: from a starting rate (the hints, else 1 req/s per GPU), double while the
   target is met; halve up to three times while it is not, then try ``min_rate``, where
   requests hardly overlap: if even that fails the goodput is 0 (e.g. prompts too long
   for the TTFT target on this parallelism), which costs one simulation, not a dozen;
2. refine by bisection (geometric while the bracket spans more than 4x) until the bracket
   is within ``tol`` (relative).

``rate`` is the highest *measured* passing rate below the first failing one, so
attainment there is >= target by construction; ``interpolated_rate`` is DistServe's
linear interpolation of the crossing between the final bracket's ends. Attainment is only
statistically monotone in the rate; bisection then returns one of the crossings.

With ``windows`` (``window.SteadyWindows``, what the planner uses) each rate is simulated
on a steady-state window sized for that rate, attainment is measured on its middle span
only, and a run stops as soon as the measured misses decide that the rate fails (its
cached attainment is then an upper bound below the target). Without, every rate replays
the whole workload (``pdserve simulate --goodput``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pdserve.cluster.planning.simulator.config import PlanSpec, SimConfig
from pdserve.cluster.planning.simulator.simulate import as_workload, simulate
from pdserve.cluster.planning.simulator.window import SteadyWindows, StopRule, instances_of
from pdserve.cluster.planning.simulator.workload import Workload
from pdserve.engine.latency_profile import LatencyProfile
from pdserve.router.slo import SloConfig
from pdserve.workloads.trace import Trace


@dataclass(frozen=True)
class GoodputResult:
    rate: float  # req/s: highest measured rate meeting the target (0 if none)
    per_gpu_rate: float
    attainment_at_rate: float
    interpolated_rate: float
    num_gpus: int
    searched: tuple[tuple[float, float], ...]  # (rate, attainment), sorted by rate
    num_sims: int

    def __post_init__(self) -> None:
        if self.rate < 0 or self.num_gpus < 1:
            raise ValueError("rate must be >= 0 and num_gpus >= 1")

    @property
    def per_gpu_interpolated(self) -> float:
        return self.interpolated_rate / self.num_gpus


class GoodputSearch:
    """Attainment of one plan as a function of rate (cached), and its goodput bisection."""

    def __init__(self, plan: PlanSpec, profile: LatencyProfile, trace: Trace | Workload,
                 slo: SloConfig, sim_config: SimConfig | None = None,
                 phase: str = "both", windows: SteadyWindows | None = None) -> None:
        self.plan, self.profile, self.slo, self.phase = plan, profile, slo, phase
        self.cfg = sim_config or SimConfig()
        self.workload = as_workload(trace)
        self.windows = windows
        self.num_gpus = self._gpus()
        self.cache: dict[float, float] = {}
        self.requests_simulated = 0

    def _gpus(self) -> int:
        p = self.plan
        if self.phase == "prefill":
            return p.prefill.num_gpus
        if self.phase == "decode":
            return p.decode.num_gpus
        return p.num_gpus

    def attainment(self, rate: float) -> float:
        if rate not in self.cache:
            if self.windows is None:
                w = self.workload.at_rate(rate)
                res = simulate(self.plan, self.profile, w, self.cfg, self.phase)
                self.cache[rate] = res.attainment(self.slo)
            else:
                win = self.windows.at(rate, instances_of(self.plan, self.phase))
                w = win.workload
                res = simulate(self.plan, self.profile, w, self.cfg, self.phase,
                               StopRule.for_target(self.slo, win.lo, win.hi))
                self.cache[rate] = res.attainment(self.slo, win.lo, win.hi)
            self.requests_simulated += len(w)
        return self.cache[rate]

    def passes(self, rate: float) -> bool:
        return self.attainment(rate) >= self.slo.attainment

    def run(self, lo: float | None = None, hi: float | None = None, tol: float = 0.02,
            min_rate: float = 1e-3, max_sims: int = 40) -> GoodputResult:
        """``lo``/``hi``: hints (a rate expected to pass / to fail); either may be wrong."""
        if not (0 < tol < 1):
            raise ValueError("tol must be in (0, 1)")
        start = len(self.cache)
        good, bad = 0.0, math.inf

        def probe(r: float) -> None:
            nonlocal good, bad
            if self.passes(r):
                good = max(good, r)
            else:
                bad = min(bad, r)

        for hint in (lo, hi):
            if hint:
                probe(hint)
        if not (lo or hi):
            probe(float(self.num_gpus))
        halvings = 0
        while not (0 < good < bad < math.inf) and len(self.cache) - start < max_sims:
            if good >= bad:  # a pass above a failure: trust the failure, search below it
                good = 0.0
            if good > 0:
                probe(good * 2)
            elif halvings < 3 and bad / 2 > min_rate:
                halvings += 1
                probe(bad / 2)
            elif min_rate in self.cache or bad <= min_rate:
                break  # fails even when requests hardly overlap: goodput 0
            else:
                probe(min_rate)
        if 0 < good < bad < math.inf:
            while bad - good > tol * bad and len(self.cache) - start < max_sims:
                # Geometric steps while the bracket spans orders of magnitude.
                mid = math.sqrt(good * bad) if bad > 4 * good else 0.5 * (good + bad)
                if self.passes(mid):
                    good = mid
                else:
                    bad = mid
        return self._result(good, bad, len(self.cache) - start)

    def _result(self, good: float, bad: float, sims: int) -> GoodputResult:
        target = self.slo.attainment
        searched = tuple(sorted(self.cache.items()))
        if good <= 0:
            return GoodputResult(0.0, 0.0, 0.0, 0.0, self.num_gpus, searched, sims)
        a_good = self.cache[good]
        interp = good
        if bad < math.inf:
            a_bad = self.cache[bad]
            if a_good > a_bad:
                interp = good + (a_good - target) / (a_good - a_bad) * (bad - good)
        return GoodputResult(good, good / self.num_gpus, a_good, interp, self.num_gpus,
                             searched, sims)


def goodput(plan: PlanSpec, profile: LatencyProfile, trace: Trace | Workload, slo: SloConfig,
            sim_config: SimConfig | None = None, lo: float | None = None,
            hi: float | None = None, tol: float = 0.02, phase: str = "both") -> GoodputResult:
    """Goodput of ``plan`` serving ``trace``'s requests at rescaled rates (see module doc)."""
    return GoodputSearch(plan, profile, trace, slo, sim_config, phase).run(lo, hi, tol)
