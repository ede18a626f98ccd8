"""Fitting the latency model to measured step times, and its held-out error.

Weighted least squares (``numpy.linalg.lstsq`` on rows scaled by ``1/measured``, i.e.
relative error) on a seeded random training split (``1 - holdout``), with an exact
non-negative refit (best feasible subset of columns) when a coefficient comes out
negative, kept unless it is clearly less accurate in cross-validation. Errors (median,
p90 of ``|predicted - measured| / measured``) are reported on the held-out points.
Prefill is fitted as ``a + b*sum(l) + c*sum(l^2)``; decode as ``a + b*sum(ctx+1) + c*B``,
once for all batch sizes and as two regimes split at a batch size chosen by
cross-validation on the training split; the two-regime fit is kept only if it lowers
cross-validated and held-out error. Pure numpy: nothing here touches a model.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from pdserve.engine.latency_profile import DecodeFit, PrefillFit

# A non-negative refit is kept unless the unconstrained fit's cross-validated error is
# lower by more than this factor ("accuracy matters more than signs").
_NONNEG_TOLERANCE = 1.10
# The two-regime decode fit must beat the single fit's cross-validated error by this.
_TWO_REGIME_GAIN = 0.95
_CV_FOLDS = 5


@dataclass(frozen=True)
class Measurement:
    """One batch shape's step time: ``lens`` are the prompt lengths (prefill) or contexts
    (decode); ``ms`` the (drift-corrected) median, ``samples`` the raw timings."""

    lens: tuple[int, ...]
    ms: float
    samples: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "lens", tuple(int(x) for x in self.lens))
        object.__setattr__(self, "samples", tuple(float(x) for x in self.samples))
        if not self.lens or min(self.lens) < 1:
            raise ValueError("a measurement needs at least one length, all >= 1")
        if not (self.ms > 0 and math.isfinite(self.ms)):
            raise ValueError(f"ms must be positive and finite, got {self.ms!r}")


@dataclass(frozen=True)
class ErrorStats:
    """Absolute relative errors ``|predicted - measured| / measured`` over ``n`` points."""

    median: float
    p90: float
    max: float
    n: int

    @classmethod
    def of(cls, rel_errors: Sequence[float]) -> ErrorStats:
        e = np.asarray(rel_errors, dtype=float)
        if e.size == 0:
            return cls(float("nan"), float("nan"), float("nan"), 0)
        return cls(float(np.median(e)), float(np.quantile(e, 0.9)), float(e.max()), int(e.size))


@dataclass(frozen=True)
class PrefillFitResult:
    fit: PrefillFit
    train: tuple[int, ...]  # indices into the points
    test: tuple[int, ...]
    heldout: ErrorStats
    train_error: ErrorStats
    nonneg: bool  # the stored coefficients come from the non-negative refit


@dataclass(frozen=True)
class DecodeFitResult:
    fit: DecodeFit
    train: tuple[int, ...]
    test: tuple[int, ...]
    heldout: ErrorStats
    train_error: ErrorStats
    single_heldout: ErrorStats
    two_regime_heldout: ErrorStats | None
    threshold: int | None  # batch size where the large-batch regime starts (if kept)
    cv: tuple[tuple[int, float], ...]  # (threshold, cv error); threshold 0 = single fit
    nonneg: bool

    @property
    def two_regime(self) -> bool:
        return self.fit.large is not None


def prefill_features(lens: Sequence[int]) -> list[float]:
    return [1.0, float(sum(lens)), float(sum(x * x for x in lens))]


def decode_features(lens: Sequence[int]) -> list[float]:
    return [1.0, float(sum(lens) + len(lens)), float(len(lens))]


def relative_errors(predicted: Sequence[float], measured: Sequence[float]) -> np.ndarray:
    p, m = np.asarray(predicted, dtype=float), np.asarray(measured, dtype=float)
    return np.abs(p - m) / m


def split_indices(n: int, holdout: float, seed: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Seeded random (train, test) split with ``round(n * holdout)`` test points (>= 1)."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_test = min(n - 1, max(1, round(n * holdout)))
    return tuple(sorted(order[n_test:])), tuple(sorted(order[:n_test]))


def _wls(x: np.ndarray, y: np.ndarray, cols: Sequence[int]) -> np.ndarray:
    """Least squares of relative residuals on the given columns (others zero)."""
    coef = np.zeros(x.shape[1])
    if not cols:
        return coef
    a = x[:, cols] / y[:, None]
    scale = np.abs(a).max(axis=0)
    scale[scale == 0] = 1.0
    sol, *_ = np.linalg.lstsq(a / scale, np.ones(len(y)), rcond=None)
    coef[list(cols)] = sol / scale
    return coef


def _nnls(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Exact non-negative weighted least squares for a handful of columns: the best
    feasible unconstrained solution over every subset of columns."""
    best, best_res = np.zeros(x.shape[1]), math.inf
    k = x.shape[1]
    for r in range(1, k + 1):
        for cols in itertools.combinations(range(k), r):
            coef = _wls(x, y, cols)
            if (coef < 0).any():
                continue
            res = float(np.sum(((x @ coef) - y) ** 2 / y ** 2))
            if res < best_res:
                best, best_res = coef, res
    return best


def _folds(n: int, seed: int) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    return [order[i::_CV_FOLDS] for i in range(min(_CV_FOLDS, n))]


def _cv_error(x: np.ndarray, y: np.ndarray, solver: Callable[[np.ndarray, np.ndarray],
              np.ndarray], seed: int) -> float:
    """Mean absolute relative error of out-of-fold predictions."""
    errs = []
    for fold in _folds(len(y), seed):
        keep = np.setdiff1d(np.arange(len(y)), fold)
        if len(keep) < x.shape[1]:
            continue
        coef = solver(x[keep], y[keep])
        errs.extend(relative_errors(x[fold] @ coef, y[fold]))
    return float(np.mean(errs)) if errs else math.inf


def _solve(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[np.ndarray, bool]:
    """Unconstrained fit, or its non-negative refit unless that is clearly worse."""
    free = _wls(x, y, range(x.shape[1]))
    if (free >= 0).all():
        return free, True
    free_cv = _cv_error(x, y, lambda a, b: _wls(a, b, range(a.shape[1])), seed)
    nonneg_cv = _cv_error(x, y, _nnls, seed)
    if nonneg_cv <= free_cv * _NONNEG_TOLERANCE:
        return _nnls(x, y), True
    return free, False


def _matrix(points: Sequence[Measurement], features) -> tuple[np.ndarray, np.ndarray]:
    if len(points) < 4:
        raise ValueError(f"need at least 4 measurements to fit, got {len(points)}")
    x = np.array([features(p.lens) for p in points], dtype=float)
    y = np.array([p.ms for p in points], dtype=float)
    return x, y


def fit_prefill(points: Sequence[Measurement], *, holdout: float = 0.25,
                seed: int = 0) -> PrefillFitResult:
    """Fit ``a + b*sum(l) + c*sum(l^2)`` on a training split, report held-out error."""
    x, y = _matrix(points, prefill_features)
    train, test = split_indices(len(points), holdout, seed)
    tr, te = np.array(train), np.array(test)
    coef, nonneg = _solve(x[tr], y[tr], seed)
    fit = PrefillFit(*(float(c) for c in coef))
    return PrefillFitResult(fit, train, test,
                            ErrorStats.of(relative_errors(x[te] @ coef, y[te])),
                            ErrorStats.of(relative_errors(x[tr] @ coef, y[tr])), nonneg)


def _two_regime_solver(threshold: int, seed: int):
    def solve(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        small = x[:, 2] < threshold
        return np.stack([_solve(x[small], y[small], seed)[0],
                         _solve(x[~small], y[~small], seed)[0]])
    return solve


def _predict_two(x: np.ndarray, coefs: np.ndarray, threshold: int) -> np.ndarray:
    return np.where(x[:, 2] < threshold, x @ coefs[0], x @ coefs[1])


def _cv_two_regime(x: np.ndarray, y: np.ndarray, threshold: int, seed: int) -> float:
    errs = []
    solver = _two_regime_solver(threshold, seed)
    for fold in _folds(len(y), seed):
        keep = np.setdiff1d(np.arange(len(y)), fold)
        small = x[keep, 2] < threshold
        if min(small.sum(), (~small).sum()) < x.shape[1] + 1:
            return math.inf
        coefs = solver(x[keep], y[keep])
        errs.extend(relative_errors(_predict_two(x[fold], coefs, threshold), y[fold]))
    return float(np.mean(errs))


def fit_decode(points: Sequence[Measurement], *, holdout: float = 0.25, seed: int = 0,
               min_regime_points: int = 6) -> DecodeFitResult:
    """Fit ``a + b*sum(ctx+1) + c*B``, once and as small/large-batch regimes.

    The regime threshold is the batch size with the lowest cross-validated error on the
    training split; the two-regime fit is kept only when it beats the single fit in
    cross-validation (by 5%) and on the held-out points.
    """
    x, y = _matrix(points, decode_features)
    train, test = split_indices(len(points), holdout, seed)
    tr, te = np.array(train), np.array(test)
    xt, yt = x[tr], y[tr]
    single, nonneg = _solve(xt, yt, seed)
    single_cv = _cv_error(xt, yt, lambda a, b: _solve(a, b, seed)[0], seed)
    cv: list[tuple[int, float]] = [(0, single_cv)]
    batch = xt[:, 2]
    for t in sorted({int(b) for b in batch}):
        n_small = int((batch < t).sum())
        if min(n_small, len(batch) - n_small) < max(min_regime_points, 4):
            continue
        cv.append((t, _cv_two_regime(xt, yt, t, seed)))
    single_err = relative_errors(x[te] @ single, y[te])
    best_t, best_cv = min(cv[1:], key=lambda kv: kv[1], default=(None, math.inf))
    two_stats = None
    fit = DecodeFit(*(float(c) for c in single))
    chosen_err, chosen_coefs = single_err, [single]
    if best_t is not None and math.isfinite(best_cv):
        coefs = _two_regime_solver(best_t, seed)(xt, yt)
        two_err = relative_errors(_predict_two(x[te], coefs, best_t), y[te])
        two_stats = ErrorStats.of(two_err)
        if best_cv < single_cv * _TWO_REGIME_GAIN and np.median(two_err) < np.median(single_err):
            fit = DecodeFit(*(float(c) for c in coefs[0]),
                            large=tuple(float(c) for c in coefs[1]), large_batch=best_t)
            chosen_err, chosen_coefs = two_err, list(coefs)
    pred_train = np.array([fit.ms(points[i].lens) for i in train])
    return DecodeFitResult(
        fit, train, test, ErrorStats.of(chosen_err), ErrorStats.of(relative_errors(pred_train, yt)),
        ErrorStats.of(single_err), two_stats, fit.large_batch if fit.large else None,
        tuple(cv), nonneg and all((c >= 0).all() for c in chosen_coefs))
