"""Simulator: SLO-aware dispatch with admission control against least-loaded, in overload."""

from __future__ import annotations

import pytest

from pdserve.cluster.planning.simulator import DisaggPlanSpec, InstanceSpec, SimConfig, simulate
from pdserve.engine.latency_profile import DecodeFit, LatencyProfile, ParallelEntry, PrefillFit
from pdserve.router.slo import SloConfig
from pdserve.workloads.synthetic import synthetic

PROFILE = LatencyProfile("toy", "test", (ParallelEntry(1, PrefillFit(2.0, 0.05, 0.0),
                                                       DecodeFit(2.0, 0.0005, 0.1), 200_000),),
                         kv_bytes_per_token=1000)
SLO = SloConfig(ttft_s=0.3, tpot_s=0.05)


def run(rate: float, dispatch: str, admission: float | None):
    trace = synthetic(400, rate, (50, 800), (5, 40), seed=3)
    plan = DisaggPlanSpec(InstanceSpec(1, 1, 2), InstanceSpec(1, 1, 1), 1e10)
    cfg = SimConfig(prefill_token_budget=2048, dispatch=dispatch, admission_ttft_s=admission)
    return simulate(plan, PROFILE, trace, cfg)


def test_admission_keeps_admitted_requests_within_slo_without_losing_goodput():
    ll = run(120.0, "least_loaded", None)  # ~2x what two prefill instances sustain
    slo = run(120.0, "slo_aware", SLO.ttft_s)
    assert ll.attainment(SLO) < SLO.attainment  # the load breaks the SLO for least-loaded
    assert sum(slo.admission_rejected) > 0
    assert slo.attainment_admitted(SLO) > ll.attainment(SLO)
    assert slo.attainment_admitted(SLO) >= SLO.attainment
    assert slo.goodput_rps(SLO) >= ll.goodput_rps(SLO)


def test_no_rejections_when_load_is_light():
    res = run(5.0, "slo_aware", SLO.ttft_s)
    assert sum(res.admission_rejected) == 0
    assert res.attainment(SLO) == pytest.approx(res.attainment_admitted(SLO))


def test_admission_requires_slo_aware_dispatch():
    with pytest.raises(ValueError):
        SimConfig(dispatch="least_loaded", admission_ttft_s=0.3)
