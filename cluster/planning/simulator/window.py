"""Steady-state windows: which requests a simulation at a given rate replays, which it measures.

A serving system reaches its steady state only once its decode batches have filled: at a
high rate, a fixed count of requests (say 1,500) may arrive in less time than one request
takes to decode, so batches never grow and the simulation reports a goodput the system
cannot hold. A window is therefore set in *time* for the rate it is run at, in units of
the latency scale ``L`` of the workload: the latency of a long request that just meets its
SLO, ``ttft_s + q-quantile(output tokens) * tpot_s`` (``latency_quantile``, default the
99th percentile: the single longest request of a trace is one outlier, its 99th percentile
is what the batches carry).

At rate ``r`` a window is, in arrival order:

1. a *warm-up* of ``warmup * L`` seconds of arrivals, simulated and not counted (queues
   and batches fill);
2. the *measured* span, ``measure * L`` seconds and at least ``min_per_instance``
   requests per instance of the plan (at a low rate a few latencies hold few requests);
   attainment is the share of these requests meeting both targets;
3. a *cool-down* of ``cooldown * L`` seconds of arrivals, simulated and not counted: they
   keep the load on while the last measured requests finish (without them, the end of
   the window drains and flatters them).

Requests are taken consecutively from the workload starting at ``start`` and wrap around
when the window is longer than the workload (``Workload.cycle``), then re-timed to mean
rate ``r`` (``Workload.at_rate``). ``StopRule`` lets the simulator stop a run as soon as
the measured misses alone put attainment below the target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pdserve.cluster.planning.simulator.config import ColocatedPlanSpec, PlanSpec
from pdserve.cluster.planning.simulator.workload import Workload
from pdserve.router.slo import SloConfig


@dataclass(frozen=True)
class WindowConfig:
    """Window lengths in latency scales; see the module docstring."""

    warmup: float = 1.0
    measure: float = 3.0
    cooldown: float = 1.0
    min_per_instance: int = 50
    latency_quantile: float = 0.99

    def __post_init__(self) -> None:
        if not (self.warmup >= 0 and self.cooldown >= 0 and self.measure > 0):
            raise ValueError("need warmup >= 0, cooldown >= 0 and measure > 0 (latency scales)")
        if self.min_per_instance < 1:
            raise ValueError("min_per_instance must be >= 1")
        if not (0 < self.latency_quantile <= 1):
            raise ValueError("latency_quantile must be in (0, 1]")


def latency_scale(workload: Workload, slo: SloConfig, quantile: float) -> float:
    """``ttft_s + q-quantile(output) * tpot_s`` (seconds)."""
    out = sorted(workload.output)
    k = min(len(out) - 1, max(0, math.ceil(quantile * len(out)) - 1))
    return slo.ttft_s + out[k] * slo.tpot_s


@dataclass(frozen=True)
class Window:
    """One window: a workload at its rate and the index range ``[lo, hi)`` measured."""

    workload: Workload
    lo: int
    hi: int

    @property
    def measured(self) -> int:
        return self.hi - self.lo


@dataclass(frozen=True)
class StopRule:
    """Stop a simulation once more than ``max_misses`` requests of ``[lo, hi)`` missed a
    target: attainment is then below ``1 - max_misses / (hi - lo)`` whatever the rest do."""

    ttft_s: float
    tpot_s: float
    lo: int
    hi: int
    max_misses: int

    @classmethod
    def for_target(cls, slo: SloConfig, lo: int, hi: int) -> StopRule:
        return cls(slo.ttft_s, slo.tpot_s, lo, hi, math.floor((1 - slo.attainment) * (hi - lo)))


class SteadyWindows:
    """Windows of one workload under one SLO (``WindowConfig``), from a given start."""

    def __init__(self, workload: Workload, slo: SloConfig, config: WindowConfig | None = None,
                 start: int = 0) -> None:
        self.workload, self.cfg = workload, config or WindowConfig()
        if not (0 <= start < len(workload)):
            raise ValueError(f"start must index the workload, got {start}")
        self.start = start
        self.scale_s = latency_scale(workload, slo, self.cfg.latency_quantile)

    def counts(self, rate: float, instances: int) -> tuple[int, int, int]:
        """Requests in the warm-up, the measured span and the cool-down at ``rate``."""
        c, L = self.cfg, self.scale_s
        warm = math.ceil(rate * c.warmup * L)
        meas = max(math.ceil(rate * c.measure * L), c.min_per_instance * max(1, instances))
        cool = math.ceil(rate * c.cooldown * L)
        return warm, meas, cool

    def at(self, rate: float, instances: int, start: int | None = None) -> Window:
        warm, meas, cool = self.counts(rate, instances)
        w = self.workload.cycle(self.start if start is None else start, warm + meas + cool)
        return Window(w.at_rate(rate), warm, warm + meas)


def instances_of(spec: PlanSpec, phase: str = "both") -> int:
    """Instances (decode and colocated: lanes) whose load a measured span must cover."""
    if isinstance(spec, ColocatedPlanSpec):
        return spec.instance.count * spec.instance.pp
    lanes = spec.decode.count * spec.decode.pp
    return {"prefill": spec.prefill.count, "decode": lanes}.get(phase,
                                                                spec.prefill.count + lanes)
