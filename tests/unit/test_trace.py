"""Trace loaders (Azure, BurstGPT, format detection), synthetic arrivals and reshaping."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

import numpy as np
import pytest

from pdserve.workloads.formats import load_azure_csv, load_burstgpt_csv, load_trace
from pdserve.workloads.synthetic import synthetic
from pdserve.workloads.trace import Trace, TraceRequest

# tests/unit/ -> tests/ -> the checkout -> its parent, which holds shared/.
AZURE_CONV = Path(__file__).resolve().parents[3] / "shared" / "data" / "azure_llm_2023_conv.csv"


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def azure_file(tmp_path: Path) -> Path:
    # Out of order, 7 fractional digits as in the published trace, one row with 0 outputs.
    return write_csv(tmp_path / "azure_small.csv", ["TIMESTAMP", "ContextTokens", "GeneratedTokens"], [
        ["2023-11-16 18:15:50.9951690", 396, 109],
        ["2023-11-16 18:15:46.6805900", 374, 44],
        ["2023-11-16 18:15:48.0000000", 12, 0],
        ["2023-11-16 18:16:46.6805900", 1000, 7],
    ])


def burstgpt_file(tmp_path: Path) -> Path:
    header = ["Timestamp", "Model", "Request tokens", "Response tokens", "Total tokens",
              "Log Type"]
    return write_csv(tmp_path / "burst_small.csv", header, [
        [5.0, "ChatGPT", 100, 20, 120, "Conversation log"],
        [7.5, "GPT-4", 300, 0, 300, "Conversation log"],  # failed request
        [9.0, "GPT-4", 50, 10, 60, "API log"],
        [12.0, "ChatGPT", 80, 30, 110, "API log"],
    ])


def test_azure_loader_sorts_rebases_and_drops_zero_rows(tmp_path):
    t = load_azure_csv(azure_file(tmp_path))
    assert t.name == "azure_small"
    assert [(r.prompt_len, r.output_len) for r in t.requests] == [(374, 44), (396, 109),
                                                                  (1000, 7)]
    assert t.requests[0].arrival_s == 0.0
    assert t.requests[1].arrival_s == pytest.approx(4.314579, abs=1e-6)
    assert t.requests[2].arrival_s == pytest.approx(60.0, abs=1e-6)
    assert t.duration_s == pytest.approx(60.0, abs=1e-6)


def test_azure_loader_reports_bad_rows(tmp_path):
    path = write_csv(tmp_path / "bad.csv", ["TIMESTAMP", "ContextTokens", "GeneratedTokens"],
                     [["2023-11-16 18:15:50.9951690", "many", 3]])
    with pytest.raises(ValueError, match="bad.csv:2"):
        load_azure_csv(path)


def test_burstgpt_loader_drops_failed_rows_and_filters_model(tmp_path):
    path = burstgpt_file(tmp_path)
    t = load_burstgpt_csv(path)
    assert [(r.arrival_s, r.prompt_len, r.output_len) for r in t.requests] == [
        (0.0, 100, 20), (4.0, 50, 10), (7.0, 80, 30)]
    gpt4 = load_burstgpt_csv(path, model="GPT-4")
    assert [(r.arrival_s, r.prompt_len) for r in gpt4.requests] == [(0.0, 50)]
    with pytest.raises(ValueError, match="no usable rows"):
        load_burstgpt_csv(path, model="Claude")


def test_load_trace_detects_format(tmp_path):
    assert len(load_trace(azure_file(tmp_path))) == 3
    assert len(load_trace(burstgpt_file(tmp_path))) == 3
    unknown = write_csv(tmp_path / "other.csv", ["time", "in", "out"], [[0, 1, 1]])
    with pytest.raises(ValueError, match="unknown trace format"):
        load_trace(unknown)


def inter_arrival_cv(t: Trace) -> float:
    gaps = np.diff([r.arrival_s for r in t.requests])
    return float(gaps.std() / gaps.mean())


def test_synthetic_poisson_rate_and_gamma_burstiness():
    poisson = synthetic(20000, 5.0, (8, 64), (4, 32), seed=1)
    assert poisson.rate == pytest.approx(5.0, rel=0.05)
    assert inter_arrival_cv(poisson) == pytest.approx(1.0, abs=0.1)
    gamma = synthetic(20000, 5.0, (8, 64), (4, 32), cv=3.0, seed=1)
    assert gamma.rate == pytest.approx(5.0, rel=0.15)
    assert inter_arrival_cv(gamma) > 2.0 > inter_arrival_cv(poisson)
    assert gamma.name == "gamma-cv3-5rps" and poisson.name == "poisson-5rps"
    assert all(8 <= r.prompt_len <= 64 and 4 <= r.output_len <= 32 for r in poisson.requests)
    # Same seed, same trace; lengths can also be drawn from a list.
    assert synthetic(50, 2.0, (8, 64), (4, 32), seed=7) == synthetic(50, 2.0, (8, 64), (4, 32),
                                                                     seed=7)
    listed = synthetic(200, 2.0, [10, 20, 30], [5], seed=3)
    assert {r.prompt_len for r in listed.requests} == {10, 20, 30}


def small_trace() -> Trace:
    return Trace("t", tuple(TraceRequest(float(i), 100 + 10 * i, 20 + i) for i in range(10)))


def test_scaled_changes_time_and_lengths():
    t = small_trace()
    s = t.scaled(time_scale=0.5, length_scale=0.1, max_prompt_len=15, max_output_len=2)
    assert [r.arrival_s for r in s.requests] == [0.5 * i for i in range(10)]
    assert [r.prompt_len for r in s.requests] == [10, 11, 12, 13, 14, 15, 15, 15, 15, 15]
    assert all(r.output_len == 2 for r in s.requests)
    assert t.scaled(length_scale=0.001).requests[0].prompt_len == 1  # never below one token
    with pytest.raises(ValueError):
        t.scaled(time_scale=0)


def test_scaled_keeps_prefix_structure_and_cuts_text():
    reqs = (TraceRequest(0.0, 1000, 40, prefix_hashes=(1, 2)),
            TraceRequest(2.0, 10, 8, prompt_text="0123456789"))
    s = Trace("t", reqs).scaled(time_scale=0.5, length_scale=0.1)
    hashed, texted = s.requests
    # The block size scales with the prompt: still two blocks, the first shared as before.
    assert (hashed.prompt_len, hashed.prefix_block_size, hashed.prefix_hashes) == (100, 51, (1, 2))
    assert (texted.arrival_s, texted.prompt_len, texted.prompt_text) == (1.0, 1, "0")
    assert Trace("t", reqs).scaled(max_prompt_len=5).requests[1].prompt_text == "01234"
    assert Trace("t", reqs).scaled(time_scale=2.0).requests[1].prompt_text == "0123456789"
    with pytest.raises(ValueError, match="prefix_block_size"):
        TraceRequest(0.0, 1, 1, prefix_block_size=0)


def test_at_rate_head_and_window():
    t = small_trace()
    assert t.rate == pytest.approx(1.0)
    fast = t.at_rate(4.0)
    assert fast.rate == pytest.approx(4.0)
    assert fast.duration_s == pytest.approx(2.25)
    assert [r.prompt_len for r in fast.requests] == [r.prompt_len for r in t.requests]
    assert len(t.head(3)) == 3 and t.head(3).requests == t.requests[:3]
    w = t.window(2.5, 3.0)  # arrivals 3, 4, 5 -> rebased to 0, 1, 2
    assert [r.arrival_s for r in w.requests] == [0.0, 1.0, 2.0]
    assert [r.prompt_len for r in w.requests] == [130, 140, 150]
    with pytest.raises(ValueError):
        t.window(100.0, 1.0)  # an empty trace is not a trace


def test_trace_validation():
    with pytest.raises(ValueError, match="empty"):
        Trace("x", ())
    with pytest.raises(ValueError, match="sorted"):
        Trace("x", (TraceRequest(1.0, 1, 1), TraceRequest(0.5, 1, 1)))
    with pytest.raises(ValueError):
        TraceRequest(0.0, 0, 1)


@pytest.mark.skipif(not AZURE_CONV.is_file(), reason="shared Azure trace not present")
def test_real_azure_conversation_trace():
    with AZURE_CONV.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    usable = sum(int(r["ContextTokens"]) > 0 and int(r["GeneratedTokens"]) > 0 for r in rows)
    assert len(rows) == 19366
    t = load_trace(AZURE_CONV)
    assert len(t) == usable
    assert t.requests[0].arrival_s == 0.0
    assert 3300 < t.duration_s < 3700  # about one hour
    assert statistics.fmean(r.prompt_len for r in t.requests) == pytest.approx(1155, rel=0.01)
