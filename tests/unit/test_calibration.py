"""Profile correction from logged steps."""

from __future__ import annotations

import pytest

from pdserve.cluster.calibration import calibrate, corrected, correction_factors
from pdserve.cluster.profile import DecodeFit, LatencyProfile, ParallelEntry, PrefillFit
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
    # Prefill steps at t=0 (alone, x1.2) and t=10 (overlapping decode, x1.8); decode
    # steps fill [10, 10.1] (overlapping the second prefill, x3.0) and [20, 20.1] (alone,
    # x1.5).
    prefill = [StepRecord("prefill", (300,), 1.2 * p300, 0.0),
               StepRecord("prefill", (300,), 1.8 * p300, 10.0)]
    n = 15
    decode = [StepRecord("decode", (40,), 3.0 * d, 10.0 + i * 3.0 * d) for i in range(n)] + \
             [StepRecord("decode", (40,), 1.5 * d, 20.0 + i * 1.5 * d) for i in range(n)]
    assert 1.8 * p300 > n * 3.0 * d  # the second prefill covers the first decode burst
    cal = calibrate(PROFILE, prefill, decode)
    assert cal.factors["prefill"] == pytest.approx(1.2)
    assert cal.factors["decode"] == pytest.approx(1.5)
    assert cal.contention.prefill == pytest.approx(1.5)
    assert cal.contention.decode == pytest.approx(2.0)
    assert cal.steps == {"prefill_alone": 1, "prefill_overlap": 1,
                         "decode_alone": n, "decode_overlap": n}
    # No lone steps: the correction comes from all of them and there is no contention.
    only = calibrate(PROFILE, prefill[1:], decode[:n])
    assert only.factors["prefill"] == pytest.approx(1.8)
    assert only.contention.prefill == 1.0
