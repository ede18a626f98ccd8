"""``simulate``: run one plan on one trace and return its ``SimResult``.

The entry point validates the inputs (plan type, phase, the profile has the plan's tp
degrees) and routes to the disaggregated or the colocated event loop. It accepts a
``Trace`` or an already-flattened ``Workload`` (what ``goodput`` passes while bisecting).
"""

from __future__ import annotations

from pdserve.cluster.planning.simulator.colocated import run_colocated
from pdserve.cluster.planning.simulator.config import (
    PHASES,
    ColocatedPlanSpec,
    DisaggPlanSpec,
    PlanSpec,
    SimConfig,
)
from pdserve.cluster.planning.simulator.disagg import run_disagg
from pdserve.cluster.planning.simulator.result import SimResult
from pdserve.cluster.planning.simulator.window import StopRule
from pdserve.cluster.planning.simulator.workload import Workload
from pdserve.engine.latency_profile import LatencyProfile
from pdserve.workloads.trace import Trace


def as_workload(trace: Trace | Workload) -> Workload:
    return trace if isinstance(trace, Workload) else Workload.from_trace(trace)


def simulate(plan: PlanSpec, profile: LatencyProfile, trace: Trace | Workload,
             sim_config: SimConfig | None = None, phase: str = "both",
             stop: StopRule | None = None) -> SimResult:
    """Simulate serving ``trace`` (at its own arrival times) on ``plan``.

    ``phase`` ("both" | "prefill" | "decode") isolates one pool of a disaggregated plan;
    the colocated baseline only runs as a whole. ``stop`` may end a run early
    (``SimResult.stopped_early``) once its measured misses decide it."""
    cfg = sim_config or SimConfig()
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    w = as_workload(trace)
    if isinstance(plan, DisaggPlanSpec):
        return run_disagg(plan, profile, w, cfg, phase, stop)
    if isinstance(plan, ColocatedPlanSpec):
        if phase != "both":
            raise ValueError("a colocated plan can only be simulated with phase='both'")
        if cfg.prefix_caching:
            raise ValueError("prefix caching is modelled for disaggregated plans only")
        if cfg.local_prefill.enabled:
            raise ValueError("local prefill (conditional disaggregation) needs a "
                             "disaggregated plan: a colocated instance always prefills locally")
        return run_colocated(plan, profile, w, cfg, stop)
    raise TypeError(f"not a plan spec: {plan!r}")
