"""Profile correction from logged steps."""

from __future__ import annotations

import pytest

from pdserve.cluster.calibration import corrected, correction_factors
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
