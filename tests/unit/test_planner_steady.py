"""The planner's claims hold beyond its own windows: steady-state windows, the long-window
check, the confidence figure, arrival models, and infeasibility explained."""

from __future__ import annotations

import argparse
import math

import pytest

from pdserve.cluster.planning.cluster_desc import ClusterDesc
from pdserve.cluster.planning.curves import curve_grid, fill_curve
from pdserve.cluster.planning.infeasibility import zero_load_tpot_s, zero_load_ttft_s
from pdserve.cluster.planning.plan import Plan
from pdserve.cluster.planning.planner import Planner, PlannerConfig, PlanningError
from pdserve.cluster.planning.simulator import (
    ColocatedPlanSpec,
    DisaggPlanSpec,
    InstanceSpec,
    SimConfig,
    Workload,
    simulate,
)
from pdserve.cluster.planning.simulator.costs import DecodeCost, PrefillCost
from pdserve.cluster.planning.simulator.window import SteadyWindows, StopRule, WindowConfig
from pdserve.engine.latency_profile import DecodeFit, LatencyProfile, ParallelEntry, PrefillFit
from pdserve.router.slo import SloConfig
from pdserve.workloads.arrivals import with_arrivals
from pdserve.workloads.synthetic import synthetic

# Decoding is cheap per request (0.01 ms each in a step) but long (500-1000 tokens at up
# to 20 ms a step): a lane holds ~1,400 requests at the TPOT target, so 1,500 requests
# arrive in less time than one of them takes to decode, and a 1,500-request window never
# sees a full batch.
LONG_DECODE = LatencyProfile("long-decode", "test", (
    ParallelEntry(1, PrefillFit(5.0, 0.05), DecodeFit(5.0, 1e-6, 0.01), 4_000_000),),
    kv_bytes_per_token=100)
LONG_SLO = SloConfig(ttft_s=0.05, tpot_s=0.02, attainment=0.9)
LONG_CFG = SimConfig(max_decode_batch=4096)


def test_claim_holds_on_a_long_resimulation_when_steady_state_needs_many_requests():
    trace = synthetic(12_000, 50.0, (10, 50), (500, 1000), seed=3)
    planner = Planner(ClusterDesc(1, 3, 80.0, 300e9, 25e9, "toy"), LONG_DECODE, trace,
                      LONG_SLO, LONG_CFG, PlannerConfig(max_pp=1))
    plan = planner.plan("high")
    # The steady state at the claimed rate spans more than 1,500 requests.
    warm, meas, cool = planner.windows.counts(plan.expected_rate, 3)
    assert warm + meas + cool > 1500
    # Re-simulated on the whole trace (12,000 requests, ~4 request latencies at this
    # rate) the claim holds.
    res = simulate(plan.spec(), LONG_DECODE, trace.at_rate(plan.expected_rate), LONG_CFG)
    assert res.attainment(LONG_SLO) >= 0.88


def test_plan_records_its_check_arrivals_and_precision(tmp_path):
    trace = synthetic(3000, 50.0, (10, 50), (50, 100), seed=4)
    planner = Planner(ClusterDesc(1, 3, 80.0, 300e9, 25e9, "toy"), LONG_DECODE, trace,
                      LONG_SLO, LONG_CFG, PlannerConfig(max_pp=1, replicates=3),
                      arrivals="poisson")
    plan = planner.plan("high")
    c = plan.check
    assert c is not None and plan.arrivals == "poisson"
    assert c.rate == plan.expected_rate <= c.searched_rate
    assert c.long_attainment >= LONG_SLO.attainment and c.long_requests >= len(trace)
    assert len(c.replicates) == 3 and all(0 <= a <= 1 for a in c.replicates)
    assert "precision 0.01" in plan.search.notes and plan.search.requests_simulated > 0
    plan.save(tmp_path / "p.json")
    assert Plan.load(tmp_path / "p.json") == plan
    assert "confidence" in c.summary(0.9)


def test_window_is_set_in_time_with_a_floor_per_instance():
    w = Workload.from_trace(synthetic(1000, 10.0, (10, 20), (90, 100), seed=1))
    slo = SloConfig(0.5, 0.1)
    win = SteadyWindows(w, slo, WindowConfig(warmup=1, measure=3, cooldown=1,
                                             min_per_instance=20))
    assert win.scale_s == pytest.approx(0.5 + 100 * 0.1)  # p99 output x TPOT + TTFT
    warm, meas, cool = win.counts(10.0, 1)
    assert (warm, meas, cool) == (105, 315, 105)
    assert win.counts(20.0, 1) == (210, 630, 210)  # twice the rate, twice the requests
    assert win.counts(0.1, 50)[1] == 20 * 50  # the floor
    # Longer than the workload: replayed cyclically, re-timed to the rate.
    big = win.at(100.0, 1)
    assert len(big.workload) == sum(win.counts(100.0, 1)) > len(w)
    assert big.workload.rate == pytest.approx(100.0)
    assert big.lo == 1050 and big.measured == 3150


def test_cycle_wraps_with_the_mean_gap():
    w = Workload("w", (0.0, 1.0, 3.0), (1, 2, 3), (4, 5, 6))
    c = w.cycle(1, 5)
    assert c.prompt == (2, 3, 1, 2, 3)
    assert c.arrival == (0.0, 2.0, 3.5, 4.5, 6.5)  # wrap gap = mean gap 1.5
    with pytest.raises(ValueError):
        w.cycle(3, 1)


@pytest.mark.parametrize("spec", [DisaggPlanSpec(InstanceSpec(1, 1, 1), InstanceSpec(1, 1, 1)),
                                  ColocatedPlanSpec(InstanceSpec(1, 1, 2))])
def test_stop_rule_decides_as_the_full_run_does(spec):
    prof, slo = LONG_DECODE, SloConfig(0.05, 0.006, 0.9)
    w = Workload.from_trace(synthetic(3000, 400.0, (10, 50), (50, 100), seed=5))
    for rate in (50.0, 400.0):
        full = simulate(spec, prof, w.at_rate(rate), LONG_CFG)
        stop = StopRule.for_target(slo, 500, 2500)
        early = simulate(spec, prof, w.at_rate(rate), LONG_CFG, stop=stop)
        full_pass = full.attainment(slo, 500, 2500) >= slo.attainment
        assert (early.attainment(slo, 500, 2500) >= slo.attainment) == full_pass
        assert early.stopped_early == (not full_pass)
    assert early.stopped_early and early.num_events < full.num_events


def test_curve_grid_and_fill():
    assert curve_grid(1) == [1] and curve_grid(7) == [1, 2, 3, 4, 5, 6, 7]
    g = curve_grid(64)
    assert g[:6] == [1, 2, 3, 4, 5, 6] and g[-1] == 64 and len(g) < 25
    assert all(b / a <= 1.34 for a, b in zip(g[5:], g[6:], strict=False))
    filled = fill_curve({1: 1.0, 2: 3.0, 4: 7.0}, 8)
    assert [filled[n] for n in range(1, 9)] == [1.0, 3.0, 5.0, 7.0, 8.75, 10.5, 12.25, 14.0]


def test_arrival_models_keep_the_requests():
    t = synthetic(2000, 5.0, (10, 100), (5, 50), seed=6)
    for kind in ("poisson", "gamma"):
        a = with_arrivals(t, kind, cv=3.0, seed=1)
        assert [r.prompt_len for r in a.requests] == [r.prompt_len for r in t.requests]
        assert a.rate == pytest.approx(t.rate, rel=0.15 if kind == "gamma" else 0.07)
    assert with_arrivals(t, "trace") is t
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(
        with_arrivals(t, "gamma", 3.0).requests[:-1], with_arrivals(t, "gamma", 3.0).requests[1:],
        strict=True)]
    mean = sum(gaps) / len(gaps)
    cv = math.sqrt(sum((g - mean) ** 2 for g in gaps) / len(gaps)) / mean
    assert cv > 2.0
    with pytest.raises(ValueError):
        with_arrivals(t, "uniform")


@pytest.mark.parametrize("chunked,pp", [(False, 1), (True, 1), (True, 2), (False, 3)])
def test_zero_load_latencies_match_the_simulator(chunked, pp):
    prof = LatencyProfile("z", "test", (
        ParallelEntry(1, PrefillFit(10.0, 0.1, 1e-5), DecodeFit(5.0, 0.01, 1.0), 100_000),),
        kv_bytes_per_token=10)
    cfg = SimConfig(prefill_token_budget=256, chunked_prefill=chunked, request_overhead_s=0.003,
                    step_overhead_s=0.001)
    w = Workload("one", (0.0,), (700,), (9,))
    res = simulate(DisaggPlanSpec(InstanceSpec(1, pp, 1), InstanceSpec(1, 1, 1), 1e15),
                   prof, w, cfg)
    inst = prof.instance(1, pp)
    assert zero_load_ttft_s(PrefillCost.of(inst), 700, cfg) == pytest.approx(res.ttft[0])
    dc = DecodeCost.of(prof.instance(1, 1))
    assert zero_load_tpot_s(dc, 700, 9, cfg) == pytest.approx(res.tpot[0])


def _toy_profile() -> LatencyProfile:
    return LatencyProfile("toy", "test", (
        ParallelEntry(1, PrefillFit(60.0, 0.2), DecodeFit(5.0, 1e-3, 0.5), 50_000),
        ParallelEntry(2, PrefillFit(10.0, 0.05), DecodeFit(4.5, 9e-4, 0.45), 100_000),
    ), kv_bytes_per_token=1000)


def test_infeasible_ttft_says_what_binds_and_what_would_relax_it():
    trace = synthetic(200, 5.0, (50, 200), (5, 40), seed=2)
    p = Planner(ClusterDesc(1, 4, 80.0, 300e9, 25e9, "toy"), _toy_profile(), trace,
                SloConfig(0.015, 0.02), config=PlannerConfig(max_pp=1))
    with pytest.raises(PlanningError) as err:
        p.plan("auto")
    why = err.value.infeasibility
    assert why is not None and why.binding == ("TTFT",)
    assert why.ttft.tp == 2 and why.ttft.attainment < 0.9 and why.tpot.attainment == 1.0
    # The zero-load TTFT of tp2 is 10 + 0.05 * l ms: 90% of prompts need ~19.5 ms.
    assert 0.015 < why.ttft.needed_s < 0.0201
    msg = str(err.value)
    assert "even at zero load at most" in msg and "Binding: TTFT" in msg
    assert "a looser TTFT target" in msg and "a larger TP" in msg


def test_cli_prints_the_reason_of_an_infeasible_target(tmp_path, capsys):
    from pdserve.cluster.cli.main import main

    prof = tmp_path / "profile.json"
    _toy_profile().save(prof)
    rc = main(["plan", "--profile", str(prof), "--trace", "poisson:5:200:50-200:5-40",
               "--slo-ttft", "0.05", "--slo-tpot", "0.004", "--nodes", "1",
               "--gpus-per-node", "4", "--max-pp", "1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Binding: TPOT" in err and "a looser TPOT target" in err


def test_cli_plan_arrivals_flag(tmp_path, capsys):
    from pdserve.cluster.cli.sim_commands import register

    parser = argparse.ArgumentParser(prog="pdserve")
    register(parser.add_subparsers(dest="command", required=True))
    prof = tmp_path / "profile.json"
    _toy_profile().save(prof)
    args = parser.parse_args(["plan", "--profile", str(prof), "--trace",
                              "poisson:20:300:50-200:5-40", "--slo-ttft", "0.05",
                              "--slo-tpot", "0.02", "--gpus-per-node", "4", "--max-pp", "1",
                              "--arrivals", "gamma", "--arrival-cv", "3", "--replicates", "2",
                              "--out", str(tmp_path / "plan.json")])
    assert args.func(args) == 0
    plan = Plan.load(tmp_path / "plan.json")
    assert plan.arrivals == "gamma(cv=3)" and len(plan.check.replicates) == 2
    out = capsys.readouterr().out
    assert "(gamma(cv=3) arrivals)" in out and "confidence: attainment" in out
    assert "bisection precision 0.01" in out


def test_worker_processes_give_the_same_plan():
    trace = synthetic(300, 20.0, (50, 200), (5, 40), seed=2)
    plans = [Planner(ClusterDesc(1, 4, 80.0, 300e9, 25e9, "toy"), _toy_profile(), trace,
                     SloConfig(0.05, 0.02), config=PlannerConfig(max_pp=1, workers=w,
                                                                 replicates=1)).plan("high")
             for w in (1, 2)]
    assert plans[0].spec() == plans[1].spec()
    assert plans[0].expected_rate == plans[1].expected_rate
    assert plans[0].search.requests_simulated == plans[1].search.requests_simulated
