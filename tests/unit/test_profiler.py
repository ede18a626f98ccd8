"""``pdserve profile``: fitting the latency model, the grids, and a tiny real run."""

from __future__ import annotations

import argparse
import json
import math
import random

import numpy as np
import pytest
import torch

from pdserve.cluster.cli.profile_commands import (
    markdown_report,
    options_from_args,
    plot_heldout,
    register,
    summary,
)
from pdserve.cluster.planning.profiler.fitting import (
    Measurement,
    fit_decode,
    fit_prefill,
    split_indices,
)
from pdserve.cluster.planning.profiler.grids import decode_grid, prefill_grid
from pdserve.cluster.planning.profiler.options import ProfileOptions
from pdserve.cluster.planning.profiler.run import profile_model
from pdserve.cluster.planning.profiler.timing import drift_corrected_medians
from pdserve.engine.config import EngineConfig
from pdserve.engine.latency_profile import LatencyProfile


def _noisy(values: list[float], rel_noise: float, seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    return [v * (1 + rel_noise * rng.standard_normal()) for v in values]


def _prefill_points(a: float, b: float, c: float, n: int = 80, noise: float = 0.01):
    shapes = prefill_grid(n, random.Random(1), 16, 2048, 8, 2048)
    true = [a + b * sum(s) + c * sum(x * x for x in s) for s in shapes]
    return [Measurement(s, ms) for s, ms in zip(shapes, _noisy(true, noise, 2), strict=True)]


def _decode_points(small, large=None, kink: int = 24, n: int = 120, noise: float = 0.01):
    shapes = decode_grid(n, random.Random(3), 16, 2048, 64, 4.0)

    def ms(s):
        a, b, c = large if large is not None and len(s) >= kink else small
        return a + b * (sum(s) + len(s)) + c * len(s)

    return [Measurement(s, m) for s, m in zip(shapes, _noisy([ms(s) for s in shapes], noise, 4),
                                               strict=True)]


# -- fits on synthetic data -----------------------------------------------------------------

def test_fit_prefill_recovers_coefficients():
    res = fit_prefill(_prefill_points(1.5, 0.06, 6e-5), holdout=0.25, seed=0)
    assert res.fit.b == pytest.approx(0.06, rel=0.05)
    assert res.fit.c == pytest.approx(6e-5, rel=0.05)
    assert res.fit.a == pytest.approx(1.5, rel=0.15)
    assert res.heldout.n == 20 and res.train_error.n == 60
    assert res.heldout.median < 0.02
    assert set(res.train).isdisjoint(res.test)


def test_fit_prefill_non_negative_refit_unless_clearly_worse():
    # A tiny negative fixed cost (noise-level): the non-negative refit is kept.
    res = fit_prefill(_prefill_points(-0.02, 0.05, 2e-5), seed=1)
    assert res.nonneg and min(res.fit.a, res.fit.b, res.fit.c) >= 0
    assert res.heldout.median < 0.02
    # A real one: clipping it would cost accuracy, so the free fit is kept.
    res = fit_prefill(_prefill_points(-0.5, 0.05, 2e-5), seed=1)
    assert not res.nonneg and res.fit.a == pytest.approx(-0.5, rel=0.1)
    assert res.heldout.median < 0.02


def test_fit_decode_single_regime_without_kink():
    res = fit_decode(_decode_points((1.2, 0.001, 0.08)), seed=0)
    assert res.fit.large is None and not res.two_regime and res.threshold is None
    assert res.fit.b == pytest.approx(0.001, rel=0.05)
    assert res.fit.c == pytest.approx(0.08, rel=0.15)
    assert res.fit.a == pytest.approx(1.2, rel=0.15)
    assert res.heldout.median < 0.02
    assert res.heldout == res.single_heldout
    assert res.cv[0][0] == 0 and len(res.cv) > 1  # thresholds were tried


def test_fit_decode_two_regimes_at_a_kink():
    small, large = (1.0, 0.0008, 0.1), (4.0, 0.002, 0.05)
    res = fit_decode(_decode_points(small, large, kink=24), seed=0)
    assert res.two_regime and res.fit.large is not None
    assert 16 < res.threshold <= 24
    assert res.fit.b == pytest.approx(0.0008, rel=0.1)
    assert res.fit.large[1] == pytest.approx(0.002, rel=0.1)
    assert res.heldout.median < 0.02
    assert res.heldout.median < res.single_heldout.median
    # The stored model switches regime where the fit says.
    assert res.fit.ms([500] * (res.threshold - 1)) < res.fit.ms([500] * res.threshold)


def test_fits_need_enough_points():
    with pytest.raises(ValueError, match="at least 4"):
        fit_prefill([Measurement((16,), 1.0)] * 3)


def test_split_is_seeded_and_disjoint():
    train, test = split_indices(40, 0.25, seed=7)
    assert (train, test) == split_indices(40, 0.25, seed=7)
    assert len(test) == 10 and sorted(train + test) == list(range(40))
    assert split_indices(40, 0.25, seed=8) != (train, test)


def test_drift_correction_removes_machine_slowdowns():
    rng = random.Random(5)
    true = [math.exp(rng.uniform(0, math.log(200))) for _ in range(60)]
    log = []
    for _ in range(7):
        order = list(range(60))
        rng.shuffle(order)
        for i in order:
            # Bursts of contention every other ~80 steps slow everything by 1.5x.
            slow = 1.5 if (len(log) // 80) % 2 == 0 else 1.0
            log.append((i, true[i] * slow * (1 + 0.01 * rng.uniform(-1, 1))))
    raw, _ = drift_corrected_medians(log, 60, window=0)
    fixed, drift = drift_corrected_medians(log, 60, window=41)
    spread = lambda meds: float(np.std(np.log(np.array(meds) / np.array(true))))  # noqa: E731
    assert spread(raw) > 0.1 and spread(fixed) < 0.03
    assert len(drift) == len(log) and drift.max() / drift.min() > 1.3


# -- grids and validation -------------------------------------------------------------------

def test_prefill_grid_respects_limits():
    shapes = prefill_grid(60, random.Random(0), 16, 1024, 6, 1536)
    assert len(shapes) == 60 and (16,) in shapes and (1024,) in shapes
    assert all(1 <= len(s) <= 6 and sum(s) <= 1536 for s in shapes)
    assert all(16 <= x <= 1024 for s in shapes for x in s)
    assert any(len(s) > 1 and max(s) > 2 * min(s) for s in shapes)  # mixed lengths


def test_decode_grid_respects_limits():
    shapes = decode_grid(50, random.Random(0), 16, 2048, 32, 4.0)
    assert len(shapes) == 50 and (2048,) * 32 in shapes and (16,) in shapes
    assert all(1 <= len(s) <= 32 for s in shapes)
    assert all(16 <= x <= 2048 for s in shapes for x in s)
    assert all(max(s) <= 4.0 * min(s) + 1 for s in shapes)


def test_validation():
    with pytest.raises(ValueError):
        Measurement((), 1.0)
    with pytest.raises(ValueError):
        Measurement((16,), 0.0)
    with pytest.raises(ValueError):
        ProfileOptions(reps=0)
    with pytest.raises(ValueError):
        ProfileOptions(holdout=0.9)
    assert ProfileOptions.quick(reps=5).reps == 5


def test_cli_arguments_map_to_options():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["profile", "--quick", "--backends", "none", "--threads", "2",
                              "--max-batch", "16", "--out", "x.json"])
    opts = options_from_args(args)
    assert opts.backends == () and opts.threads == 2 and opts.max_batch == 16
    assert opts.prefill_points == ProfileOptions.quick().prefill_points
    args = parser.parse_args(["profile", "--backends", "shm, tcp", "--reps", "4"])
    opts = options_from_args(args)
    assert opts.backends == ("shm", "tcp") and opts.reps == 4 and opts.threads == 1


# -- a tiny real run ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(demo_model_dir):
    threads = torch.get_num_threads()
    opts = ProfileOptions(prefill_points=10, decode_points=12, reps=1, decode_repeat=2,
                          warmup_passes=0,
                          max_prompt_len=96, max_batch_tokens=192, max_batch=6,
                          max_context=96, wide_mix_points=2, backends=("inprocess", "shm"),
                          transfer_tokens=(32, 64), transfer_reps=1)
    run = profile_model(EngineConfig(model=str(demo_model_dir), device="cpu"), opts)
    assert torch.get_num_threads() == threads  # restored
    return run


def test_tiny_profile_round_trips(tiny_run):
    profile = tiny_run.to_profile()
    again = LatencyProfile.from_dict(json.loads(profile.to_json()))
    assert again == profile
    assert again.tp_degrees == (1,) and again.hardware
    # Demo model: 4 layers x 2 KV heads x head_dim 32 x (K+V) x float32.
    assert again.kv_bytes_per_token == 4 * 2 * 32 * 2 * 4
    entry = again.instance(1, 1).entry
    assert entry.kv_capacity_tokens > 0
    inst = again.instance(1)
    assert inst.prefill_s([64, 32]) > 0 and inst.prefill_s([16]) > 0
    assert inst.decode_s([80] * 4) > 0 and inst.decode_s([16]) > 0
    errors = dict(again.fit_error)
    assert set(errors) == {"prefill", "decode"}
    assert all(math.isfinite(e) and e >= 0 for e in errors.values())
    bw = dict(again.transfer_bandwidth)
    assert set(bw) == {"inprocess", "shm"} and all(v > 0 for v in bw.values())
    m = again.extra["measurements"]
    assert len(m["prefill"]) == 10 and len(m["decode"]) == 12
    assert {p["split"] for p in m["prefill"]} == {"train", "test"}
    assert all(p["ms"] > 0 and len(p["samples_ms"]) == 1 for p in m["prefill"])
    assert all(p["ms"] > 0 and len(p["samples_ms"]) == 2 for p in m["decode"])
    assert again.extra["profiler"]["torch_threads"] == 1


def test_tiny_profile_reports(tiny_run, tmp_path):
    text = summary(tiny_run)
    assert "prefill ms =" in text and "held-out" in text and "transfer shm" in text
    md = markdown_report(tiny_run, tmp_path / "p.json")
    assert "| prefill |" in md and "KV transfer bandwidth" in md
    plot_heldout(tiny_run, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_profile_at_tp2_records_the_degree(tmp_path):
    """``pdserve profile --tp 2`` times a whole instance (rank 1 a local process driven by
    this one) and writes an entry for tp 2, with the instance's KV capacity."""
    from pdserve.engine.demo_tp_model import create_tp_demo_model

    model = str(create_tp_demo_model("llama", tmp_path / "llama"))
    opts = ProfileOptions(reps=1, decode_repeat=1, prefill_points=10, decode_points=12,
                          max_prompt_len=64, max_batch_tokens=96, max_prefill_seqs=3,
                          max_batch=6, max_context=64, wide_mix_points=2, backends=(),
                          threads=1)
    run = profile_model(EngineConfig(model=model, device="cpu", num_kv_blocks=64,
                                     tensor_parallel_size=2), opts)
    profile = LatencyProfile.from_dict(json.loads(run.to_profile().to_json()))
    assert profile.tp_degrees == (2,)
    assert profile.extra["profiler"]["tp"] == 2
    assert profile.instance(2, 1).entry.kv_capacity_tokens == 64 * 16
    # the model's KV per token, both ranks' shares (a rank holds 2 of the 4 KV heads):
    # 2 layers x 4 heads x head_dim 16 x (K+V) x float32
    assert profile.kv_bytes_per_token == 2 * 4 * 16 * 2 * 4
    assert profile.instance(2).prefill_s([32]) > 0 and profile.instance(2).decode_s([40] * 3) > 0
