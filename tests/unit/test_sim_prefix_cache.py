"""Simulator prefix caching and KV-aware dispatch, on hand-built traces with known answers.

Block size 4 tokens keeps the numbers small; timings are computed from the profile formula
here, not from the simulator's cost helpers.
"""

from __future__ import annotations

import pytest

from pdserve.cluster.planning.simulator import (
    DisaggPlanSpec,
    InstanceSpec,
    SimConfig,
    Workload,
    simulate,
)
from pdserve.engine.latency_profile import DecodeFit, LatencyProfile, ParallelEntry, PrefillFit
from pdserve.workloads.synthetic import synthetic
from pdserve.workloads.trace import Trace, TraceRequest

PA, PB, PC = 10.0, 0.1, 1e-5
BS = 4


def profile(cap: int = 100_000) -> LatencyProfile:
    return LatencyProfile("tiny", "test", (ParallelEntry(1, PrefillFit(PA, PB, PC),
                                                         DecodeFit(5.0, 0.01, 1.0), cap),),
                          kv_bytes_per_token=1000)


def prefill_s(done: int, end: int) -> float:
    """A prompt computed from token ``done`` to ``end`` (it attends to the cached part)."""
    return (PA + PB * (end - done) + PC * (end * end - done * done)) / 1e3


def req(t: float, prompt: int, ids: tuple[int, ...], out: int = 1) -> TraceRequest:
    return TraceRequest(t, prompt, out, prefix_hashes=ids, prefix_block_size=BS)


def plan(n_pre: int = 1) -> DisaggPlanSpec:
    return DisaggPlanSpec(InstanceSpec(1, 1, n_pre), InstanceSpec(), 1e15)


def run(reqs, n_pre: int = 1, cap: int = 100_000, **cfg):
    cfg.setdefault("prefix_caching", True)
    return simulate(plan(n_pre), profile(cap), Trace("t", tuple(reqs)), SimConfig(**cfg))


def test_repeated_prefix_on_one_instance_skips_its_cached_blocks():
    # 3 full blocks shared; the second prompt adds 2 tokens of its own.
    res = run([req(0.0, 12, (1, 2, 3)), req(1.0, 14, (1, 2, 3, 9))])
    assert res.cached_tokens == (0, 12)
    assert res.ttft[0] == pytest.approx(prefill_s(0, 12))
    assert res.ttft[1] == pytest.approx(prefill_s(12, 14))
    assert res.prefix_hit_rate == pytest.approx(12 / 26)
    assert res.summary()["prefix_hit_rate"] == pytest.approx(12 / 26)
    assert res.records[1].cached_tokens == 12


def test_only_leading_blocks_count_and_the_last_token_is_computed():
    res = run([req(0.0, 12, (1, 2, 3)), req(1.0, 12, (7, 2, 3)),  # differs at block 0
               req(2.0, 12, (1, 2, 3))])  # the whole prompt is cached: 11 tokens skipped
    assert res.cached_tokens == (0, 0, 11)
    assert res.ttft[2] == pytest.approx(prefill_s(11, 12))


def test_requests_in_one_batch_do_not_share_blocks_they_are_computing():
    res = run([req(0.0, 8, (1, 2)), req(0.0, 8, (1, 2)), req(1.0, 8, (1, 2))])
    assert res.cached_tokens == (0, 0, 7)


def test_lru_evicts_the_oldest_blocks_at_capacity():
    # Capacity 8 tokens = 2 blocks: prompt B evicts A; C (= A again) misses, and evicts B.
    a, b = (1, 2), (3, 4)
    res = run([req(0.0, 8, a), req(1.0, 8, b), req(2.0, 8, a), req(3.0, 8, b)], cap=8)
    assert res.cached_tokens == (0, 0, 0, 0)
    # With room for both they hit.
    res = run([req(0.0, 8, a), req(1.0, 8, b), req(2.0, 8, a), req(3.0, 8, b)], cap=16)
    assert res.cached_tokens == (0, 0, 7, 7)


def test_recently_used_blocks_survive_eviction():
    a, b, c = (1, 2), (3, 4), (5, 6)
    # Cap 4 blocks: A, B, A again (A most recent), then C evicts B, not A.
    res = run([req(0.0, 8, a), req(1.0, 8, b), req(2.0, 8, a), req(3.0, 8, c),
               req(4.0, 8, a), req(5.0, 8, b)], cap=16)
    assert res.cached_tokens == (0, 0, 7, 0, 7, 0)


def test_kv_aware_sends_a_repeat_to_the_instance_holding_its_prefix():
    shared = (1, 2, 3, 4)
    reqs = [req(0.0, 16, (9, 10, 11, 12)), req(0.0, 16, shared),  # instances 0 and 1
            req(1.0, 16, shared), req(2.0, 16, shared)]
    kv = run(reqs, n_pre=2, dispatch="kv_aware")
    assert kv.cached_tokens == (0, 0, 15, 15)
    # least_loaded sends the first repeat to idle instance 0 (a miss), which then holds it.
    ll = run(reqs, n_pre=2, dispatch="least_loaded")
    assert ll.cached_tokens == (0, 0, 0, 15)


def burst_then_repeat(prompt_len: int):
    """80 tokens cached on instance 0, then five unique prompts (kv_aware alternates them
    0, 1, 0, 1, 0: instance 0 ends one prompt longer) and a repeat of the cached prompt."""
    shared = tuple(range(1, 21))
    busy = [TraceRequest(1.0, prompt_len, 1) for _ in range(5)]
    reqs = [req(0.0, 80, shared), *busy, req(1.0005, 84, (*shared, 999))]
    return run(reqs, n_pre=2, dispatch="kv_aware", prefill_token_budget=4096)


def test_kv_aware_leaves_the_cache_only_when_its_queue_is_much_longer():
    # One extra 4000-token prompt ahead (~0.57 s) outweighs 80 cached tokens (~8 ms).
    assert burst_then_repeat(4000).cached_tokens[-1] == 0
    # One extra 20-token prompt (~2 ms, batched with it) does not: the repeat goes home.
    assert burst_then_repeat(20).cached_tokens[-1] == 80


def test_trace_without_hashes_runs_exactly_as_without_caching():
    tr = synthetic(300, 40.0, (50, 800), (5, 40), seed=2)
    two = plan(2)
    for dispatch in ("least_loaded", "slo_aware", "round_robin"):
        off = simulate(two, profile(), tr, SimConfig(dispatch=dispatch))
        on = simulate(two, profile(), tr, SimConfig(dispatch=dispatch, prefix_caching=True))
        assert on.ttft == off.ttft and on.tpot == off.tpot
        assert on.prefix_hit_rate == 0.0 and off.prefix_hit_rate is None
    # kv_aware without any hashes is slo_aware, decision for decision.
    slo = simulate(two, profile(), tr, SimConfig(dispatch="slo_aware"))
    kv = simulate(two, profile(), tr, SimConfig(dispatch="kv_aware", prefix_caching=True))
    assert kv.ttft == slo.ttft and kv.tpot == slo.tpot


def test_hashes_change_nothing_without_prefix_caching():
    reqs = [req(0.0, 12, (1, 2, 3)), req(0.01, 12, (1, 2, 3))]
    plain = [TraceRequest(r.arrival_s, r.prompt_len, r.output_len) for r in reqs]
    a = simulate(plan(), profile(), Trace("a", tuple(reqs)), SimConfig())
    b = simulate(plan(), profile(), Trace("b", tuple(plain)), SimConfig())
    assert a.ttft == b.ttft and a.cached_tokens == ()


def test_chunked_prefill_starts_after_the_cached_blocks():
    res = run([req(0.0, 12, (1, 2, 3)), req(1.0, 20, (1, 2, 3, 4, 5))], chunked_prefill=True,
              prefill_token_budget=4)
    assert res.cached_tokens == (0, 12)
    # 8 tokens left in chunks of 4: two steps, [12, 16) then [16, 20).
    assert res.ttft[1] == pytest.approx(prefill_s(12, 16) + prefill_s(16, 20))


def test_workload_keeps_full_block_keys_through_rescaling_and_cycling():
    tr = Trace("t", (req(0.0, 10, (1, 2, 3)), req(1.0, 8, (1, 2))))
    w = Workload.from_trace(tr)
    assert w.prefix == ((1, 2), (1, 2)) and w.block_size == BS  # partial block dropped
    assert w.at_rate(4.0).prefix == w.prefix
    assert w.cycle(1, 3).prefix == ((1, 2), (1, 2), (1, 2))
    assert Workload.from_trace(Trace("p", (TraceRequest(0.0, 5, 1),))).prefix == ()
    with pytest.raises(ValueError, match="block sizes"):
        Workload.from_trace(Trace("m", (req(0.0, 8, (1, 2)), TraceRequest(
            1.0, 8, 1, prefix_hashes=(1,), prefix_block_size=8))))


def test_config_validates_kv_aware():
    with pytest.raises(ValueError, match="prefix_caching"):
        SimConfig(dispatch="kv_aware")
    SimConfig(dispatch="kv_aware", prefix_caching=True, admission_ttft_s=0.3)
    with pytest.raises(ValueError, match="dispatch"):
        SimConfig(dispatch="nearest")
