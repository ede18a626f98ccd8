"""Correcting a latency profile with the steps a deployment really ran.

``correction_factors`` compares each logged step's measured duration with the profile's
prediction for the same shape and returns the median ratio per phase; ``corrected``
scales the profile's prefill and decode coefficients by them. The profiler measures a
model step alone on an idle machine; in a cluster the same step pays per-step costs the
profiler leaves out, and may share the host with the other pool, the router and the
clients. Calibrate on a workload separate from the one being predicted.

``calibrate`` separates the two effects when the pools share a host. From the records'
wall-clock start times it finds the share of each step during which the other pool was
busy. Steps run (almost) alone correct the profile; the overlapped ones give
``HostContention``, the slow-down the simulator applies while both pools are busy. On the
2-core demo host that is about 1.3-1.5x, against 1.0-1.2x alone.
"""

from __future__ import annotations

import bisect
import dataclasses
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pdserve.cluster.planning.simulator.config import HostContention
from pdserve.engine.latency_profile import DecodeFit, LatencyProfile, PrefillFit
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


def _weighted_median(values: list[tuple[float, float]]) -> float | None:
    """The median of ``(value, weight)`` pairs."""
    pts = sorted((v, w) for v, w in values if w > 0)
    total = sum(w for _, w in pts)
    if not pts:
        return None
    acc = 0.0
    for v, w in pts:
        acc += w
        if acc >= total / 2:
            return v
    return pts[-1][0]


# How each phase's factors are estimated from (observed, predicted[, overlap]) steps.
# Prefill: medians weighted by predicted time. The long steps are the ones that build
# TTFT queues (small ones stretch more under contention, by a fixed cost that hardly
# matters to queueing), and a median keeps the few steps stalled by the OS from
# dominating. Decode: ratios of totals. A request's TPOT is the mean of the loop cycles
# it waits through, stalls included, so the mean is what to match.
def _alone_prefill(steps: list[tuple[float, float]]) -> float | None:
    return _weighted_median([(o / p, p) for o, p in steps if p > 0])


def _alone_decode(steps: list[tuple[float, float]]) -> float | None:
    predicted = sum(p for _, p in steps)
    return sum(o for o, _ in steps) / predicted if predicted > 0 else None


def _contention_prefill(steps: list[tuple[float, float, float]], alone: float) -> float | None:
    # each step: o = p * alone * (1 + (k - 1) * f), solved for k, weighted by p * f
    return _weighted_median([(1 + (o / (p * alone) - 1) / f, p * f) for o, p, f in steps])


def _contention_decode(steps: list[tuple[float, float, float]], alone: float) -> float | None:
    exposed = sum(p * alone * f for _, p, f in steps)
    if exposed <= 0:
        return None
    return 1 + (sum(o for o, _, _ in steps) - sum(p * alone for _, p, _ in steps)) / exposed


_ALONE = {"prefill": _alone_prefill, "decode": _alone_decode}
_CONTENTION = {"prefill": _contention_prefill, "decode": _contention_decode}
# A step the other pool overlapped for less than this counts as run alone.
ALONE_BELOW = 0.1


@dataclass(frozen=True)
class Calibration:
    """Per-phase profile correction for steps run alone, and the shared-host slow-down."""

    factors: dict[str, float]
    contention: HostContention
    steps: dict[str, int]  # "<phase>_alone" / "<phase>_overlap" -> number of steps


def calibrate(profile: LatencyProfile, prefill_records: Sequence[StepRecord],
              decode_records: Sequence[StepRecord], tp: int = 1, pp: int = 1) -> Calibration:
    """Fit each phase's lone-step correction and its contention factor ``k``.

    A step that the other pool overlapped for a fraction ``f`` of its duration is
    modelled as taking ``predicted * alone * (1 + (k - 1) * f)``, which is what the
    simulator applies (``HostContention``). Steps with ``f`` under ``ALONE_BELOW`` fit
    ``alone``; the others fit ``k``. A phase with no overlapped steps gets ``k`` = 1; one
    with no lone steps takes its correction from all its steps (and ``k`` = 1), so sparse
    data degrades to ``correction_factors``.
    """
    busy = {"prefill": _Busy(decode_records), "decode": _Busy(prefill_records)}
    alone_steps: dict[str, list[tuple[float, float]]] = {k: [] for k in PHASES}
    over_steps: dict[str, list[tuple[float, float, float]]] = {k: [] for k in PHASES}
    for r, x in _ratios(profile, [*prefill_records, *decode_records], tp, pp):
        f = busy[r.kind].fraction(r.start_s, r.start_s + r.duration_s)
        predicted = r.duration_s / x
        if f < ALONE_BELOW:
            alone_steps[r.kind].append((r.duration_s, predicted))
        else:
            over_steps[r.kind].append((r.duration_s, predicted, f))
    factors, slow = {}, {}
    for k in PHASES:
        alone = _ALONE[k](alone_steps[k])
        if alone is None:
            everything = [(o, p) for o, p, _ in over_steps[k]]
            factors[k], slow[k] = _ALONE[k](everything) or 1.0, 1.0
            continue
        factors[k] = alone
        kf = _CONTENTION[k](over_steps[k], alone) if over_steps[k] else None
        slow[k] = max(kf, 1e-3) if kf is not None else 1.0
    steps = {f"{k}_{w}": len(v) for k in PHASES
             for w, v in (("alone", alone_steps[k]), ("overlap", over_steps[k]))}
    return Calibration(factors, HostContention(**slow), steps)
