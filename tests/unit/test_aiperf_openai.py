"""benchmarks/aiperf_openai.py's pure parts: the command lines it runs and how it reads
AIPerf's and pdserve bench's results (the benchmark itself needs AIPerf and a cluster)."""

from __future__ import annotations

import json
from pathlib import Path

from pdserve.benchmarks.aiperf_openai import (
    aiperf_command,
    aiperf_env,
    bench_command,
    markdown,
    parse_args,
    read_aiperf,
    read_bench,
)


def _pct(p50, p90, p99, avg):
    return {"unit": "ms", "p50": p50, "p90": p90, "p99": p99, "avg": avg}


def _aiperf_export(tmp_path: Path, errors=(), good=10, completed=10) -> Path:
    d = {
        "aiperf_version": "0.13.0",
        "request_count": {"avg": float(good)},
        "completed_request_count": {"avg": float(completed)},
        "time_to_first_token": _pct(50.0, 90.0, 99.0, 60.0),
        "inter_token_latency": _pct(10.0, 12.0, 15.0, 11.0),
        "request_throughput": {"avg": 2.5},
        "output_token_throughput": {"avg": 60.0},
        "usage_prompt_tokens": {"avg": 117.0},
        "usage_completion_tokens": {"avg": 24.0},
        "error_summary": list(errors),
        "was_cancelled": False,
        "is_complete": True,
    }
    (tmp_path / "profile_export_aiperf.json").write_text(json.dumps(d))
    return tmp_path


def test_aiperf_command_streams_chat_with_forced_lengths(tmp_path):
    args = parse_args(["--concurrencies", "1,2", "--requests", "20", "--isl", "64",
                       "--osl", "16"])
    assert args.concurrency_list == [1, 2]
    cmd = aiperf_command(Path("aiperf"), args, "http://127.0.0.1:8000", "demo", "/tok", 2,
                         tmp_path)
    joined = " ".join(cmd)
    for part in ("profile", "--endpoint-type chat", "--streaming", "--tokenizer /tok",
                 "--concurrency 2", "--request-count 20", "--isl 64", "--osl 16",
                 "--extra-inputs ignore_eos:true", "--extra-inputs min_tokens:16",
                 "--use-server-token-count", "--no-server-metrics", f"--output-artifact-dir {tmp_path}"):
        assert part in joined, part
    # The concurrency loop is paced by a request-rate cap unless it is turned off.
    assert cmd[cmd.index("--request-rate") + 1] == "1000"
    assert cmd[cmd.index("--arrival-pattern") + 1] == "constant"
    args = parse_args(["--server-metrics", "http://127.0.0.1:9400/metrics", "--rate-cap", "0"])
    cmd = aiperf_command(Path("aiperf"), args, "u", "m", "t", 1, tmp_path)
    assert "--no-server-metrics" not in cmd and "--request-rate" not in cmd
    assert cmd[cmd.index("--server-metrics") + 1] == "http://127.0.0.1:9400/metrics"


def test_aiperf_env_drops_offline_switches(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    env = aiperf_env()
    assert "HF_HUB_OFFLINE" not in env and "TRANSFORMERS_OFFLINE" not in env


def test_bench_command_is_the_same_closed_loop_load(tmp_path):
    args = parse_args(["--requests", "30", "--osl", "24"])
    cmd = bench_command("http://127.0.0.1:8000", "demo", 117, args, 4, tmp_path)
    joined = " ".join(cmd)
    for part in ("bench --api http", "--address http://127.0.0.1:8000", "--model demo",
                 "--trace poisson:1000:30", "--num-requests 30", "--prompt-len 117-117",
                 "--output-len 24-24", "--max-in-flight 4", "--label http_c4"):
        assert part in joined, part


def test_read_aiperf_clean_run(tmp_path):
    r = read_aiperf(_aiperf_export(tmp_path), 2, 10)
    assert (r.ok, r.errors, r.error_detail) == (10, 0, [])
    assert r.ttft_ms["p50"] == 50.0 and r.itl_ms["p99"] == 15.0
    assert (r.request_throughput, r.prompt_tokens, r.output_tokens) == (2.5, 117.0, 24.0)


def test_read_aiperf_counts_errors_and_missing_requests(tmp_path):
    err = {"error_details": {"code": 400, "type": "BadRequestError", "message": "x"},
           "count": 2}
    r = read_aiperf(_aiperf_export(tmp_path, [err], good=8, completed=10), 1, 10)
    assert r.errors == 2 and "BadRequestError" in r.error_detail[0]
    # A run that stopped early: the requests never completed count as failures.
    r = read_aiperf(_aiperf_export(tmp_path, good=6, completed=6), 1, 10)
    assert r.errors == 4


def test_read_bench_and_markdown(tmp_path):
    rep = {"num_sent": 10, "num_ok": 9, "requests_per_s": 3.0, "output_tokens_per_s": 72.0,
           "ttft_s": {"p50": 0.05, "p90": 0.08, "p99": 0.1, "mean": 0.06},
           "tpot_s": {"p50": 0.01, "p90": 0.012, "p99": 0.02, "mean": 0.011},
           "status_counts": {"OK": 9, "UNAVAILABLE": 1}}
    path = tmp_path / "http_c1.json"
    path.write_text(json.dumps({"points": [{"rate": 1000, "report": rep}]}))
    b = read_bench(path, 1)
    assert (b.ok, b.errors, b.error_detail) == (9, 1, ["1x UNAVAILABLE"])
    assert b.ttft_ms["p50"] == 50.0 and b.itl_ms["p90"] == 12.0
    a = read_aiperf(_aiperf_export(tmp_path), 1, 10)
    meta = {"model": "demo", "server": "s", "host": "h", "aiperf_version": "0.13.0",
            "pdserve_commit": "abc", "date": "today", "aiperf_load": "`--concurrency N`",
            "requests": 10, "warmup": 2, "isl": 96, "osl": 24, "prompt_tokens": "117",
            "command": "python benchmarks/aiperf_openai.py", "bench_hook": None}
    text = markdown([a, b], meta)
    assert "| 1 | aiperf | 10 | 0 | 50.0 / 90.0 / 99.0 | 10.0 / 12.0 / 15.0 | 2.50 | 60.0 |" in text
    assert "| 1 | pdserve bench | 9 | 1 |" in text
    assert "## Errors" in text and "1x UNAVAILABLE" in text
