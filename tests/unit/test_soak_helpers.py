"""The soak benchmark's pure helpers (the soak itself runs for minutes and is not in CI)."""

from __future__ import annotations

import pytest

from pdserve.benchmarks.soak import growth, slope, soak_trace
from pdserve.workloads.trace import Trace, TraceRequest


def _trace(arrivals):
    return Trace("t", tuple(TraceRequest(a, 10 + i, 5) for i, a in enumerate(arrivals)))


def test_slope_of_a_line_and_degenerate_inputs():
    assert slope([0, 1, 2, 3], [1, 3, 5, 7]) == pytest.approx(2.0)
    assert slope([5], [1]) == 0.0
    assert slope([2, 2], [1, 9]) == 0.0


def test_growth_fits_only_the_second_half():
    # A warm-up jump in the first half, then flat: no growth per hour.
    ts = [0, 10, 20, 30, 40, 50, 60]
    vs = [100, 180, 200, 200, 200, 200, 200]
    g = growth(ts, vs)
    assert (g["start"], g["end"], g["max"], g["growth"]) == (100, 200, 200, 100)
    assert g["growth_per_hour"] == pytest.approx(0.0)
    # A steady 1 MiB per minute is 60 MiB per hour.
    assert growth(ts, [t / 60 for t in ts])["growth_per_hour"] == pytest.approx(60.0)


def test_soak_trace_takes_a_prefix_at_the_rate():
    base = _trace([0, 1, 3, 4, 10, 11])
    t = soak_trace(base, rate=2.0, duration_s=2.0)
    assert len(t) == 4
    assert [r.prompt_len for r in t.requests] == [10, 11, 12, 13]
    assert t.rate == pytest.approx(2.0)


def test_soak_trace_loops_a_short_trace():
    base = _trace([0, 2, 4])
    t = soak_trace(base, rate=1.0, duration_s=7.0)
    assert len(t) == 7
    assert [r.prompt_len for r in t.requests] == [10, 11, 12, 10, 11, 12, 10]
    # One mean gap between copies: evenly spaced, so the rate holds exactly.
    arrivals = [r.arrival_s for r in t.requests]
    gaps = {round(b - a, 9) for a, b in zip(arrivals, arrivals[1:], strict=False)}
    assert gaps == {1.0}


def test_soak_trace_spreads_a_single_request_trace():
    t = soak_trace(_trace([0]), rate=4.0, duration_s=1.0)
    assert len(t) == 4
    assert t.rate == pytest.approx(4.0)
