"""The placement planner, the exhaustive reference search, cluster descriptions and plans."""

from __future__ import annotations

import pytest

from pdserve.cluster.planning.cluster_desc import ClusterDesc, a100_cluster
from pdserve.cluster.planning.plan import Plan, low_affinity_groups
from pdserve.cluster.planning.planner import Planner, PlannerConfig, PlanningError
from pdserve.cluster.planning.simulator import DisaggPlanSpec, InstanceSpec, goodput
from pdserve.engine.latency_profile import DecodeFit, LatencyProfile, ParallelEntry, PrefillFit
from pdserve.router.slo import SloConfig
from pdserve.workloads.synthetic import synthetic


def obvious_profile() -> LatencyProfile:
    """tp1 prefill can never meet a 50 ms TTFT (60 ms fixed cost); tp2 prefill is fast.
    tp2 decode is barely faster than tp1 at twice the GPUs, so tp1 wins per GPU."""
    return LatencyProfile("toy", "test", (
        ParallelEntry(1, PrefillFit(60.0, 0.2), DecodeFit(5.0, 1e-3, 0.5), 50_000),
        ParallelEntry(2, PrefillFit(10.0, 0.05), DecodeFit(4.5, 9e-4, 0.45), 100_000),
    ), kv_bytes_per_token=1000)


SLO = SloConfig(ttft_s=0.05, tpot_s=0.02, attainment=0.9)
CLUSTER = ClusterDesc(1, 4, 80.0, 300e9, 25e9, "toy")


@pytest.fixture(scope="module")
def planner() -> Planner:
    trace = synthetic(300, rate=20.0, prompt_lens=(50, 200), output_lens=(5, 40), seed=2)
    return Planner(CLUSTER, obvious_profile(), trace, SLO,
                   config=PlannerConfig(max_requests=300, max_pp=2))


@pytest.fixture(scope="module")
def exhaustive(planner):
    return planner.exhaustive(include_colocated=True)


def test_planner_finds_the_obvious_configuration(planner):
    plan = planner.plan("high")
    assert plan.mode == "disaggregated" and plan.affinity == "high"
    assert (plan.prefill.tp, plan.prefill.pp) == (2, 1)
    assert plan.decode.tp == 1
    assert plan.num_gpus <= CLUSTER.num_gpus
    assert plan.expected_per_gpu_goodput == pytest.approx(plan.expected_rate / plan.num_gpus)


def test_planner_within_5_percent_of_exhaustive(planner, exhaustive):
    best_disagg = max(e.per_gpu_goodput for e in exhaustive
                      if e.candidate.mode == "disaggregated")
    plan = planner.plan("auto")
    assert best_disagg > 0
    assert plan.expected_per_gpu_goodput >= 0.95 * best_disagg
    # The plan's number is what simulating the plan itself gives.
    g = goodput(plan.spec(), planner.profile, planner.trace, SLO, tol=0.01)
    assert g.per_gpu_rate == pytest.approx(plan.expected_per_gpu_goodput, rel=0.05)


def test_exhaustive_covers_the_space_and_rules_out_slow_prefill(planner, exhaustive):
    cands = {e.candidate for e in exhaustive}
    assert len(cands) == len(exhaustive) == len(planner.candidates(True))
    for e in exhaustive:
        assert e.candidate.num_gpus <= CLUSTER.num_gpus
        if e.candidate.mode == "disaggregated" and e.candidate.prefill.tp == 1:
            assert e.per_gpu_goodput == 0.0
    pers = [e.per_gpu_goodput for e in exhaustive]
    assert pers == sorted(pers, reverse=True)


def test_low_affinity_plan_pairs_segments_on_a_node(planner):
    plan = planner.plan("low")
    assert plan.affinity == "low"
    groups = plan.placement_groups()
    assert groups and all(g.strategy == "STRICT_PACK" for g in groups)
    for g in groups:
        assert {r[0] for r in g.roles} == {"prefill", "decode"}
        assert sum(dict(b)["GPU"] for b in g.bundles) <= CLUSTER.gpus_per_node
    assert sum(dict(b)["GPU"] for g in groups for b in g.bundles) == plan.num_gpus


def test_high_affinity_placement_is_one_pack_group_per_instance(planner):
    plan = planner.plan("high")
    groups = plan.placement_groups(cpus_per_bundle=2)
    assert all(g.strategy == "PACK" and len({r[:2] for r in g.roles}) == 1 for g in groups)
    assert len(groups) == plan.prefill.count + plan.decode.count
    assert groups[0].bundle_dicts()[0] == {"CPU": 2.0, "GPU": float(plan.prefill.tp)}


def test_plan_json_round_trip(planner, tmp_path):
    for affinity in ("high", "low"):
        plan = planner.plan(affinity)
        path = tmp_path / f"{affinity}.json"
        plan.save(path)
        assert Plan.load(path) == plan
    with pytest.raises(ValueError):
        Plan.from_dict({"format": "something-else"})


def test_low_affinity_groups_span_pp_cross_nodes():
    groups = low_affinity_groups(2, 1, 1, 1, 2, 1, pp_cross=2, units=2, gpus_per_node=8)
    # Unit segments use 2 + 2 GPUs, so two units share each pair of nodes.
    assert [g.node for g in groups] == [0, 1, 0, 1]
    assert groups[1].segments[0].first_stage == 1 and groups[1].segments[1].first_stage == 2
    assert all(g.colocate for g in groups)


def test_plan_validation():
    spec = InstanceSpec(1, 1, 2)
    with pytest.raises(ValueError):
        Plan("m", "p", "disaggregated", "high", prefill=spec)  # no decode
    with pytest.raises(ValueError):
        Plan("m", "p", "colocated", "none", prefill=spec, decode=spec)
    with pytest.raises(ValueError):
        Plan("m", "p", "disaggregated", "low", spec, InstanceSpec(1, 1, 3), units=2)
    with pytest.raises(ValueError):
        Plan("m", "p", "colocated", "none", colocated=InstanceSpec(1, 1, 9),
             cluster=ClusterDesc(1, 8))
    plan = Plan("m", "p", "disaggregated", "low", spec, spec, units=2)
    assert plan.unit_spec() == DisaggPlanSpec(InstanceSpec(1, 1, 1), InstanceSpec(1, 1, 1))


def test_cluster_desc_validation_and_round_trip(tmp_path):
    c = a100_cluster(2, 8)
    assert c.num_gpus == 16
    c.save(tmp_path / "c.json")
    assert ClusterDesc.load(tmp_path / "c.json") == c
    with pytest.raises(ValueError):
        ClusterDesc(0, 8)
    with pytest.raises(ValueError):
        ClusterDesc(1, 8, inter_node_bandwidth=0.0)


def test_impossible_slo_raises_planning_error():
    trace = synthetic(100, rate=5.0, prompt_lens=(50, 200), output_lens=(5, 40), seed=2)
    p = Planner(CLUSTER, obvious_profile(), trace, SloConfig(0.001, 0.02),
                config=PlannerConfig(max_requests=100, max_pp=1))
    with pytest.raises(PlanningError):
        p.plan("auto")


def test_cli_plan_then_simulate(tmp_path, capsys):
    import argparse
    import json

    from pdserve.cluster.cli.sim_commands import register

    parser = argparse.ArgumentParser(prog="pdserve")
    register(parser.add_subparsers(dest="command", required=True))
    prof = tmp_path / "profile.json"
    obvious_profile().save(prof)
    common = ["--profile", str(prof), "--trace", "poisson:20:200:50-200:5-40",
              "--slo-ttft", "0.05", "--slo-tpot", "0.02"]
    args = parser.parse_args(["plan", *common, "--nodes", "1", "--gpus-per-node", "4",
                              "--max-pp", "1", "--out", str(tmp_path / "plan.json")])
    assert args.func(args) == 0
    plan = Plan.load(tmp_path / "plan.json")
    assert plan.prefill.tp == 2
    args = parser.parse_args(["simulate", *common, "--plan", str(tmp_path / "plan.json"),
                              "--goodput", "--out", str(tmp_path / "sim.json")])
    assert args.func(args) == 0
    out = json.loads((tmp_path / "sim.json").read_text())
    assert out["goodput"]["rate"] > 0 and out["simulation"]["attainment"] >= 0.9
    assert "TTFT p50/p90/p99" in capsys.readouterr().out
    args = parser.parse_args(["simulate", *common, "--colocated", "--tp", "2", "--rate", "5"])
    assert args.func(args) == 0
    bad = parser.parse_args(["simulate", "--trace", "poisson:1:x"])
    with pytest.raises(ValueError):
        bad.func(bad)
