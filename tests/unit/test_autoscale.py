"""The SLO autoscaler's core: configuration errors, capacity, and each rule of ``decide``."""

from __future__ import annotations

import pytest

from pdserve.cluster.autoscale import (
    AutoscaleConfig,
    Autoscaler,
    FixedCapacity,
    Observation,
    PoolBounds,
    ProfileCapacity,
    ScaleDecision,
)
from pdserve.engine.latency_profile import distserve_opt13b_a100
from pdserve.router.slo import SloConfig

PROFILE = distserve_opt13b_a100()
SLO = SloConfig(0.25, 0.1, 0.9)
# One instance holds 2 req/s of prefill and 1 req/s of decode; headroom 0.5 plans for 1
# and 0.5: a pool needs rate / 1 prefill and rate / 0.5 decode instances.
CAP = FixedCapacity(2.0, 1.0)


def config(**kw) -> AutoscaleConfig:
    base = dict(
        prefill=PoolBounds(1, 8, "prefill"),
        decode=PoolBounds(1, 8, "decode"),
        profile=PROFILE,
        slo=SLO,
        interval_s=10.0,
        upscale_cooldown_s=0.0,
        downscale_window_s=0.0,
        headroom=0.5,
    )
    base.update(kw)
    return AutoscaleConfig(**base)


def obs(
    now: float,
    rate: float,
    prefill: int,
    decode: int,
    ttft: float | None = 1.0,
    tpot: float | None = 1.0,
    queue: int = 0,
    load: float = 0.0,
) -> Observation:
    return Observation(now, rate, 1000.0, 200.0, ttft, tpot, queue, load, prefill, decode)


# -- configuration ------------------------------------------------------------------------
def test_bounds_out_of_order_name_the_pool():
    with pytest.raises(ValueError, match="prefill pool bounds out of order: min 3 > max 2"):
        PoolBounds(3, 2, "prefill")
    with pytest.raises(ValueError, match="max must be >= 1"):
        PoolBounds(0, 0, "decode")
    with pytest.raises(ValueError, match="min must be >= 0"):
        PoolBounds(-1, 2)
    assert PoolBounds(0, 3).clamp(5) == 3 and PoolBounds(2, 3).clamp(0) == 2


def test_autoscaler_without_a_profile_is_refused():
    with pytest.raises(ValueError, match=r"needs a latency profile \(--profile\)"):
        AutoscaleConfig(PoolBounds(1, 2), PoolBounds(1, 2))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(headroom=0.0), "headroom"),
        (dict(headroom=1.5), "headroom"),
        (dict(interval_s=0.0), "interval_s"),
        (dict(upscale_cooldown_s=-1.0), "upscale_cooldown"),
        (dict(downscale_window_s=float("inf")), "downscale_window"),
        (dict(startup_s=-5.0), "startup_s"),
        (dict(decode_tp=3), "decode_tp 3 is not in"),
    ],
)
def test_bad_knobs_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        config(**kw)


def test_observation_and_decision_validate():
    with pytest.raises(ValueError, match="ttft_attainment"):
        obs(0, 1.0, 1, 1, ttft=1.5)
    with pytest.raises(ValueError, match="arrival_rate"):
        obs(0, -1.0, 1, 1)
    with pytest.raises(ValueError, match="unknown reason"):
        ScaleDecision(1, 1, "because")


# -- capacity -----------------------------------------------------------------------------
def test_profile_capacity_is_cached_per_length_bucket_and_falls_with_length():
    cap = ProfileCapacity.from_config(config())
    short = cap.rates(300, 100)
    assert short.prefill > 0 and short.decode > 0
    assert cap.rates(310, 99) is short  # same 10% bucket: no new simulation
    assert cap.buckets_measured == 1
    long = cap.rates(1200, 400)
    assert long.prefill < short.prefill and long.decode < short.decode
    assert cap.buckets_measured == 2


def test_profile_capacity_is_zero_where_the_slo_cannot_be_met():
    # At tp1 a 3000-token prompt alone takes ~0.4 s to prefill: TTFT 0.25 s is out of reach.
    assert ProfileCapacity(PROFILE, SLO).rates(3000, 100).prefill == 0.0


# -- the rule -----------------------------------------------------------------------------
def test_targets_are_rate_over_capacity_times_headroom_within_bounds():
    a = Autoscaler(config(), CAP)
    assert a.targets(obs(0, 3.0, 1, 1)) == (3, 6)
    assert a.targets(obs(0, 3.2, 1, 1)) == (4, 7)
    assert a.targets(obs(0, 100.0, 1, 1)) == (8, 8)  # clamped to max
    assert a.targets(obs(0, 0.0, 4, 4)) == (1, 1)  # no load: the minimum


def test_scale_up_to_the_rate_target_at_once():
    d = Autoscaler(config(), CAP).decide(obs(0, 3.0, 1, 1))
    assert (d.prefill, d.decode, d.reason) == (3, 6, "rate_up")
    assert "prefill 1->3" in d.detail and "decode 1->6" in d.detail


def test_on_target_there_is_no_decision():
    assert Autoscaler(config(), CAP).decide(obs(0, 3.0, 3, 6)) is None


def test_attainment_miss_adds_an_instance_even_on_target():
    d = Autoscaler(config(), CAP).decide(obs(0, 3.0, 3, 6, ttft=0.5))
    assert (d.prefill, d.decode, d.reason) == (4, 6, "ttft_miss")
    d = Autoscaler(config(), CAP).decide(obs(0, 3.0, 3, 6, tpot=0.8))
    assert (d.prefill, d.decode, d.reason) == (3, 7, "tpot_miss")
    # Both: the decision carries both sizes and the most urgent reason.
    d = Autoscaler(config(), CAP).decide(obs(0, 3.0, 3, 6, ttft=0.5, tpot=0.5))
    assert (d.prefill, d.decode, d.reason) == (4, 7, "ttft_miss")


def test_no_requests_means_no_attainment_signal():
    assert Autoscaler(config(), CAP).decide(obs(0, 3.0, 3, 6, ttft=None, tpot=None)) is None


def test_leading_signals_prefill_queue_and_kv_load():
    # 3 instances x 2 req/s x 1000 tokens = 6000 tokens/s; 3000 queued = 0.5 s > 0.25 s.
    d = Autoscaler(config(), CAP).decide(obs(0, 3.0, 3, 6, queue=3000))
    assert (d.prefill, d.reason) == (4, "prefill_queue")
    assert Autoscaler(config(), CAP).decide(obs(0, 3.0, 3, 6, queue=1000)) is None
    d = Autoscaler(config(), CAP).decide(obs(0, 3.0, 3, 6, load=0.6))  # > headroom 0.5
    assert (d.decode, d.reason) == (7, "kv_load")


def test_growth_stops_at_max():
    a = Autoscaler(config(prefill=PoolBounds(1, 3, "prefill")), CAP)
    assert a.decide(obs(0, 3.0, 3, 6, ttft=0.1)) is None


def test_at_most_one_evaluation_per_interval():
    a = Autoscaler(config(interval_s=30.0), CAP)
    assert a.decide(obs(0, 3.0, 1, 1)) is not None
    assert a.decide(obs(29.9, 6.0, 3, 6)) is None  # rate-limited, whatever it sees
    assert a.decide(obs(30.0, 6.0, 3, 6)).reason == "rate_up"


def test_upscale_cooldown_holds_a_second_growth():
    a = Autoscaler(config(upscale_cooldown_s=60.0), CAP)
    assert a.decide(obs(0, 2.0, 1, 1)).prefill == 2
    assert a.decide(obs(30, 4.0, 2, 4)) is None  # prefill and decode both cooling down
    d = a.decide(obs(60, 4.0, 2, 4))
    assert (d.prefill, d.decode) == (4, 8)


def test_scale_down_waits_for_the_whole_window_then_takes_the_window_peak():
    a = Autoscaler(config(downscale_window_s=100.0), CAP)
    assert a.decide(obs(0, 1.0, 4, 8)) is None  # targets (1, 2) below: the window opens
    assert a.decide(obs(50, 2.0, 4, 8)) is None  # still below, peak now (2, 4)
    d = a.decide(obs(100, 1.0, 4, 8))
    assert (d.prefill, d.decode, d.reason) == (2, 4, "rate_down")


def test_a_rise_within_the_window_restarts_it():
    a = Autoscaler(config(downscale_window_s=100.0), CAP)
    assert a.decide(obs(0, 1.0, 4, 8)) is None
    assert a.decide(obs(50, 4.0, 4, 8)) is None  # back on target: window closed
    assert a.decide(obs(100, 1.0, 4, 8)) is None  # reopened at 100
    assert a.decide(obs(190, 1.0, 4, 8)) is None
    assert a.decide(obs(200, 1.0, 4, 8)).reason == "rate_down"


def test_decode_never_shrinks_below_its_kv_in_use():
    # Target 2 decode instances, but 8 instances at 25% KV hold 2 instances' worth: at
    # headroom 0.5 that needs 4.
    d = Autoscaler(config(), CAP).decide(obs(0, 1.0, 1, 8, load=0.25))
    assert (d.decode, d.reason) == (4, "rate_down")


def test_sizes_outside_the_bounds_are_brought_inside():
    d = Autoscaler(config(prefill=PoolBounds(2, 4, "prefill")), CAP).decide(obs(0, 2.0, 1, 4))
    assert (d.prefill, d.decode, d.reason) == (2, 4, "bounds")


def test_unreachable_slo_asks_for_the_maximum():
    a = Autoscaler(config(), FixedCapacity(0.0, 1.0))
    d = a.decide(obs(0, 1.0, 1, 2))
    assert (d.prefill, d.reason) == (8, "rate_up")
