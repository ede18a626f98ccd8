"""Correcting a latency profile with the steps a deployment really ran.

``correction_factors`` compares each logged step's measured duration with the profile's
prediction for the same shape and returns the median ratio per phase; ``corrected``
scales the profile's prefill and decode coefficients by them. The profiler measures a
model step alone on an idle machine; in a cluster the same step shares the host with
the other pool, the router and the clients (on a 2-core CPU machine that is worth 1.5-2x),
and pays per-step costs the profiler leaves out. Calibrate on a workload separate from
the one being predicted.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Iterable

from pdserve.cluster.profile import DecodeFit, LatencyProfile, PrefillFit
from pdserve.engine.step_log import StepRecord


def correction_factors(profile: LatencyProfile, records: Iterable[StepRecord],
                       tp: int = 1, pp: int = 1) -> dict[str, float]:
    inst = profile.instance(tp, pp)
    ratios: dict[str, list[float]] = {"prefill": [], "decode": []}
    for r in records:
        predicted = inst.prefill_s(r.lens) if r.kind == "prefill" else inst.decode_s(r.lens)
        if predicted > 0:
            ratios[r.kind].append(r.duration_s / predicted)
    return {k: statistics.median(v) if v else 1.0 for k, v in ratios.items()} | \
        {f"{k}_steps": float(len(v)) for k, v in ratios.items()}


def corrected(profile: LatencyProfile, factors: dict[str, float]) -> LatencyProfile:
    fp, fd = factors.get("prefill", 1.0), factors.get("decode", 1.0)

    def scale_decode(d: DecodeFit) -> DecodeFit:
        large = tuple(x * fd for x in d.large) if d.large is not None else None
        return DecodeFit(d.a * fd, d.b * fd, d.c * fd, large, d.large_batch)

    entries = tuple(dataclasses.replace(
        e, prefill=PrefillFit(e.prefill.a * fp, e.prefill.b * fp, e.prefill.c * fp),
        decode=scale_decode(e.decode)) for e in profile.entries)
    return dataclasses.replace(profile, entries=entries,
                               notes=f"{profile.notes}; corrected x{fp:.3f} prefill, "
                                     f"x{fd:.3f} decode from observed steps".strip("; "))
