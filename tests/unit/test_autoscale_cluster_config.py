"""The autoscaler on a cluster: its configuration is checked before anything starts
(``pdserve serve --autoscale``, ``ClusterSpec``), and the router's load report becomes an
``Observation`` (``cluster/autoscale/observe.py``)."""

from __future__ import annotations

import argparse
import re

import pytest

from pdserve.cluster.autoscale import AutoscaleConfig, PoolBounds
from pdserve.cluster.autoscale.observe import Observer
from pdserve.cluster.cli.main import main
from pdserve.cluster.launch.launcher import ClusterSpec, PoolSpec
from pdserve.engine.config import EngineConfig
from pdserve.engine.latency_profile import distserve_opt13b_a100


def _autoscale(pmin=1, pmax=2, dmin=1, dmax=2, **kw) -> AutoscaleConfig:
    return AutoscaleConfig(PoolBounds(pmin, pmax, "prefill"), PoolBounds(dmin, dmax, "decode"),
                           distserve_opt13b_a100(), **kw)


@pytest.mark.parametrize("spec_kw, message", [
    (dict(prefill=PoolSpec(3)), "prefill pool starts with 3 workers, outside the "
                                "autoscaler's bounds 1..2"),
    (dict(decode=PoolSpec(2, tp=2)), "sizes decode instances of tp 1, but the pool runs tp 2"),
    (dict(colocated=PoolSpec(2)), "not a colocated one"),
])
def test_cluster_spec_refuses_an_autoscaler_that_does_not_fit_its_pools(spec_kw, message):
    with pytest.raises(ValueError, match=message):
        ClusterSpec(engine=EngineConfig(model="m"), autoscale=_autoscale(), **spec_kw)


def test_cluster_spec_needs_a_worker_per_pool():
    with pytest.raises(ValueError, match="min must be >= 1 on a cluster"):
        ClusterSpec(engine=EngineConfig(model="m"), autoscale=_autoscale(pmin=0))


@pytest.mark.parametrize("flags, message", [
    (["--autoscale"], "the autoscaler needs a latency profile \\(--profile\\)"),
    (["--autoscale", "--decode-min", "3", "--decode-max", "2", "--profile", "{profile}"],
     "decode pool bounds out of order: min 3 > max 2"),
    (["--autoscale", "--autoscale-headroom", "0", "--profile", "{profile}"],
     "headroom must be in \\(0, 1\\]"),
    (["--autoscale", "--autoscale-interval", "-1", "--profile", "{profile}"], "interval_s"),
    (["--autoscale", "--colocated", "--profile", "{profile}"], "does not combine"),
])
def test_serve_refuses_bad_autoscaler_flags_before_starting(tmp_path, capsys, flags, message):
    profile = tmp_path / "profile.json"
    distserve_opt13b_a100().save(profile)
    argv = ["serve", *[f.format(profile=profile) for f in flags]]
    assert main(argv) != 0
    assert re.search(message, capsys.readouterr().err)


def test_observer_keeps_the_last_known_lengths_and_bounds_kv_usage():
    obs = Observer(default_means=(100.0, 10.0))
    report = {"arrival_rate": 2.0, "mean_prompt_tokens": None, "mean_output_tokens": None,
              "ttft_attainment": None, "tpot_attainment": None, "prefill_queue_tokens": 300,
              "decode_kv_usage": 1.3}
    o = obs.observe(report, 5.0, 1, 2)
    assert (o.mean_prompt_tokens, o.mean_output_tokens) == (100.0, 10.0)
    assert (o.prefill_queue, o.decode_load, o.prefill, o.decode) == (300, 1.0, 1, 2)
    o = obs.observe({**report, "mean_prompt_tokens": 400.0, "mean_output_tokens": 40.0,
                     "ttft_attainment": 0.5}, 6.0, 1, 2)
    assert (o.mean_prompt_tokens, o.ttft_attainment) == (400.0, 0.5)
    o = obs.observe(report, 7.0, 1, 2)  # nothing finished: the last known means
    assert (o.mean_prompt_tokens, o.mean_output_tokens) == (400.0, 40.0)


def test_argparse_namespace_without_autoscale_gives_none():
    from pdserve.cluster.cli.autoscale_args import autoscale_config

    assert autoscale_config(argparse.Namespace(autoscale=False), None) is None
