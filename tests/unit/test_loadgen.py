"""The load generator against a real in-process cluster, and the sweep/report/plot files.

A short synthetic trace on the CPU demo model: every request is served with exactly its
traced output length (ignore_eos), timestamps are consistent, an over-long prompt is
counted as failed with INVALID_ARGUMENT, the OpenAI HTTP endpoint records the same as
gRPC, Mooncake-style prefix hashes hit the prefix cache, and a sweep writes its JSON,
Markdown and PNGs. No timing thresholds: only orderings and counts.
"""

from __future__ import annotations

import json

import pytest

from pdserve.cluster.cli.main import main
from pdserve.cluster.cli.replay.config import LoadGenConfig
from pdserve.cluster.cli.replay.grpc_driver import grpc_request
from pdserve.cluster.cli.replay.loadgen import run_trace
from pdserve.cluster.cli.replay.prompts import build_bench_request
from pdserve.cluster.cli.replay.report import summarize
from pdserve.cluster.cli.replay.sweep import SweepConfig, compare, load_sweep, run_sweep
from pdserve.cluster.launch.local import LocalCluster
from pdserve.engine.config import EngineConfig
from pdserve.router.config import RouterConfig
from pdserve.router.server import ServerConfig
from pdserve.router.slo import SloConfig
from pdserve.workloads.synthetic import synthetic
from pdserve.workloads.trace import Trace, TraceRequest

TOO_LONG = 5000  # the demo model's context is 4096 tokens


@pytest.fixture(scope="module")
def cluster(demo_model_dir):
    cfg = EngineConfig(model=str(demo_model_dir), device="cpu", num_kv_blocks=256)
    server = ServerConfig(port=0, http_port=0, metrics_port=0)
    with LocalCluster(cfg, router=RouterConfig(model=cfg.model, server=server)) as c:
        yield c


def short_trace() -> Trace:
    t = synthetic(20, 20.0, (8, 40), (2, 8), seed=3)
    late = TraceRequest(t.requests[-1].arrival_s + 0.01, TOO_LONG, 4)
    return Trace(t.name, (*t.requests, late))


def test_bench_request_follows_the_trace():
    cfg = LoadGenConfig(vocab_size=50, seed=1, slo_ttft_s=0.25, slo_tpot_s=0.05)
    req = grpc_request(build_bench_request(4, TraceRequest(0.0, 30, 7), cfg, "run-4"))
    assert len(req.token_ids.ids) == 30 and all(3 <= t < 50 for t in req.token_ids.ids)
    assert (req.sampling.max_tokens, req.sampling.temperature, req.stop.ignore_eos) == (7, 0, True)
    assert (req.slo.ttft_ms, req.slo.tpot_ms, req.request_id) == (250.0, 50.0, "run-4")
    # Seeded per index: the same request again, a different one for another index.
    assert build_bench_request(4, TraceRequest(0.0, 30, 7), cfg, "x").prompt == tuple(
        req.token_ids.ids)
    assert build_bench_request(5, TraceRequest(0.0, 30, 7), cfg, "x").prompt != tuple(
        req.token_ids.ids)
    text = grpc_request(build_bench_request(0, TraceRequest(0.0, 5, 1),
                                            LoadGenConfig(prompt_mode="text"), "t"))
    assert text.WhichOneof("prompt") == "text" and len(text.text.split()) == 5
    plain = build_bench_request(0, TraceRequest(0.0, 5, 1), LoadGenConfig(), "t")
    assert not grpc_request(plain).HasField("slo")
    with pytest.raises(ValueError):
        LoadGenConfig(vocab_size=3)


def test_replay_records_every_request(cluster):
    trace = short_trace()
    run = run_trace(cluster.address, trace, quiet=True)
    assert len(run.records) == len(trace) and run.wall_s > 0
    assert [r.index for r in run.records] == list(range(len(trace)))
    served, bad = run.records[:-1], run.records[-1]
    for r, tr in zip(served, trace.requests[:-1], strict=True):
        assert r.outcome == "ok", (r.status, r.error)
        assert r.num_tokens == tr.output_len == r.usage.completion_tokens
        assert r.usage.prompt_tokens == tr.prompt_len
        assert r.finish_reason == "length"
        assert r.arrival_s == tr.arrival_s and r.send_s >= r.arrival_s
        assert r.send_s < r.first_token_s <= r.last_token_s <= r.end_s
        assert r.ttft_s > 0 and r.tpot_s > 0
        assert list(r.message_times_s) == sorted(r.message_times_s)
    assert bad.outcome == "failed" and bad.status == "INVALID_ARGUMENT"
    assert bad.num_tokens == 0 and "context" in bad.error

    report = summarize(run, SloConfig(ttft_s=60.0, tpot_s=60.0))
    assert (report.num_ok, report.num_failed, report.num_rejected) == (20, 1, 0)
    assert report.attainment == pytest.approx(20 / 21)
    assert report.attainment_admitted == pytest.approx(20 / 21)
    assert report.status_counts == {"OK": 20, "INVALID_ARGUMENT": 1}


def test_http_records_what_grpc_records(cluster):
    trace = short_trace()
    grpc_run = run_trace(cluster.address, trace, quiet=True)
    http_run = run_trace(cluster.server.http_address, trace, quiet=True, api="http")
    assert http_run.config.api == "http"
    for g, h in zip(grpc_run.records, http_run.records, strict=True):
        assert (h.status, h.outcome, h.num_tokens, h.finish_reason) == (
            g.status, g.outcome, g.num_tokens, g.finish_reason), h.error
        if h.outcome == "ok":
            assert (h.usage.prompt_tokens, h.usage.completion_tokens) == (
                g.usage.prompt_tokens, g.usage.completion_tokens)
            assert h.usage.ttft_ms > 0 and h.usage.e2e_ms >= h.usage.ttft_ms  # timing sent
            assert h.send_s < h.first_token_s <= h.last_token_s <= h.end_s
    assert "context" in http_run.records[-1].error  # the same validation message


def test_shared_prefix_hashes_hit_the_prefix_cache(cluster):
    # Two Mooncake-style requests sharing their first two 32-token blocks, sent one after
    # the other: the second finds the first's blocks in the prefill worker's cache.
    def one(hashes):
        req = TraceRequest(0.0, 80, 2, prefix_hashes=hashes, prefix_block_size=32)
        return run_trace(cluster.address, Trace("mooncake", (req,)), quiet=True,
                         seed=123).records[0]

    first, second = one((900, 901, 902)), one((900, 901, 903))
    assert first.outcome == second.outcome == "ok"
    assert first.usage.cached_tokens == 0
    # Exactly the shared 64 tokens (four cache blocks of 16); the third blocks differ.
    assert second.usage.cached_tokens == 64


def test_sweep_writes_report_and_plots(cluster, tmp_path):
    trace = synthetic(12, 10.0, (8, 24), (2, 6), seed=5)
    cfg = SweepConfig(label="demo", rates=(10.0, 20.0), slo=SloConfig(60.0, 60.0, 0.9),
                      length_scale=1.0, num_requests=10, loadgen=LoadGenConfig(quiet=True))
    result = run_sweep(cluster.address, trace, cfg, tmp_path)
    assert [p.rate for p in result.points] == [10.0, 20.0]
    assert all(p.report.num_sent == p.report.num_ok == 10 for p in result.points)
    assert result.goodput == 20.0  # generous SLO: every rate meets the target
    for name in ("demo.json", "demo.md", "demo_ttft_cdf.png", "demo_tpot_cdf.png",
                 "demo_attainment.png", "demo_runs/rate_10.json", "demo_runs/rate_20.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert load_sweep(tmp_path / "demo.json") == result
    assert "Goodput" in (tmp_path / "demo.md").read_text()
    assert len(json.loads((tmp_path / "demo_runs" / "rate_10.json").read_text())["records"]) == 10

    other = load_sweep(tmp_path / "demo.json")
    paths = compare({"demo": result, "again": other}, tmp_path / "cmp")
    for p in paths.values():
        assert p.stat().st_size > 0
    assert "| again | 20 |" in paths["md"].read_text()


def test_bench_cli_runs_both_apis_side_by_side(cluster, tmp_path, capsys):
    trace = tmp_path / "mc.jsonl"
    trace.write_text("\n".join(json.dumps(
        {"timestamp": 100 * i, "input_length": 600 + i, "output_length": 60,
         "hash_ids": [0, 1 + i]}) for i in range(6)) + "\n")
    out_dir = tmp_path / "out"
    args = ["bench", "--api", "grpc,http", "--trace", str(trace), "--length-scale", "0.05",
            "--num-requests", "4", "--rates", "20", "--slo-ttft", "60", "--slo-tpot", "60",
            "--out-dir", str(out_dir), "--label", "both", "--quiet"]
    address = f"{cluster.address},http://{cluster.server.http_address}"
    assert main([*args, "--address", address]) == 0
    out = capsys.readouterr().out
    assert "| both-grpc | grpc | 20 | 4 | 4 | 0 | 0 |" in out
    assert "| both-http | http | 20 | 4 | 4 | 0 | 0 |" in out
    assert "both-grpc 20 req/s; both-http 20 req/s" in out
    for name in ("both-grpc.json", "both-http.json", "both-grpc_runs/rate_20.json",
                 "both-http_runs/rate_20.json", "both.md", "both_attainment.png"):
        assert (out_dir / name).stat().st_size > 0, name
    assert [p.report.api for p in load_sweep(out_dir / "both-http.json").points] == ["http"]
    side_by_side = (out_dir / "both.md").read_text()
    assert "| both-grpc | grpc |" in side_by_side and "| both-http | http |" in side_by_side
    # One address for two APIs, or an API nobody knows: a one-line error, nothing run.
    assert main([*args, "--address", cluster.address]) == 2
    assert "one address per --api entry" in capsys.readouterr().err
    assert main([*args, "--api", "grpc,ws", "--address", address]) == 2
    assert "--api must be" in capsys.readouterr().err
