"""Discrete-event simulator of disaggregated and colocated serving plans (pure Python).

Given a latency profile, a trace and a plan, ``simulate`` reports per-request TTFT/TPOT,
SLO attainment and percentiles; ``goodput`` bisects the highest rate meeting the SLO
attainment target. The planner (``pdserve.cluster.planning.planner``) calls these many times.
Modules: ``config`` (specs), ``costs`` (step-time models, pipeline choices),
``disagg``/``colocated`` (event loops), ``prefix_cache`` (prefill instances' prefix caches and
the router's record of them), ``elastic`` (pools resized while a trace runs: the
autoscaler's simulator), ``result``, ``goodput``, ``workload``.
"""

from pdserve.cluster.planning.simulator.config import (
    ColocatedPlanSpec,
    DisaggPlanSpec,
    HostContention,
    InstanceSpec,
    Phase,
    PlanSpec,
    SimConfig,
)
from pdserve.cluster.planning.simulator.goodput import GoodputResult, GoodputSearch, goodput
from pdserve.cluster.planning.simulator.result import LatencyPercentiles, RequestRecord, SimResult
from pdserve.cluster.planning.simulator.simulate import simulate
from pdserve.cluster.planning.simulator.workload import Workload, representative_slice

__all__ = [
    "ColocatedPlanSpec",
    "DisaggPlanSpec",
    "GoodputResult",
    "GoodputSearch",
    "HostContention",
    "InstanceSpec",
    "LatencyPercentiles",
    "Phase",
    "PlanSpec",
    "RequestRecord",
    "SimConfig",
    "SimResult",
    "Workload",
    "goodput",
    "representative_slice",
    "simulate",
]
