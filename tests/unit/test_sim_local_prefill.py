"""Conditional disaggregation in the simulator: the router's local-prefill rule, modelled.

A local request prefills as a step of its own on its decode lane (the lane's running
requests wait for it) and moves no KV. Expected times come from the profile formulas
below, not from the simulator's cost helpers.
"""

from __future__ import annotations

import pytest

from pdserve.cluster.planning.simulator import (
    ColocatedPlanSpec,
    DisaggPlanSpec,
    InstanceSpec,
    SimConfig,
    simulate,
)
from pdserve.engine.latency_profile import DecodeFit, LatencyProfile, ParallelEntry, PrefillFit
from pdserve.router.local_prefill import LocalPrefillConfig
from pdserve.workloads.synthetic import synthetic
from pdserve.workloads.trace import Trace, TraceRequest

# Prefill ms = 10 + 0.1*sum(l) + 1e-5*sum(l^2); decode ms = 5 + 0.01*sum(ctx+1) + 1*B.
PA, PB, PC = 10.0, 0.1, 1e-5
PROFILE = LatencyProfile(
    "tiny",
    "test",
    (ParallelEntry(1, PrefillFit(PA, PB, PC), DecodeFit(5.0, 0.01, 1.0), 100_000),),
    kv_bytes_per_token=1000,
)
PLAN = DisaggPlanSpec(InstanceSpec(), InstanceSpec(), 1e15)


def prefill_s(n: int) -> float:
    return (PA + PB * n + PC * n * n) / 1e3


def trace(*reqs: tuple[float, int, int]) -> Trace:
    return Trace("t", tuple(TraceRequest(*r) for r in reqs))


def mixed(n: int = 300) -> Trace:
    return synthetic(n, 40.0, (16, 1500), (1, 60), seed=3)


def test_rule_off_and_rule_that_never_fires_give_the_same_run():
    t = mixed()
    off = simulate(PLAN, PROFILE, t, SimConfig(dispatch="slo_aware"))
    # Enabled, but every prompt is longer than the threshold and no wait factor is set.
    never = simulate(
        PLAN,
        PROFILE,
        t,
        SimConfig(dispatch="slo_aware", local_prefill=LocalPrefillConfig(max_local_tokens=15)),
    )
    assert never.first_token == off.first_token
    assert never.last_token == off.last_token
    assert off.prefill_decisions == ()
    assert never.prefill_decisions == (("remote", len(t)),)
    assert never.num_local_prefills == 0
    assert (
        never.num_kv_transfers
        == off.num_kv_transfers
        == sum(1 for r in t.requests if r.output_len > 1)
    )


def test_threshold_above_every_prompt_keeps_every_request_local():
    t = mixed()
    res = simulate(
        PLAN, PROFILE, t, SimConfig(local_prefill=LocalPrefillConfig(max_local_tokens=1500))
    )
    assert res.prefill_decisions == (("short", len(t)),)
    assert res.num_local_prefills == len(t)
    assert res.num_kv_transfers == 0
    assert all(f == f for f in res.first_token)  # every request got its first token
    assert all(last >= first for first, last in zip(res.first_token, res.last_token, strict=True))


def test_idle_local_prefill_is_one_step_on_the_decode_lane():
    res = simulate(
        PLAN,
        PROFILE,
        trace((0.0, 400, 1)),
        SimConfig(local_prefill=LocalPrefillConfig(max_local_tokens=512)),
    )
    assert res.ttft[0] == pytest.approx(prefill_s(400))
    assert res.last_token[0] == res.first_token[0]  # one token: done at the prefill step


def test_long_local_prefill_stalls_the_requests_decoding_beside_it():
    # A decodes 50 tokens; B (a long prompt, 2 tokens) arrives while A runs. With a
    # threshold of 200 only A is local; with 4000 B is too, and its prefill runs as a step
    # on A's lane: A gains no token for its whole duration.
    t = trace((0.0, 100, 50), (0.05, 3000, 2))
    runs = {
        thr: simulate(
            PLAN, PROFILE, t, SimConfig(local_prefill=LocalPrefillConfig(max_local_tokens=thr))
        )
        for thr in (200, 4000)
    }
    apart, beside = runs[200], runs[4000]
    assert apart.num_local_prefills == 1 and beside.num_local_prefills == 2
    assert beside.tpot[0] > apart.tpot[0]
    # Remote, B's KV lands after A has finished. Local, A's last token comes later by
    # B's prefill step and by B's one decode step beside A (B's context of 3001 + 1 in
    # the b term, one more request in the c term).
    delay = beside.last_token[0] - apart.last_token[0]
    assert apart.first_token[1] > apart.last_token[0]
    assert delay == pytest.approx(prefill_s(3000) + (0.01 * 3002 + 1.0) / 1e3)
    assert beside.num_kv_transfers == 0 and apart.num_kv_transfers == 1


def test_wait_factor_prefills_locally_when_the_prefill_pool_is_backed_up():
    # Ten 2000-token prompts at once: the prefill instance runs one per batch (budget), so
    # the later ones' predicted TTFT exceeds the local prefill time and they stay local.
    t = trace(*((0.0, 2000, 10) for _ in range(10)))
    cfg = SimConfig(
        dispatch="slo_aware",
        prefill_token_budget=2048,
        local_prefill=LocalPrefillConfig(wait_factor=1.5),
    )
    res = simulate(DisaggPlanSpec(InstanceSpec(), InstanceSpec(1, 1, 2), 1e15), PROFILE, t, cfg)
    decisions = dict(res.prefill_decisions)
    assert decisions["remote"] >= 1 and decisions["queue"] >= 1
    assert res.num_local_prefills == decisions["queue"]
    assert res.num_kv_transfers == decisions["remote"]


def test_phase_isolated_runs_never_prefill_locally():
    cfg = SimConfig(local_prefill=LocalPrefillConfig(max_local_tokens=1500))
    for phase in ("prefill", "decode"):
        res = simulate(PLAN, PROFILE, mixed(50), cfg, phase)
        assert res.prefill_decisions == () and res.num_local_prefills == 0


def test_colocated_plan_refuses_the_rule():
    with pytest.raises(ValueError, match="disaggregated plan"):
        simulate(
            ColocatedPlanSpec(InstanceSpec()),
            PROFILE,
            mixed(5),
            SimConfig(local_prefill=LocalPrefillConfig(max_local_tokens=64)),
        )
