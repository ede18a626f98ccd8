"""Profile correction from logged steps."""

from __future__ import annotations

import pytest

from pdserve.cluster.planning.calibration import calibrate, corrected, correction_factors
from pdserve.engine.latency_profile import DecodeFit, LatencyProfile, ParallelEntry, PrefillFit
from pdserve.engine.step_log import StepLog, StepRecord

PROFILE = LatencyProfile("toy", "test", (ParallelEntry(1, PrefillFit(2.0, 0.1, 1e-5),
                                                       DecodeFit(1.0, 0.001, 0.2), 10_000),),
                         kv_bytes_per_token=10)


def test_factors_are_median_observed_over_predicted_and_correct_the_profile():
    inst = PROFILE.instance()
    recs = [StepRecord("prefill", (100, 50), 1.5 * inst.prefill_s([100, 50])),
            StepRecord("prefill", (300,), 1.5 * inst.prefill_s([300])),
            StepRecord("prefill", (10,), 9.0 * inst.prefill_s([10])),  # an outlier
            StepRecord("decode", (40, 80, 120), 2.0 * inst.decode_s([40, 80, 120]))]
    f = correction_factors(PROFILE, recs)
    assert f["prefill"] == pytest.approx(1.5) and f["decode"] == pytest.approx(2.0)
    assert f["prefill_steps"] == 3 and f["decode_steps"] == 1
    fixed = corrected(PROFILE, f).instance()
    assert fixed.prefill_s([300]) == pytest.approx(1.5 * inst.prefill_s([300]))
    assert fixed.decode_s([40, 80]) == pytest.approx(2.0 * inst.decode_s([40, 80]))


def test_no_records_means_no_correction_and_log_is_bounded():
    assert correction_factors(PROFILE, [])["prefill"] == 1.0
    log = StepLog(capacity=3)
    for i in range(5):
        log.add("decode", [i + 1], 0.01)
    assert [r.lens for r in log.records()] == [(3,), (4,), (5,)]
    assert [r.lens for r in log.records(last=1)] == [(5,)]


def test_calibrate_separates_lone_steps_from_steps_under_contention():
    inst = PROFILE.instance()
    p300 = inst.prefill_s([300])
    d = inst.decode_s([40])
    # A lone prefill step at t=0 (x1.2), and one at t=10 (duration 36 d) during which 12
    # decode steps of 3 d run; around it, decode steps of 1.5 d run alone.
    overlapped = 36 * d
    prefill = [StepRecord("prefill", (300,), 1.2 * p300, 0.0),
               StepRecord("prefill", (300,), overlapped, 10.0)]
    decode = [StepRecord("decode", (40,), 1.5 * d, 10.0 - (10 - i) * 1.5 * d) for i in range(10)]
    decode += [StepRecord("decode", (40,), 3.0 * d, 10.0 + i * 3.0 * d) for i in range(12)]
    decode += [StepRecord("decode", (40,), 1.5 * d, 10.0 + overlapped + i * 1.5 * d)
               for i in range(10)]
    cal = calibrate(PROFILE, prefill, decode)
    assert cal.factors["prefill"] == pytest.approx(1.2)
    assert cal.factors["decode"] == pytest.approx(1.5)
    assert cal.contention.prefill == pytest.approx(overlapped / p300 / 1.2)
    assert cal.contention.decode == pytest.approx(2.0)
    assert cal.steps == {"prefill_alone": 1, "prefill_overlap": 1,
                         "decode_alone": 20, "decode_overlap": 12}


def test_calibrate_scales_contention_by_the_share_overlapped():
    inst = PROFILE.instance()
    p = inst.prefill_s([300])
    d = inst.decode_s([40])
    # the decode pool is busy for the first half of an overlapped prefill step that took
    # 1.5x its lone time: k = 1 + 0.5 / 0.5 = 2
    prefill = [StepRecord("prefill", (300,), p, 0.0),
               StepRecord("prefill", (300,), 1.5 * p, 10.0)]
    n = 50
    decode = [StepRecord("decode", (40,), 0.75 * p / n, 10.0 + i * 0.75 * p / n)
              for i in range(n)]
    assert decode[0].duration_s != d  # (these decode steps' own ratios do not matter here)
    cal = calibrate(PROFILE, prefill, decode)
    assert cal.factors["prefill"] == pytest.approx(1.0)
    assert cal.contention.prefill == pytest.approx(2.0)
    # No lone steps: the correction comes from all of them and there is no contention.
    only = calibrate(PROFILE, prefill[1:], decode)
    assert only.factors["prefill"] == pytest.approx(1.5)
    assert only.contention.prefill == 1.0
