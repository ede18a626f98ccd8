"""``pdserve simulate --dispatch / --prefix-caching``: parsing, the SimConfig they build,
and a run on a Mooncake trace that reports the prefix-cache hit rate."""

from __future__ import annotations

import json

import pytest

from pdserve.cluster.cli import sim_commands
from pdserve.cluster.cli.main import build_parser, main
from pdserve.cluster.planning.simulator.config import DISPATCH_POLICIES


def parse(*extra: str):
    return build_parser().parse_args(["simulate", "--trace", "poisson:2:10:10-20:2-4", *extra])


def test_choices_are_the_simulators_policies():
    assert sim_commands.DISPATCH_CHOICES == DISPATCH_POLICIES


def test_default_is_least_loaded_without_caching():
    cfg = sim_commands._sim_config(parse())
    assert (cfg.dispatch, cfg.prefix_caching) == ("least_loaded", False)


def test_kv_aware_implies_prefix_caching_and_caching_composes_with_any_policy():
    cfg = sim_commands._sim_config(parse("--dispatch", "kv_aware"))
    assert (cfg.dispatch, cfg.prefix_caching) == ("kv_aware", True)
    cfg = sim_commands._sim_config(parse("--dispatch", "slo_aware", "--prefix-caching"))
    assert (cfg.dispatch, cfg.prefix_caching) == ("slo_aware", True)


def test_unknown_policy_is_a_usage_error():
    with pytest.raises(SystemExit) as exc:
        parse("--dispatch", "nearest")
    assert exc.value.code == 2


def test_plan_keeps_the_default_config():
    args = build_parser().parse_args(["plan", "--trace", "poisson:2:10:10-20:2-4"])
    cfg = sim_commands._sim_config(args)
    assert (cfg.dispatch, cfg.prefix_caching) == ("least_loaded", False)


def test_simulate_reports_the_hit_rate_on_a_mooncake_trace(tmp_path, capsys):
    path = tmp_path / "mc.jsonl"
    # Every request repeats the same two 512-token blocks, plus 10 tokens of its own.
    path.write_text("\n".join(json.dumps(
        {"timestamp": 1000 * i, "input_length": 1034, "output_length": 4,
         "hash_ids": [0, 1, 2 + i]}) for i in range(5)) + "\n")
    out = tmp_path / "r.json"
    assert main(["simulate", "--trace", str(path), "--dispatch", "kv_aware", "--num-prefill",
                 "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["dispatch"] == "kv_aware" and res["prefix_caching"] is True
    # The first request computes everything; the four repeats skip 1024 tokens each.
    assert res["simulation"]["prefix_hit_rate"] == pytest.approx(4 * 1024 / (5 * 1034))
    assert "prefix cache hit rate" in capsys.readouterr().out
    main(["simulate", "--trace", str(path), "--out", str(out)])
    assert "prefix_hit_rate" not in json.loads(out.read_text())["simulation"]


def test_colocated_plans_refuse_prefix_caching(tmp_path):
    assert main(["simulate", "--trace", "poisson:2:10:10-20:2-4", "--colocated",
                 "--prefix-caching"]) == 2
