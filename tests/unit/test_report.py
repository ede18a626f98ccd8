"""Run summaries on hand-made records: outcomes, percentiles, attainment, goodput."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from pdserve.cluster.cli.replay.config import LoadGenConfig
from pdserve.cluster.cli.replay.records import RequestRecord, RunResult, UsageRecord
from pdserve.cluster.cli.replay.report import (
    Percentiles,
    RunReport,
    goodput_from_sweep,
    markdown_report,
    markdown_table,
    summarize,
)
from pdserve.router.slo import SloConfig

SLO = SloConfig(ttft_s=0.5, tpot_s=0.2, attainment=0.9)


def rec(i: int, send: float, times=(), tokens=(), status="OK", finish="length",
        usage=None) -> RequestRecord:
    end = times[-1] if times else send + 0.01
    return RequestRecord(i, f"r-{i}", 10, 3, send, send, end, tuple(times), tuple(tokens),
                         finish if status == "OK" else "", usage, status)


def hand_run() -> RunResult:
    records = (
        rec(0, 0.0, (0.1, 0.2, 0.3), (1, 1, 1)),  # ttft .1, tpot .1: meets both
        rec(1, 1.0, (1.2, 1.6, 2.0), (1, 1, 1)),  # ttft .2, tpot .4: misses TPOT
        rec(2, 2.0, (2.9,), (1,)),  # ttft .9 misses TTFT; one token = no TPOT
        # Two tokens in the last chunk, then a token-less final chunk with usage.
        rec(3, 3.0, (3.3, 3.5, 3.6), (1, 2, 0),
            usage=UsageRecord(prompt_tokens=12, completion_tokens=3)),
        rec(4, 3.5, status="RESOURCE_EXHAUSTED"),
        rec(5, 3.6, status="INVALID_ARGUMENT"),
    )
    return RunResult("x:1", "hand", 1.5, LoadGenConfig(), records, wall_s=4.0)


def test_record_properties_and_outcomes():
    run = hand_run()
    r3 = run.records[3]
    assert (r3.num_tokens, r3.first_token_s, r3.last_token_s) == (3, 3.3, 3.5)
    assert r3.ttft_s == pytest.approx(0.3) and r3.tpot_s == pytest.approx(0.1)
    assert r3.e2e_s == pytest.approx(0.6)
    assert run.records[2].tpot_s is None
    assert [r.outcome for r in run.records] == ["ok"] * 4 + ["rejected", "failed"]
    aborted = rec(9, 0.0, (0.1,), (1,), finish="abort")
    empty = rec(10, 0.0, (0.1,), (0,), finish="stop")
    assert aborted.outcome == "failed" and empty.outcome == "failed"


def test_summary_counts_attainment_and_throughput():
    r = summarize(hand_run(), SLO, label="cfg")
    assert (r.label, r.trace, r.offered_rate) == ("cfg", "hand", 1.5)
    assert (r.num_sent, r.num_ok, r.num_rejected, r.num_failed) == (6, 4, 1, 1)
    assert r.status_counts == {"OK": 4, "RESOURCE_EXHAUSTED": 1, "INVALID_ARGUMENT": 1}
    assert r.attainment == pytest.approx(2 / 6)  # rejected and failed are misses
    assert r.attainment_admitted == pytest.approx(2 / 5)
    assert r.ttft_attainment == pytest.approx(3 / 6)
    assert r.tpot_attainment == pytest.approx(3 / 6)
    assert not r.meets_target
    assert r.requests_per_s == pytest.approx(1.0)
    assert r.output_tokens_per_s == pytest.approx(10 / 4)
    # Prompt tokens from usage where present (12), else the traced length (10).
    assert r.total_tokens_per_s == pytest.approx((12 + 3 * 10 + 10) / 4)


def test_summary_percentiles():
    r = summarize(hand_run(), SLO)
    assert r.ttft_s.n == 4
    # TTFT sorted: .1 .2 .3 .9 (linear interpolation between order statistics).
    assert r.ttft_s.p50 == pytest.approx(0.25)
    assert r.ttft_s.p90 == pytest.approx(0.72)
    assert r.ttft_s.p99 == pytest.approx(0.882)
    assert r.ttft_s.mean == pytest.approx(0.375)
    assert r.ttft_s.max == pytest.approx(0.9)
    # TPOT over multi-token requests only: .1 .1 .4.
    assert r.tpot_s.n == 3
    assert r.tpot_s.p50 == pytest.approx(0.1)
    assert r.tpot_s.p90 == pytest.approx(0.34)
    assert r.tpot_s.mean == pytest.approx(0.2)
    # e2e: .3 1.0 .9 .6
    assert r.e2e_s.mean == pytest.approx(0.7)
    assert Percentiles.of([]) is None
    assert Percentiles.of([2.0]) == Percentiles(1, 2.0, 2.0, 2.0, 2.0, 2.0)


def test_everything_rejected_has_zero_attainment_and_no_latencies():
    run = RunResult("x:1", "rej", 1.0, LoadGenConfig(),
                    tuple(rec(i, 0.0, status="RESOURCE_EXHAUSTED") for i in range(3)), 1.0)
    r = summarize(run, SLO)
    assert (r.attainment, r.attainment_admitted, r.num_rejected) == (0.0, 0.0, 3)
    assert r.ttft_s is None and r.tpot_s is None and r.e2e_s is None
    assert "| - / - / - |" in markdown_table([r])


@pytest.mark.parametrize("points, target, want", [
    ([(1, 0.99), (2, 0.95), (4, 0.85), (8, 0.3)], 0.9, 3.0),  # crossing between 2 and 4
    ([(4, 0.85), (1, 0.99), (8, 0.3), (2, 0.95)], 0.9, 3.0),  # order does not matter
    ([(1, 1.0), (2, 0.9), (3, 0.5)], 0.9, 2.0),  # exactly on target counts as meeting it
    ([(1, 1.0), (2, 0.95)], 0.9, 2.0),  # never crosses: the highest measured rate
    ([(1, 0.5), (2, 0.2)], 0.9, 0.0),  # misses even at the lowest rate
    ([(1, 0.95), (2, 0.8), (3, 0.92), (4, 0.5)], 0.9, 3 + 0.02 / 0.42),  # highest crossing
    ([], 0.9, 0.0),
])
def test_goodput_from_sweep(points, target, want):
    assert goodput_from_sweep(points, target) == pytest.approx(want)


def test_json_round_trips_and_markdown():
    run = hand_run()
    assert RunResult.from_dict(json.loads(json.dumps(run.to_dict()))) == run
    r = summarize(run, SLO, label="cfg")
    assert RunReport.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    # Reports saved before they named their API load as gRPC ones.
    assert RunReport.from_dict({k: v for k, v in r.to_dict().items() if k != "api"}) == r
    http = summarize(replace(run, config=LoadGenConfig(api="http")), SLO, label="cfg")
    assert http.api == "http" and "| cfg | http | 1.5 |" in markdown_table([r, http])
    table = markdown_table([r])
    header, sep, row = table.strip().splitlines()
    assert header.count("|") == sep.count("|") == row.count("|")
    assert "| cfg | grpc | 1.5 | 6 | 4 | 1 | 1 |" in row
    assert "250.0 / 720.0 / 882.0" in row and "33.3%" in row and "40.0%" in row
    doc = markdown_report("title", [r], goodput=3.0)
    assert doc.startswith("# title") and "TTFT <= 500 ms" in doc and "**3 req/s**" in doc
