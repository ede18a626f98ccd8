"""Correcting a latency profile with the steps a deployment really ran.

``correction_factors`` compares each logged step's measured duration with the profile's
prediction for the same shape and returns the median ratio per phase; ``corrected``
scales the profile's prefill and decode coefficients by them. The profiler measures a
model step alone on an idle machine; in a cluster the same step pays per-step costs the
profiler leaves out, and may share the host with the other pool, the router and the
clients. Calibrate on a workload separate from the one being predicted.

``calibrate`` separates the two effects when the pools share a host: a step *overlaps*
when the other pool was busy for more than half of it (from the records' wall-clock
start times). The observed/predicted time of the steps that ran alone corrects the
profile (a duration-weighted median for prefill, the ratio of totals for decode: see the
estimators below); that of the overlapping ones over it gives ``HostContention``, the slow-down the
simulator applies while both pools are busy (measured on the 2-core demo host: about
1.2-1.4x, against 1.0-1.2x alone).
"""

from __future__ import annotations

import bisect
import dataclasses
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pdserve.cluster.profile import DecodeFit, LatencyProfile, PrefillFit
from pdserve.cluster.simulator.config import HostContention
from pdserve.engine.step_log import StepRecord

PHASES = ("prefill", "decode")


def _ratios(profile: LatencyProfile, records: Iterable[StepRecord], tp: int,
            pp: int) -> list[tuple[StepRecord, float]]:
    inst = profile.instance(tp, pp)
    out = []
    for r in records:
        predicted = inst.prefill_s(r.lens) if r.kind == "prefill" else inst.decode_s(r.lens)
        if predicted > 0:
            out.append((r, r.duration_s / predicted))
    return out


def correction_factors(profile: LatencyProfile, records: Iterable[StepRecord],
                       tp: int = 1, pp: int = 1) -> dict[str, float]:
    """Median observed/predicted step time per phase (1.0 where a phase has no steps),
    plus ``<phase>_steps``, the number of steps behind each."""
    ratios: dict[str, list[float]] = {k: [] for k in PHASES}
    for r, x in _ratios(profile, records, tp, pp):
        ratios[r.kind].append(x)
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


class _Busy:
    """The union of one pool's step intervals, queried for overlap with a window."""

    def __init__(self, records: Sequence[StepRecord]):
        spans = sorted((r.start_s, r.start_s + r.duration_s) for r in records)
        merged: list[list[float]] = []
        for s, e in spans:
            if merged and s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e])
        self._starts = [s for s, _ in merged]
        self._spans = merged

    def fraction(self, a: float, b: float) -> float:
        if b <= a:
            return 0.0
        i = max(0, bisect.bisect_right(self._starts, a) - 1)
        busy = 0.0
        for s, e in self._spans[i:]:
            if s >= b:
                break
            busy += max(0.0, min(b, e) - max(a, s))
        return busy / (b - a)


def _weighted_median_ratio(pairs: list[tuple[float, float]]) -> float | None:
    """The median observed/predicted ratio, each step weighted by its predicted time.

    For prefill: the long steps are the ones that build TTFT queues (small steps stretch
    more under contention, by a fixed cost that hardly matters to queueing), and a median
    keeps the few steps stalled by the OS from dominating."""
    pts = sorted((o / p, p) for o, p in pairs if p > 0)
    total = sum(w for _, w in pts)
    if not pts or total <= 0:
        return None
    acc = 0.0
    for ratio, w in pts:
        acc += w
        if acc >= total / 2:
            return ratio
    return pts[-1][0]


def _total_ratio(pairs: list[tuple[float, float]]) -> float | None:
    """Total observed over total predicted time. For decode: a request's TPOT is the mean
    of the loop cycles it waits through, stalls included, so the mean is what to match."""
    predicted = sum(p for _, p in pairs)
    return sum(o for o, _ in pairs) / predicted if predicted > 0 else None


_ESTIMATORS = {"prefill": _weighted_median_ratio, "decode": _total_ratio}


@dataclass(frozen=True)
class Calibration:
    """Per-phase profile correction for steps run alone, and the shared-host slow-down."""

    factors: dict[str, float]
    contention: HostContention
    steps: dict[str, int]  # "<phase>_alone" / "<phase>_overlap" -> number of steps


def calibrate(profile: LatencyProfile, prefill_records: Sequence[StepRecord],
              decode_records: Sequence[StepRecord], tp: int = 1, pp: int = 1) -> Calibration:
    """Split each pool's steps by whether the other pool was busy for most of the step.

    A phase with no overlapping steps gets contention 1.0; one with no lone steps takes
    its correction from all its steps (and contention 1.0), so sparse data degrades to
    ``correction_factors``.
    """
    busy = {"prefill": _Busy(decode_records), "decode": _Busy(prefill_records)}
    split: dict[str, dict[str, list[tuple[float, float]]]] = {
        k: {"alone": [], "overlap": []} for k in PHASES}
    for r, x in _ratios(profile, [*prefill_records, *decode_records], tp, pp):
        over = busy[r.kind].fraction(r.start_s, r.start_s + r.duration_s) > 0.5
        split[r.kind]["overlap" if over else "alone"].append((r.duration_s, r.duration_s / x))
    factors, slow = {}, {}
    for k in PHASES:
        est = _ESTIMATORS[k]
        alone, over = est(split[k]["alone"]), est(split[k]["overlap"])
        factors[k] = alone or over or 1.0
        slow[k] = over / alone if (alone and over) else 1.0
    steps = {f"{k}_{w}": len(v) for k in PHASES for w, v in split[k].items()}
    return Calibration(factors, HostContention(**slow), steps)
