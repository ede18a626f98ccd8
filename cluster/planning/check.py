"""The last step before a plan is written: check its claimed goodput, and say how sure it is.

The search ranks candidates on steady-state windows (``simulator/window.py``) cut from one
place in the trace. Before the plan is written, ``check_plan``:

1. replays the *long window* at the searched rate: the whole workload (re-timed to the
   rate; a workload shorter than one steady-state window at that rate is replayed
   cyclically up to that length), measuring every request, as a user re-simulating the
   plan on the trace would. If attainment falls below the target, the rate *backs off*:
   a bisection on the same long window, down from the searched rate, to the highest rate
   that holds there (the precision ``tol``); a rate known only as a lower bound (a
   replicated plan, ``replicate.py``) is searched upwards instead. The plan claims that
   rate;
2. measures a confidence figure at the claimed rate: attainment on ``replicates``
   steady-state windows starting at evenly spaced places of the trace (different
   stretches of the real arrivals and lengths). ``PlanCheck`` reports each, their mean
   and spread, and how many met the target.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from pdserve.cluster.planning.simulator.config import PlanSpec, SimConfig
from pdserve.cluster.planning.simulator.goodput import GoodputSearch
from pdserve.cluster.planning.simulator.simulate import simulate
from pdserve.cluster.planning.simulator.window import SteadyWindows
from pdserve.engine.latency_profile import LatencyProfile
from pdserve.router.slo import SloConfig


@dataclass(frozen=True)
class PlanCheck:
    searched_rate: float  # req/s the search found on steady-state windows
    rate: float  # req/s the plan claims: searched_rate, less after backing off, or more
    # when searched upwards (``explore_up``)
    long_requests: int  # requests in the long window
    long_attainment: float  # attainment on the long window at ``rate``
    backed_off: bool
    replicates: tuple[float, ...]  # attainment at ``rate`` on each replicate window
    replicate_requests: int  # measured requests per replicate window (the first's)

    @property
    def replicate_mean(self) -> float:
        return statistics.fmean(self.replicates) if self.replicates else math.nan

    @property
    def replicate_sd(self) -> float:
        return statistics.stdev(self.replicates) if len(self.replicates) > 1 else 0.0

    def replicates_passing(self, target: float) -> int:
        return sum(1 for a in self.replicates if a >= target)

    def summary(self, target: float) -> str:
        head = (f"long-window check: attainment {self.long_attainment:.3f} on "
                f"{self.long_requests} requests at {self.rate:.3f} req/s")
        if self.backed_off:
            head += f" (backed off from {self.searched_rate:.3f} req/s)"
        elif self.rate != self.searched_rate:
            head += f" (searched up from {self.searched_rate:.3f} req/s)"
        if not self.replicates:
            return head
        return (f"{head}; confidence: attainment {self.replicate_mean:.3f} +- "
                f"{self.replicate_sd:.3f} over {len(self.replicates)} windows of the trace "
                f"(min {min(self.replicates):.3f}; {self.replicates_passing(target)} of "
                f"{len(self.replicates)} >= {target:g})")


def check_plan(spec: PlanSpec, profile: LatencyProfile, windows: SteadyWindows,
               slo: SloConfig, cfg: SimConfig, rate: float, instances: int,
               replicates: int = 4, tol: float = 0.01, explore_up: bool = False) -> PlanCheck:
    """See the module docstring. ``instances`` sizes the windows' per-instance floor;
    ``explore_up``: ``rate`` is a lower bound (a replicated plan), so when it holds the
    long window is also searched above it."""
    w = windows.workload
    steady = sum(windows.counts(rate, instances))
    long_w = w.cycle(0, max(len(w), steady))
    claimed = rate
    att = simulate(spec, profile, long_w.at_rate(rate), cfg).attainment(slo)
    backed = att < slo.attainment
    if backed or explore_up:
        lo, hi = (0.9 * rate, rate) if backed else (rate, 1.1 * rate)
        g = GoodputSearch(spec, profile, long_w, slo, cfg).run(lo=lo, hi=hi, tol=tol)
        claimed, att = g.rate, g.attainment_at_rate
    reps: list[float] = []
    measured = 0
    if claimed > 0:
        for k in range(replicates):
            start = (windows.start + k * len(w) // replicates) % len(w)
            win = windows.at(claimed, instances, start)
            measured = measured or win.measured
            reps.append(simulate(spec, profile, win.workload, cfg).attainment(slo, win.lo,
                                                                              win.hi))
    return PlanCheck(rate, claimed, len(long_w), att, backed, tuple(reps), measured)
