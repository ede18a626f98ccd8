"""The router's record of recent load (router/load_window.py): what the autoscaler reads."""

from __future__ import annotations

import pytest

from pdserve.router.load_window import LoadWindow


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_summary_counts_only_the_window():
    clock = Clock()
    w = LoadWindow(horizon_s=100, clock=clock)
    for i in range(10):  # 10 arrivals at t=1000..1009
        clock.t = 1000 + i
        w.arrived()
    w.finished(100, 10, ttft_met=True, tpot_met=True, ok=True)  # t=1009
    w.finished(300, 30, ttft_met=False, tpot_met=True, ok=True)
    w.finished(0, 0, ttft_met=False, tpot_met=True, ok=False)  # e.g. rejected
    clock.t = 1010
    s = w.summary(5.0)
    assert s.arrivals == 5 and s.arrival_rate == pytest.approx(1.0)  # t=1005..1009
    assert s.finished == 3 and s.errors == 1
    assert s.mean_prompt_tokens == 200 and s.mean_output_tokens == 20  # errors excluded
    assert s.ttft_attainment == pytest.approx(1 / 3) and s.tpot_attainment == 1.0
    clock.t = 1200  # everything is past the horizon: trimmed on the next record
    w.arrived()
    s = w.summary(50.0)
    assert (s.arrivals, s.finished, s.ttft_attainment, s.mean_prompt_tokens) == (1, 0, None, None)


def test_window_bounds_are_checked():
    w = LoadWindow(horizon_s=60)
    with pytest.raises(ValueError, match="window_s"):
        w.summary(61)
    with pytest.raises(ValueError, match="horizon_s"):
        LoadWindow(horizon_s=0)
