"""Simulator benchmarks that compare variants of one mechanism on the same cases.

A ``Case`` is a trace on a plan; ``compare`` runs a goodput search per variant (a
``SimConfig`` each: routing policies, local-prefill rules, ...), the attainment curve of
each on a shared rate grid (multiples of the best variant's goodput), and one simulation
of each at a shared fixed rate (the baseline variant's goodput), whose extra figures the
caller picks (``at_fixed``). Used by ``kv_routing_sim.py`` and ``cond_disagg_sim.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pdserve.cluster.planning.simulator import (
    DisaggPlanSpec,
    GoodputSearch,
    SimConfig,
    SimResult,
    simulate,
)
from pdserve.router.slo import SloConfig
from pdserve.workloads.trace import Trace


@dataclass(frozen=True)
class Case:
    key: str
    title: str
    trace: Trace
    plan: DisaggPlanSpec
    about: str


def gain(rows: dict, a: str, b: str) -> str:
    """Goodput per GPU of variant ``a`` relative to ``b``, as a signed percentage."""
    x, y = rows[a]["goodput_per_gpu"], rows[b]["goodput_per_gpu"]
    return f"{x / y - 1:+.0%}" if y > 0 else ("+inf" if x > 0 else "n/a")


def compare(case: Case, profile, slo: SloConfig, configs: dict[str, SimConfig],
            baseline: str, grid: Sequence[float], rows_key: str,
            at_fixed: Callable[[SimResult], dict]) -> dict:
    """One case's record: per variant (under ``rows_key``) goodput, interpolated goodput,
    the curve, the searched rates and ``at_fixed(result)`` at the fixed rate."""
    t0 = time.monotonic()
    searches = {k: GoodputSearch(case.plan, profile, case.trace, slo, cfg)
                for k, cfg in configs.items()}
    good = {k: s.run(tol=0.02) for k, s in searches.items()}
    best = max(g.rate for g in good.values()) or 1.0
    rates = sorted({round(best * k, 3) for k in grid})
    fixed = good[baseline].rate or best / 2
    rows = {}
    for k, s in searches.items():
        res = simulate(case.plan, profile, s.workload.at_rate(fixed), s.cfg)
        g = good[k]
        rows[k] = {"goodput_rps": g.rate, "goodput_per_gpu": g.per_gpu_rate,
                   "interpolated_per_gpu": g.per_gpu_interpolated,
                   "curve": [(r, s.attainment(r)) for r in rates],
                   "searched": [list(x) for x in g.searched],
                   "at_fixed_rate": at_fixed(res)}
    return {"key": case.key, "title": case.title, "about": case.about,
            "plan": case.plan.label(), "gpus": case.plan.num_gpus,
            "requests": len(case.trace), "fixed_rate": fixed, rows_key: rows,
            "runtime_s": round(time.monotonic() - t0, 1)}
