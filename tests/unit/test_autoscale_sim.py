"""Pools that change size during a simulation, and the autoscaler in the simulator's loop."""

from __future__ import annotations

import math

import pytest

from pdserve.cluster.autoscale import AutoscaleConfig, FixedCapacity, PoolBounds
from pdserve.cluster.autoscale.simulate import simulate_autoscaled
from pdserve.cluster.planning.simulator import DisaggPlanSpec, InstanceSpec, SimConfig, simulate
from pdserve.cluster.planning.simulator.elastic import ElasticDisagg
from pdserve.cluster.planning.simulator.workload import Workload
from pdserve.engine.latency_profile import distserve_opt13b_a100
from pdserve.router.slo import SloConfig
from pdserve.workloads.rate_steps import RateStepsSpec, rate_steps_trace
from pdserve.workloads.synthetic import synthetic

PROFILE = distserve_opt13b_a100()
SLO = SloConfig(0.25, 0.1, 0.9)


def workload(n: int = 600, rate: float = 8.0) -> Workload:
    return Workload.from_trace(synthetic(n, rate, (64, 1024), (8, 128), seed=2))


@pytest.mark.parametrize("dispatch", ["least_loaded", "round_robin", "slo_aware"])
def test_pools_never_resized_run_as_the_fixed_plan(dispatch):
    w, cfg = workload(), SimConfig(dispatch=dispatch)
    fixed = simulate(DisaggPlanSpec(InstanceSpec(1, 1, 2), InstanceSpec(1, 1, 3)), PROFILE, w, cfg)
    run = ElasticDisagg(InstanceSpec(1, 1, 2), InstanceSpec(1, 1, 3), 4, 6, PROFILE, w, cfg)
    res, gpu_s = run.finish()
    assert res.first_token == fixed.first_token and res.last_token == fixed.last_token
    assert gpu_s == pytest.approx(5 * run.end_s)


def test_an_added_instance_takes_work_only_after_its_startup():
    w = workload()
    run = ElasticDisagg(InstanceSpec(), InstanceSpec(), 2, 2, PROFILE, w, startup_s=20.0)
    seen = {}
    run.sim.call_at(10.0, lambda now: run.resize(now, 2, 2))
    for t in (29.9, 30.1):
        run.sim.call_at(
            t, lambda now: seen.setdefault(now, (list(run.sim.p_active), list(run.sim.all_lanes)))
        )
    _, gpu_s = run.finish()
    assert seen[29.9] == ([0], [0]) and seen[30.1] == ([0, 1], [0, 1])
    # Both new instances count from their provisioning at 10 s, the first ones from 0.
    assert gpu_s == pytest.approx(2 * run.end_s + 2 * (run.end_s - 10.0))


def test_a_removed_instance_drains_loses_nothing_and_stops_costing():
    w = workload(rate=20.0)
    run = ElasticDisagg(InstanceSpec(1, 1, 2), InstanceSpec(1, 1, 3), 2, 3, PROFILE, w)
    run.sim.call_at(10.0, lambda now: run.resize(now, 1, 1))
    res, gpu_s = run.finish()
    assert all(math.isfinite(t) for t in res.last_token)  # every request finished
    assert res.num_rejected == 0
    assert run.sizes() == (0, 0)  # finish() retires every instance
    # 1 prefill + 1 decode stayed to the end; 1 prefill and 2 decode left after 10 s,
    # once their work was done (before the end: they took nothing new).
    kept = 2 * run.end_s
    assert 3 * 10.0 < gpu_s - kept < 3 * run.end_s


def test_draining_instances_take_no_new_requests():
    w = workload(rate=20.0)
    run = ElasticDisagg(InstanceSpec(1, 1, 2), InstanceSpec(1, 1, 2), 2, 2, PROFILE, w)
    run.sim.call_at(5.0, lambda now: run.resize(now, 1, 1))
    run.finish()
    late = [r for r in range(len(w)) if w.arrival[r] > 5.0]
    assert late and {run.sim.lane_of[r] for r in late} == {run.sim.all_lanes[0]}


def config(**kw) -> AutoscaleConfig:
    base = dict(
        prefill=PoolBounds(1, 4, "prefill"),
        decode=PoolBounds(1, 6, "decode"),
        profile=PROFILE,
        slo=SLO,
        interval_s=10.0,
        upscale_cooldown_s=20.0,
        downscale_window_s=60.0,
        headroom=0.8,
        startup_s=10.0,
    )
    base.update(kw)
    return AutoscaleConfig(**base)


def test_autoscaled_pools_follow_a_rate_step_up_and_back_down():
    trace = rate_steps_trace(
        RateStepsSpec(
            steps=((200.0, 2.0), (200.0, 8.0), (300.0, 2.0)),
            prompt_tokens=(64, 512),
            output_tokens=(8, 64),
        )
    )
    # One instance holds 4 req/s of either phase: at headroom 0.8 (3.2 req/s), the low
    # step (2 req/s; 10 s windows see up to ~3) needs 1 of each, the high one (8) 3.
    run = simulate_autoscaled(trace, config(), (1, 1), capacity=FixedCapacity(4.0, 4.0))
    assert all(math.isfinite(t) for t in run.result.last_token)
    assert max(p.prefill + p.decode for p in run.timeline) == 6
    high = [p for p in run.timeline if 250 <= p.t <= 400]
    assert all(p.prefill_up == 3 and p.decode_up == 3 for p in high)
    assert run.timeline[-1].prefill == 1 and run.timeline[-1].decode == 1
    reasons = {d.reason for _, d in run.decisions}
    assert "rate_up" in reasons and "rate_down" in reasons
    assert run.decisions[0][0] > 200.0  # nothing to do before the step
    assert 2 < run.mean_gpus < 8
    assert [p.t for p in run.timeline] == [10.0 * k for k in range(1, len(run.timeline) + 1)]


def test_the_simulator_needs_an_instance_per_pool():
    with pytest.raises(ValueError, match="at least one prefill instance"):
        simulate_autoscaled(
            workload(20),
            config(prefill=PoolBounds(0, 2, "prefill")),
            (1, 1),
            capacity=FixedCapacity(1, 1),
        )
    with pytest.raises(ValueError, match="initial decode count 9 is outside"):
        simulate_autoscaled(workload(20), config(), (1, 9), capacity=FixedCapacity(1, 1))


def test_rate_steps_trace_follows_its_steps():
    spec = RateStepsSpec(steps=((600.0, 1.0), (600.0, 4.0)), seed=3)
    t = rate_steps_trace(spec)
    low = sum(1 for r in t.requests if r.arrival_s < 600)
    high = len(t) - low
    assert 3 * low < high < 5 * low
    assert t == rate_steps_trace(spec)  # seeded
    assert all(64 <= r.prompt_len <= 2048 for r in t.requests)
    pairs = ((100, 10), (200, 20))
    assert {
        (r.prompt_len, r.output_len)
        for r in rate_steps_trace(RateStepsSpec(steps=((60.0, 5.0),), lengths=pairs)).requests
    } <= set(pairs)
    assert spec.rate_at(700) == 4.0 and spec.rate_at(1300) == 0.0
    with pytest.raises(ValueError, match="every step has rate 0"):
        RateStepsSpec(steps=((60.0, 0.0),))
