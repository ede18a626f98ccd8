"""Conditional disaggregation's rule (router/local_prefill.py) and the router's inputs to it
(router/prefill_placement.py): each reason at its boundaries, and bad configuration
refused at start."""

from __future__ import annotations

import math

import pytest

from pdserve.engine.latency_profile import distserve_opt13b_a100
from pdserve.router.config import RouterConfig
from pdserve.router.local_prefill import LOCAL, REASONS, REMOTE, LocalPrefillConfig, decide
from pdserve.router.policies import create_policy
from pdserve.router.policy import RoutingRequest, WorkerLoad
from pdserve.router.policy_kv import block_keys
from pdserve.router.prefill_placement import DECODE_FULL, OUTCOMES, PrefillPlacement


# -- the rule -------------------------------------------------------------------------------
def test_off_by_default_every_request_is_remote():
    config = LocalPrefillConfig()
    assert not config.enabled and not config.needs_profile
    d = decide(config, 1, 1, 10.0, 0.001)
    assert (d.where, d.reason, d.local) == (REMOTE, "off", False)


def test_short_includes_its_threshold_and_counts_uncached_tokens():
    config = LocalPrefillConfig(max_local_tokens=64)
    assert decide(config, 64, 64, None, None).reason == "short"
    assert decide(config, 65, 65, None, None) == decide(config, 65, 65, 1.0, 0.1)
    assert decide(config, 65, 65, None, None).where == REMOTE
    # 1000 tokens of which the prefill pool holds all but 64: short
    d = decide(config, 1000, 64, None, None)
    assert (d.where, d.reason) == (LOCAL, "short")


def test_queue_needs_a_wait_over_factor_times_the_local_prefill():
    config = LocalPrefillConfig(wait_factor=2.0, max_queue_local_tokens=512)
    assert config.enabled and config.needs_profile
    assert decide(config, 500, 500, 2.01, 1.0).reason == "queue"
    assert decide(config, 500, 500, 2.0, 1.0).where == REMOTE  # not strictly over
    assert decide(config, 512, 512, 3.0, 1.0).reason == "queue"
    assert decide(config, 513, 513, 3.0, 1.0).reason == "remote"  # too long to stall decode
    assert decide(config, 500, 500, None, 1.0).reason == "remote"  # no prediction: no queue
    assert decide(config, 500, 500, 3.0, None).reason == "remote"
    # both tests on: short wins first
    both = LocalPrefillConfig(max_local_tokens=8, wait_factor=1.0)
    assert decide(both, 8, 8, 100.0, 1.0).reason == "short"
    assert decide(both, 9, 9, 100.0, 1.0).reason == "queue"


@pytest.mark.parametrize(
    "fields, fragment",
    [
        ({"max_local_tokens": -1}, "max_local_tokens"),
        ({"wait_factor": 0.5}, "wait_factor"),
        ({"wait_factor": math.inf}, "wait_factor"),
        ({"wait_factor": math.nan}, "wait_factor"),
        ({"max_queue_local_tokens": 0}, "max_queue_local_tokens"),
    ],
)
def test_out_of_range_settings_are_refused(fields, fragment):
    with pytest.raises(ValueError, match=fragment):
        LocalPrefillConfig(**fields)


def test_every_outcome_the_metric_shows_is_a_rule_reason_or_the_fallback():
    assert {r for _, r in OUTCOMES} == {*REASONS, DECODE_FULL}
    assert {d for d, _ in OUTCOMES} == {LOCAL, REMOTE}


# -- the router's inputs ----------------------------------------------------------------------
def _req(rid: str, n: int, base: int = 100) -> RoutingRequest:
    prompt = tuple(base + i for i in range(n))
    return RoutingRequest(rid, n, 8, prompt_token_ids=prompt)


def _prefills(n: int = 2, block_size: int = 16) -> list[WorkerLoad]:
    return [WorkerLoad(f"p{i}", block_size=block_size) for i in range(n)]


def test_without_kv_aware_routing_the_whole_prompt_is_uncached():
    place = PrefillPlacement(LocalPrefillConfig(max_local_tokens=32), create_policy("least_loaded"))
    assert place.decide(_req("a", 32), _prefills()).reason == "short"
    assert place.decide(_req("b", 33), _prefills()).reason == "remote"
    assert PrefillPlacement().decide(_req("c", 1), _prefills()).reason == "off"


def test_with_kv_aware_routing_the_best_prefix_hit_is_subtracted():
    policy = create_policy("least_loaded", kv_aware=True)
    place = PrefillPlacement(LocalPrefillConfig(max_local_tokens=40), policy)
    loads = _prefills()
    req = _req("a", 200)
    assert place.decide(req, loads).reason == "remote"
    policy.index.record("p1", block_keys(req.prompt_token_ids, 16)[:10])  # 160 tokens there
    assert place.decide(_req("b", 200), loads).reason == "short"  # 40 left to compute
    loads[1].healthy = False  # a dead worker's cache does not count
    assert place.decide(_req("c", 200), loads).reason == "remote"


@pytest.mark.parametrize("policy_name", ["slo_aware", "least_loaded"])
def test_queue_uses_the_profiles_predictions(policy_name):
    profile = distserve_opt13b_a100()
    policy = create_policy(policy_name, profile, 2048)
    place = PrefillPlacement(LocalPrefillConfig(wait_factor=2.0), policy, profile)
    idle = _prefills()
    assert place.decide(_req("a", 100), idle).reason == "remote"  # ~28 ms either way
    busy = _prefills()
    for w in busy:  # ten full batches ahead on each: seconds of wait
        w.prefill_queue = {f"q{i}": 2048 for i in range(10)}
    assert place.decide(_req("b", 100), busy).reason == "queue"
    assert place.decide(_req("c", 4096), busy).reason == "remote"  # over max_queue_local_tokens
    busy[0].prefill_queue = {}  # one worker is free: the best prediction is short
    assert place.decide(_req("d", 100), busy).reason == "remote"


def test_the_local_prediction_uses_the_decode_pools_tp():
    profile = distserve_opt13b_a100()  # entries for tp 1, 2 and 4
    config = LocalPrefillConfig(wait_factor=3.0)
    tp1 = PrefillPlacement(config, create_policy("least_loaded"), profile, decode_tp=1)
    tp4 = PrefillPlacement(config, create_policy("least_loaded"), profile, decode_tp=4)
    loads = _prefills(1)
    loads[0].prefill_queue = {"q": 1800}
    # prefill pool (tp 1): two batches, ~450 ms; local at tp 1 ~225 ms, at tp 4 ~82 ms
    assert tp1.decide(_req("a", 1800), loads).reason == "remote"
    assert tp4.decide(_req("b", 1800), loads).reason == "queue"
    with pytest.raises(ValueError, match="tp=3"):
        PrefillPlacement(config, create_policy("least_loaded"), profile, decode_tp=3)


def test_a_wait_factor_without_a_profile_is_refused_at_start(tmp_path):
    with pytest.raises(ValueError, match="--local-prefill-wait-factor.*--profile"):
        RouterConfig(model="m", local_prefill=LocalPrefillConfig(wait_factor=2.0))
    with pytest.raises(ValueError, match="latency profile"):
        PrefillPlacement(LocalPrefillConfig(wait_factor=2.0), create_policy("least_loaded"))
    with pytest.raises(ValueError, match="decode_tp"):
        RouterConfig(model="m", decode_tp=0)
    # a short-prompt threshold alone needs no profile
    RouterConfig(model="m", local_prefill=LocalPrefillConfig(max_local_tokens=16))


def test_the_metric_counts_what_the_hook_reports():
    from pdserve.router.metrics import RouterMetrics
    from pdserve.router.slo import SloConfig

    metrics = RouterMetrics("demo", SloConfig())
    place = PrefillPlacement(LocalPrefillConfig(max_local_tokens=8))
    place.on_decision = lambda where, reason: metrics.prefill_decisions.labels(
        "demo", where, reason
    ).inc()
    place.count(LOCAL, "short")
    place.count(REMOTE, DECODE_FULL)

    def value(decision, reason):
        return metrics.registry.get_sample_value(
            "pdserve_router_prefill_decisions_total",
            {"model": "demo", "decision": decision, "reason": reason},
        )

    assert value(LOCAL, "short") == 1 and value(REMOTE, DECODE_FULL) == 1
    assert value(LOCAL, "queue") == 0  # every outcome exists from the start


# -- start-up: the serve flags and the launchers ------------------------------------------------
def test_serve_flags_are_checked_against_the_flag_that_gave_them(capsys, demo_model_dir):
    from pdserve.cluster.cli.main import build_parser, main

    args = build_parser().parse_args(["serve"])
    assert (args.local_prefill_tokens, args.local_prefill_wait_factor) == (0, None)
    args = build_parser().parse_args(
        ["serve", "--local-prefill-tokens", "256", "--local-prefill-wait-factor", "1.5"]
    )
    assert (args.local_prefill_tokens, args.local_prefill_wait_factor) == (256, 1.5)
    for flag, value in (
        ("--local-prefill-tokens", "-1"),
        ("--local-prefill-wait-factor", "0.9"),
        ("--local-prefill-wait-factor", "inf"),
    ):
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args(["serve", flag, value])
        assert exit_.value.code == 2
        assert f"argument {flag}: local prefill" in capsys.readouterr().err
    # a wait factor without a profile: refused before anything starts
    assert main(["serve", "--model", str(demo_model_dir), "--local-prefill-wait-factor", "2"]) == 2
    assert "--local-prefill-wait-factor" in capsys.readouterr().err


def test_launchers_give_the_router_the_decode_tp_and_check_its_profile(tmp_path):
    from pdserve.cluster.launch.launcher import ClusterSpec, PoolSpec
    from pdserve.engine.config import EngineConfig
    from pdserve.router.build import check_profile

    path = tmp_path / "opt13b.json"
    distserve_opt13b_a100().save(path)
    router = RouterConfig(
        model="m", profile=str(path), local_prefill=LocalPrefillConfig(wait_factor=2.0)
    )
    spec = ClusterSpec(engine=EngineConfig(model="m"), decode=PoolSpec(1, tp=2), router=router)
    assert spec.router_config().decode_tp == 2
    check_profile(spec.router_config())  # the profile has tp 2
    bad = ClusterSpec(engine=EngineConfig(model="m"), decode=PoolSpec(1, tp=8), router=router)
    with pytest.raises(ValueError, match="no entry for tp=8"):
        check_profile(bad.router_config())
