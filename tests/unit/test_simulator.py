"""The discrete-event simulator: hand-checked timings, batching, KV limits, goodput search.

Expected values are computed here from the profile formulas (not from the simulator's own
cost helpers), so a wrong step-time model or a wrong event order shows up as a mismatch.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from pdserve.cluster.planning.simulator import (
    ColocatedPlanSpec,
    DisaggPlanSpec,
    GoodputSearch,
    HostContention,
    InstanceSpec,
    SimConfig,
    Workload,
    goodput,
    representative_slice,
    simulate,
)
from pdserve.engine.latency_profile import (
    DecodeFit,
    LatencyProfile,
    ParallelEntry,
    PrefillFit,
    distserve_opt13b_a100,
)
from pdserve.router.slo import SloConfig
from pdserve.workloads.formats import load_azure_csv
from pdserve.workloads.synthetic import synthetic
from pdserve.workloads.trace import Trace, TraceRequest

AZURE = Path(__file__).resolve().parents[3] / "shared" / "data" / "azure_llm_2023_conv.csv"

# Prefill ms = 10 + 0.1*sum(l) + 1e-5*sum(l^2); decode ms = 5 + 0.01*sum(ctx+1) + 1*B.
PA, PB, PC = 10.0, 0.1, 1e-5
DA, DB, DC = 5.0, 0.01, 1.0


def tiny_profile(cap: int = 100_000, kv_bytes: int = 1000) -> LatencyProfile:
    entries = (ParallelEntry(1, PrefillFit(PA, PB, PC), DecodeFit(DA, DB, DC), cap),
               ParallelEntry(2, PrefillFit(PA / 2, PB / 2, PC / 2), DecodeFit(DA, DB / 2, DC),
                             2 * cap))
    return LatencyProfile("tiny", "test", entries, kv_bytes_per_token=kv_bytes)


def prefill_ms(lens: list[int]) -> float:
    return PA + PB * sum(lens) + PC * sum(x * x for x in lens)


def decode_ms(ctx: list[int]) -> float:
    return DA + DB * sum(c + 1 for c in ctx) + DC * len(ctx)


def trace(*reqs: tuple[float, int, int]) -> Trace:
    return Trace("t", tuple(TraceRequest(*r) for r in reqs))


ONE = InstanceSpec()


def disagg(p: InstanceSpec = ONE, d: InstanceSpec = ONE, bw: float = 1e15) -> DisaggPlanSpec:
    return DisaggPlanSpec(p, d, bw)


def test_single_request_idle_disaggregated_matches_formula():
    res = simulate(disagg(), tiny_profile(), trace((0.0, 100, 5)),
                   SimConfig(request_overhead_s=0.01))
    ttft = (10 + 0.1 * 100 + 1e-5 * 100**2) / 1e3 + 0.01  # 20.1 ms + overhead
    assert res.ttft[0] == pytest.approx(ttft)
    # 4 decode steps with contexts 101..104 (prompt + tokens so far).
    steps = [(5 + 0.01 * (c + 1) + 1) / 1e3 for c in (101, 102, 103, 104)]
    assert res.tpot[0] == pytest.approx(sum(steps) / 4)
    assert res.percentiles().ttft_p50 == pytest.approx(ttft)
    assert res.attainment(SloConfig(ttft_s=0.031, tpot_s=0.01)) == 1.0
    assert res.attainment(SloConfig(ttft_s=0.030, tpot_s=0.01)) == 0.0


def test_shared_host_contention_stretches_only_overlapping_steps():
    # Request 0 decodes 50 steps (~6 ms each) from t=20 ms; request 1's prefill starts at
    # t=30 ms while request 0's decode step is in flight, so it is stretched by 2x, and
    # request 0's decode steps that start during that prefill are stretched by 3x.
    t = trace((0.0, 100, 50), (0.030, 100, 2))
    cfg = SimConfig(contention=HostContention(prefill=2.0, decode=3.0))
    base = simulate(disagg(), tiny_profile(), t)
    res = simulate(disagg(), tiny_profile(), t, cfg)
    assert res.ttft[0] == pytest.approx(base.ttft[0])  # alone: untouched
    assert res.ttft[1] == pytest.approx(2 * base.ttft[1])
    assert res.tpot[0] > base.tpot[0]
    same = simulate(disagg(), tiny_profile(), t, SimConfig(contention=HostContention()))
    assert same.ttft == base.ttft and same.tpot == base.tpot
    with pytest.raises(ValueError, match="contention.decode"):
        HostContention(decode=0.0)


def test_profile_instance_model_agrees_with_hand_formula():
    inst = tiny_profile().instance(1, 1)
    assert inst.prefill_s([100]) == pytest.approx(prefill_ms([100]) / 1e3)
    assert inst.decode_s([101]) == pytest.approx(decode_ms([101]) / 1e3)


def test_slow_transfer_delays_decode_not_ttft():
    # 100 tokens * 1000 B at 1e5 B/s = 1 s, started with the prefill at t=0.
    res = simulate(disagg(bw=1e5), tiny_profile(), trace((0.0, 100, 3)))
    first = prefill_ms([100]) / 1e3
    assert res.ttft[0] == pytest.approx(first)
    last = 1.0 + (decode_ms([101]) + decode_ms([102])) / 1e3
    assert res.last_token[0] == pytest.approx(last)
    assert res.tpot[0] == pytest.approx((last - first) / 2)


def test_fast_transfer_is_hidden_by_layerwise_overlap():
    slow_enough = 100 * 1000 / (prefill_ms([100]) / 1e3) * 1.01  # finishes just before
    a = simulate(disagg(bw=slow_enough), tiny_profile(), trace((0.0, 100, 3)))
    b = simulate(disagg(bw=1e15), tiny_profile(), trace((0.0, 100, 3)))
    assert a.last_token[0] == pytest.approx(b.last_token[0])


def test_simultaneous_requests_batch_in_prefill_when_they_fit():
    t = trace((0.0, 100, 2), (0.0, 200, 2))
    res = simulate(disagg(), tiny_profile(), t, SimConfig(prefill_token_budget=300))
    both = prefill_ms([100, 200]) / 1e3
    assert res.ttft == pytest.approx((both, both))
    res = simulate(disagg(), tiny_profile(), t, SimConfig(prefill_token_budget=299))
    assert res.ttft == pytest.approx((prefill_ms([100]) / 1e3,
                                      (prefill_ms([100]) + prefill_ms([200])) / 1e3))


def test_long_prompt_runs_alone_or_in_chunks():
    t = trace((0.0, 250, 2))
    res = simulate(disagg(), tiny_profile(), t, SimConfig(prefill_token_budget=100))
    assert res.ttft[0] == pytest.approx(prefill_ms([250]) / 1e3)
    res = simulate(disagg(), tiny_profile(), t,
                   SimConfig(prefill_token_budget=100, chunked_prefill=True))
    # Chunks [0,100), [100,200), [200,250): each attends to everything before it.
    chunks = [PA + PB * 100 + PC * 100**2, PA + PB * 100 + PC * (200**2 - 100**2),
              PA + PB * 50 + PC * (250**2 - 200**2)]
    assert res.ttft[0] == pytest.approx(sum(chunks) / 1e3)
    assert res.ttft[0] == pytest.approx((prefill_ms([250]) + 2 * PA) / 1e3)


def test_pipeline_prefill_latency_is_pp_stages():
    res = simulate(disagg(p=InstanceSpec(1, 2, 1)), tiny_profile(), trace((0.0, 100, 2)))
    stage = (prefill_ms([100]) / 2 + 2) / 1e3  # the profile's (... )/pp + pp
    assert res.ttft[0] == pytest.approx(2 * stage)
    # Two batches back to back: the second enters stage 0 when the first leaves it.
    res = simulate(disagg(p=InstanceSpec(1, 2, 1)), tiny_profile(),
                   trace((0.0, 100, 2), (0.0, 100, 2)), SimConfig(prefill_token_budget=100))
    assert res.ttft == pytest.approx((2 * stage, 3 * stage))


def test_kv_capacity_makes_second_request_wait_at_decode():
    # Each request needs 100 + 101 tokens of KV; the decode lane holds 300.
    res = simulate(disagg(), tiny_profile(cap=300), trace((0.0, 100, 101), (0.0, 100, 101)))
    first_token = prefill_ms([100, 100]) / 1e3
    solo = sum(decode_ms([100 + g]) for g in range(1, 101)) / 1e3
    assert res.first_token == pytest.approx((first_token, first_token))
    assert res.last_token[0] == pytest.approx(first_token + solo)
    assert res.last_token[1] == pytest.approx(first_token + 2 * solo)
    # With room for both they decode together (and finish together).
    res = simulate(disagg(), tiny_profile(cap=402), trace((0.0, 100, 101), (0.0, 100, 101)))
    together = sum(decode_ms([100 + g, 100 + g]) for g in range(1, 101)) / 1e3
    assert res.last_token == pytest.approx((first_token + together,) * 2)


def test_request_larger_than_any_instance_is_rejected_as_a_miss():
    res = simulate(disagg(), tiny_profile(cap=300), trace((0.0, 100, 5), (1.0, 250, 100)))
    assert res.num_rejected == 1 and math.isinf(res.ttft[1])
    assert res.attainment(SloConfig(1.0, 1.0)) == 0.5


def test_single_output_token_has_no_tpot():
    res = simulate(disagg(), tiny_profile(), trace((0.0, 100, 1)))
    assert res.tpot[0] is None and res.last_token[0] == res.first_token[0]


def test_colocated_single_request_matches_formula():
    res = simulate(ColocatedPlanSpec(InstanceSpec()), tiny_profile(), trace((0.0, 100, 5)))
    assert res.ttft[0] == pytest.approx(prefill_ms([100]) / 1e3)
    assert res.tpot[0] == pytest.approx(sum(decode_ms([c]) for c in (101, 102, 103, 104))
                                        / 4e3)


def test_colocated_mixed_step_pays_the_fixed_cost_once():
    t0 = prefill_ms([100]) / 1e3
    res = simulate(ColocatedPlanSpec(InstanceSpec()), tiny_profile(),
                   trace((0.0, 100, 3), (t0 + 1e-6, 100, 3)))
    # Request 2 waits for request 1's first decode step, then prefills with its second.
    step1_end = t0 + decode_ms([101]) / 1e3
    mixed = (prefill_ms([100]) + decode_ms([102]) - min(PA, DA)) / 1e3
    assert res.first_token[1] == pytest.approx(step1_end + mixed)
    assert res.last_token[0] == pytest.approx(step1_end + mixed)


def synthetic_trace(n: int = 400) -> Trace:
    return synthetic(n, rate=10.0, prompt_lens=(50, 400), output_lens=(5, 60), seed=3)


SLO = SloConfig(ttft_s=0.08, tpot_s=0.012, attainment=0.9)


def test_attainment_does_not_grow_with_rate():
    plan, prof, tr = disagg(d=InstanceSpec(1, 1, 2)), tiny_profile(), synthetic_trace()
    att = [simulate(plan, prof, tr.at_rate(r)).attainment(SLO) for r in (5, 10, 20, 40, 80)]
    assert att[0] > att[-1]
    assert all(b <= a + 0.02 for a, b in zip(att, att[1:], strict=False))


def test_more_instances_never_lower_goodput():
    prof, tr = tiny_profile(), synthetic_trace()
    rates = [goodput(disagg(InstanceSpec(1, 1, n_p), InstanceSpec(1, 1, n_d)), prof, tr,
                     SLO).rate for n_p, n_d in ((1, 1), (1, 2), (2, 2), (2, 3))]
    assert rates[0] > 0
    assert all(b >= a for a, b in zip(rates, rates[1:], strict=False))


def test_goodput_bisection_brackets_the_target():
    search = GoodputSearch(disagg(d=InstanceSpec(1, 1, 2)), tiny_profile(), synthetic_trace(),
                           SLO)
    res = search.run(tol=0.02)
    assert res.rate > 0 and res.per_gpu_rate == pytest.approx(res.rate / 3)
    assert res.attainment_at_rate >= SLO.attainment
    above = [r for r, a in res.searched if r > res.rate]
    fail = min(above)
    assert search.cache[fail] < SLO.attainment
    assert fail <= res.rate / (1 - 0.02) + 1e-9
    assert res.rate <= res.interpolated_rate <= fail


def test_goodput_zero_when_slo_is_impossible():
    res = goodput(disagg(), tiny_profile(), synthetic_trace(100),
                  SloConfig(ttft_s=0.001, tpot_s=1.0))
    assert res.rate == 0.0 and res.per_gpu_rate == 0.0


def test_phase_isolation_matches_the_full_system_for_ttft():
    plan, prof, tr = disagg(d=InstanceSpec(1, 1, 2)), tiny_profile(), synthetic_trace()
    full = simulate(plan, prof, tr.at_rate(30))
    pre = simulate(plan, prof, tr.at_rate(30), phase="prefill")
    assert pre.ttft == full.ttft and all(x is None for x in pre.tpot)
    dec = simulate(plan, prof, tr.at_rate(30), phase="decode")
    assert all(x == 0.0 for x in dec.ttft)
    with pytest.raises(ValueError):
        simulate(ColocatedPlanSpec(InstanceSpec()), prof, tr, phase="prefill")


def test_specs_validate():
    with pytest.raises(ValueError):
        InstanceSpec(tp=0)
    with pytest.raises(ValueError):
        SimConfig(prefill_token_budget=0)
    with pytest.raises(ValueError):
        SimConfig(dispatch="random")
    with pytest.raises(ValueError):
        DisaggPlanSpec(InstanceSpec(count=3), InstanceSpec(count=2), units=2)


def test_units_keep_kv_inside_the_unit():
    plan = DisaggPlanSpec(InstanceSpec(1, 1, 2), InstanceSpec(1, 1, 2), 1e15, units=2)
    res = simulate(plan, tiny_profile(), synthetic_trace(200))
    assert res.num_rejected == 0 and all(math.isfinite(x) for x in res.last_token)


def test_representative_slice_matches_length_distribution():
    tr = synthetic(2000, rate=5.0, prompt_lens=(10, 3000), output_lens=(1, 500), seed=1)
    sl = representative_slice(tr, 300)
    assert len(sl) == 300 and sl.requests[0].arrival_s == 0.0
    w = Workload.from_trace(sl)
    assert w.at_rate(10.0).rate == pytest.approx(10.0)


@pytest.mark.skipif(not AZURE.exists(), reason="Azure conversation trace not available")
def test_azure_trace_on_distserve_profile_is_sane():
    tr = representative_slice(load_azure_csv(AZURE), 400)
    prof = distserve_opt13b_a100()
    slo = SloConfig(ttft_s=0.25, tpot_s=0.1, attainment=0.9)
    plan = DisaggPlanSpec(InstanceSpec(4, 1, 1), InstanceSpec(1, 1, 2), 25e9)
    low = simulate(plan, prof, tr.at_rate(1.0))
    high = simulate(plan, prof, tr.at_rate(40.0))
    assert low.num_rejected == 0
    assert 0.8 < low.attainment(slo) <= 1.0
    assert high.attainment(slo) < low.attainment(slo)
    pct = low.percentiles()
    assert 0.01 < pct.ttft_p50 < 0.25 and 0.015 < pct.tpot_p50 < 0.1
    col = simulate(ColocatedPlanSpec(InstanceSpec(4, 1, 1)), prof, tr.at_rate(1.0))
    assert 0.8 < col.attainment(slo) <= 1.0
