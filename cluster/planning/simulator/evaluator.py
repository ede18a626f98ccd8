"""Cached goodput evaluation of candidate configurations, shared by planner and exhaustive search.

A ``Candidate`` is one full configuration (disaggregated: prefill and decode instance
specs, transfer bandwidth, units; or colocated). The ``Evaluator`` owns one workload,
SLO and scheduler config and memoises goodput searches under a *simulation key*:
configurations the simulator cannot tell apart share a key (a decode ``(tp, pp, n)``
pool is ``n*pp`` lanes of the ``tp`` entry, see ``costs.py``; a prefill-only run ignores
the decode pool and vice versa), so each distinct simulation runs once per search.
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.cluster.planning.simulator.config import (
    ColocatedPlanSpec,
    DisaggPlanSpec,
    InstanceSpec,
    PlanSpec,
    SimConfig,
)
from pdserve.cluster.planning.simulator.goodput import GoodputResult, GoodputSearch
from pdserve.cluster.planning.simulator.window import SteadyWindows
from pdserve.cluster.planning.simulator.workload import Workload
from pdserve.engine.latency_profile import LatencyProfile
from pdserve.router.slo import SloConfig


@dataclass(frozen=True)
class Candidate:
    mode: str  # "disaggregated" | "colocated"
    prefill: InstanceSpec | None = None
    decode: InstanceSpec | None = None
    colocated: InstanceSpec | None = None
    transfer_bandwidth: float = 25e9
    units: int = 1

    def __post_init__(self) -> None:
        if self.mode == "disaggregated":
            if self.prefill is None or self.decode is None or self.colocated is not None:
                raise ValueError("a disaggregated candidate needs prefill and decode only")
        elif self.mode == "colocated":
            if self.colocated is None or self.prefill is not None or self.decode is not None:
                raise ValueError("a colocated candidate needs the colocated spec only")
        else:
            raise ValueError(f"unknown mode {self.mode!r}")

    @classmethod
    def disagg(cls, prefill: InstanceSpec, decode: InstanceSpec, bandwidth: float,
               units: int = 1) -> Candidate:
        return cls("disaggregated", prefill, decode, None, bandwidth, units)

    @classmethod
    def colo(cls, instance: InstanceSpec) -> Candidate:
        return cls("colocated", colocated=instance)

    def spec(self) -> PlanSpec:
        if self.mode == "colocated":
            return ColocatedPlanSpec(self.colocated)
        return DisaggPlanSpec(self.prefill, self.decode, self.transfer_bandwidth, self.units)

    @property
    def num_gpus(self) -> int:
        return self.spec().num_gpus

    def label(self) -> str:
        return self.spec().label()

    def as_dict(self) -> dict:
        def s(x: InstanceSpec | None) -> list[int] | None:
            return [x.tp, x.pp, x.count] if x is not None else None

        return {"mode": self.mode, "prefill": s(self.prefill), "decode": s(self.decode),
                "colocated": s(self.colocated), "transfer_bandwidth": self.transfer_bandwidth,
                "units": self.units, "num_gpus": self.num_gpus}


@dataclass(frozen=True)
class Evaluation:
    candidate: Candidate
    per_gpu_goodput: float
    goodput: GoodputResult


def sim_key(spec: PlanSpec, phase: str) -> tuple:
    if isinstance(spec, ColocatedPlanSpec):
        i = spec.instance
        return ("colocated", i.tp, i.pp, i.count)
    p, d = spec.prefill, spec.decode
    pre = (p.tp, p.pp, p.count)
    dec = (d.tp, d.count * d.pp)
    if phase == "prefill":
        return ("prefill", pre)
    if phase == "decode":
        return ("decode", dec)
    return ("disagg", pre, dec, spec.transfer_bandwidth, spec.units)


class Evaluator:
    """Goodput of configurations on one workload under one SLO, memoised."""

    def __init__(self, profile: LatencyProfile, workload: Workload, slo: SloConfig,
                 sim_config: SimConfig | None = None, tol: float = 0.02,
                 windows: SteadyWindows | None = None) -> None:
        self.profile, self.workload, self.slo = profile, workload, slo
        self.cfg = sim_config or SimConfig()
        self.tol = tol
        self.windows = windows
        self.cache: dict[tuple, GoodputResult] = {}
        self.num_sims = 0
        self.requests_simulated = 0

    def goodput(self, spec: PlanSpec, phase: str = "both", lo: float | None = None,
                hi: float | None = None, tol: float | None = None) -> GoodputResult:
        """Cached by simulation key; ``tol`` (default the evaluator's) is the bisection's
        precision the first time a key is searched."""
        key = sim_key(spec, phase)
        if key not in self.cache:
            search = GoodputSearch(spec, self.profile, self.workload, self.slo, self.cfg,
                                   phase, self.windows)
            res = search.run(lo, hi, tol or self.tol)
            self.num_sims += res.num_sims
            self.requests_simulated += search.requests_simulated
            self.cache[key] = res
        return self.cache[key]

    def evaluate(self, cand: Candidate, lo: float | None = None,
                 hi: float | None = None) -> Evaluation:
        g = self.goodput(cand.spec(), "both", lo, hi)
        return Evaluation(cand, g.rate / cand.num_gpus, g)
