"""Measure a model's step latencies on the hardware at hand and fit the latency model.

``profile_model(engine_config, options)`` is what ``pdserve profile`` runs. It loads the
model with the engine's own pieces (``load_model`` + ``build_runner``) and times what a
worker pays per step: ``runner.run(inputs)`` followed by the greedy ``Sampler`` call
(the prefill worker's KV sends are not included: they are modelled by the transfer
bandwidth, measured separately).

* Prefill grid: batches of 1 .. ``max_prefill_seqs`` prompts, lengths log-uniform in
  ``[min_prompt_len, max_prompt_len]`` (independently per prompt, so batches mix short
  and long prompts), at most ``max_batch_tokens`` tokens per batch.
* Decode grid: batch sizes 1 .. ``max_batch`` (log-uniform, both ends included), a
  batch centre context log-uniform in ``[min_context, max_context]`` and each sequence's
  context within a factor ``context_spread`` around it. Decode steps attend to a context
  that is "already there": block tables point at distinct random blocks of the cache
  (their content does not matter for timing), nothing is prefilled.
* Timing: ``torch.set_num_threads(threads)`` (recorded), ``torch.inference_mode``, a few
  warm-up steps, then ``warmup_passes`` discarded passes and ``reps`` timed passes over
  all points (prefill and decode together; decode points ``decode_repeat`` times a pass,
  their steps being short and noisier), each pass in a fresh random order so drift
  of a shared machine spreads over every point; a point's time is its median after
  dividing each step by the machine's slowdown of the moment, estimated from the steps
  around it (``drift_corrected_medians``).
* Fit: weighted least squares (``numpy.linalg.lstsq`` on rows scaled by ``1/measured``,
  i.e. relative error) on a seeded random training split (``1 - holdout``), with an
  exact non-negative refit (best feasible subset of columns) when a coefficient comes
  out negative, kept unless it is clearly less accurate in cross-validation. Errors
  (median, p90 of ``|predicted - measured| / measured``) are reported on the held-out
  points. Decode is fitted once for all batch sizes and as two regimes split at a batch
  size chosen by cross-validation on the training split; the two-regime fit is kept
  only if it lowers cross-validated and held-out error.
* ``measure_transfer_bandwidth`` times KV transfers of this model's KV shape per backend
  (sender in a spawned process for ``shm``, ``tcp`` and ``cuda_ipc``, in this process for
  ``inprocess``) and reports bytes/s medians.

``ProfileRun.to_profile()`` gives the ``LatencyProfile`` (tp = 1) with the raw
measurements, options and fit details in its ``extra``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import math
import multiprocessing as mp
import os
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from pdserve.engine.config import EngineConfig
from pdserve.engine.kv_cache import KVCacheSpec
from pdserve.engine.latency_profile import DecodeFit, LatencyProfile, ParallelEntry, PrefillFit

Progress = Callable[[str], None]

# A non-negative refit is kept unless the unconstrained fit's cross-validated error is
# lower by more than this factor ("accuracy matters more than signs").
_NONNEG_TOLERANCE = 1.10
# The two-regime decode fit must beat the single fit's cross-validated error by this.
_TWO_REGIME_GAIN = 0.95
_CV_FOLDS = 5


# -- options and data ---------------------------------------------------------------------

@dataclass(frozen=True)
class ProfileOptions:
    """What to measure and how. ``None`` limits are derived from the engine config."""

    prefill_points: int = 80
    decode_points: int = 120
    reps: int = 9
    decode_repeat: int = 3  # decode steps are short: time each this many times per pass
    warmup_passes: int = 1
    threads: int | None = 1  # torch intra-op threads; None leaves torch's setting alone
    min_prompt_len: int = 16
    max_prompt_len: int | None = None  # default min(2048, max_model_len)
    max_prefill_seqs: int = 8
    max_batch_tokens: int | None = None  # default max(max_num_batched_tokens, max_prompt_len)
    min_context: int = 16
    max_context: int | None = None  # default min(2048, max_model_len - 1)
    max_batch: int | None = None  # default min(64, max_num_seqs)
    context_spread: float = 4.0  # max/min context within one decode batch, at most
    wide_mix_points: int = 12  # decode diagnostics with unrelated contexts (not fitted)
    drift_window: int = 41  # steps per slowdown estimate (drift_corrected_medians); 0: off
    holdout: float = 0.25
    seed: int = 0
    backends: tuple[str, ...] | None = None  # None: inprocess, shm, tcp (+ cuda_ipc on CUDA)
    transfer_tokens: tuple[int, ...] = (512, 2048)
    transfer_reps: int = 7

    def __post_init__(self) -> None:
        if self.prefill_points < 8 or self.decode_points < 8:
            raise ValueError("prefill_points and decode_points must be >= 8")
        if min(self.reps, self.decode_repeat, self.transfer_reps) < 1 or self.warmup_passes < 0:
            raise ValueError("reps, decode_repeat and transfer_reps must be >= 1, "
                             "warmup_passes >= 0")
        if self.threads is not None and self.threads < 1:
            raise ValueError("threads must be >= 1")
        if self.min_prompt_len < 1 or self.min_context < 1:
            raise ValueError("min_prompt_len and min_context must be >= 1")
        for name in ("max_prompt_len", "max_batch_tokens", "max_context", "max_batch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_prefill_seqs < 1:
            raise ValueError("max_prefill_seqs must be >= 1")
        if self.context_spread < 1.0:
            raise ValueError("context_spread must be >= 1")
        if self.drift_window < 0:
            raise ValueError("drift_window must be >= 0")
        if self.wide_mix_points < 0:
            raise ValueError("wide_mix_points must be >= 0")
        if not 0.05 <= self.holdout <= 0.5:
            raise ValueError("holdout must be in [0.05, 0.5]")
        if any(t < 1 for t in self.transfer_tokens):
            raise ValueError("transfer_tokens must be >= 1")
        object.__setattr__(self, "transfer_tokens", tuple(self.transfer_tokens))
        if self.backends is not None:
            object.__setattr__(self, "backends", tuple(self.backends))

    @classmethod
    def quick(cls, **overrides) -> ProfileOptions:
        """A ~30 s run: fewer points and repetitions, same ranges."""
        base = dict(prefill_points=24, decode_points=36, reps=3, decode_repeat=2,
                    wide_mix_points=6, transfer_reps=3)
        return cls(**{**base, **overrides})


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


@dataclass(frozen=True)
class TransferBandwidth:
    """One backend: median seconds and bytes/s per transfer size; ``bytes_per_s`` is the
    median of the largest size (the stored bandwidth)."""

    backend: str
    bytes_per_s: float
    sizes: tuple[tuple[int, int, float, float], ...]  # (tokens, bytes, median s, bytes/s)
    samples: tuple[tuple[int, tuple[float, ...]], ...] = ()  # (tokens, seconds per rep)


# -- relative errors and fits ---------------------------------------------------------------

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


# -- the grids ------------------------------------------------------------------------------

def _log_uniform(rng: random.Random, lo: float, hi: float) -> float:
    return math.exp(rng.uniform(math.log(lo), math.log(hi))) if hi > lo else lo


def prefill_grid(n: int, rng: random.Random, min_len: int, max_len: int, max_seqs: int,
                 max_tokens: int) -> list[tuple[int, ...]]:
    """``n`` prefill batches; the first two are one shortest and one longest prompt."""
    max_len = min(max_len, max_tokens)
    min_len = min(min_len, max_len)
    shapes: list[tuple[int, ...]] = [(min_len,), (max_len,)]
    while len(shapes) < n:
        # Single prompts a third of the time, else 2 .. max_seqs prompts.
        k = 1 if max_seqs == 1 or rng.random() < 1 / 3 else rng.randint(2, max_seqs)
        k = max(1, min(k, max_tokens // min_len))
        # Draw the batch's total first (log-uniform), then independent lengths scaled to
        # fit it: totals cover the range evenly whatever k is.
        hi = min(max_tokens, k * max_len)
        total = _log_uniform(rng, k * min_len, hi) if hi > k * min_len else k * min_len
        lens = [_log_uniform(rng, min_len, max_len) for _ in range(k)]
        scale = total / sum(lens)
        lens = [min(max_len, max(min_len, round(x * scale))) for x in lens]
        while sum(lens) > max_tokens:
            i = lens.index(max(lens))
            lens[i] = max(min_len, lens[i] - (sum(lens) - max_tokens))
        shapes.append(tuple(lens))
    return shapes[:n]


def decode_grid(n: int, rng: random.Random, min_ctx: int, max_ctx: int, max_batch: int,
                spread: float) -> list[tuple[int, ...]]:
    """``n`` decode batches; corners (1 and ``max_batch`` sequences at both context
    ends) first, then log-uniform batch sizes and centres with contexts within
    ``spread`` of each other."""
    min_ctx = min(min_ctx, max_ctx)
    shapes: list[tuple[int, ...]] = [(min_ctx,), (max_ctx,), (min_ctx,) * max_batch,
                                     (max_ctx,) * max_batch]
    half = math.sqrt(spread)
    while len(shapes) < n:
        b = min(max_batch, max(1, round(_log_uniform(rng, 1, max_batch + 0.5) - 0.49)))
        centre = _log_uniform(rng, min_ctx, max_ctx)
        lo, hi = max(min_ctx, centre / half), min(max_ctx, centre * half)
        shapes.append(tuple(round(_log_uniform(rng, lo, hi)) for _ in range(b)))
    return shapes[:n]


def wide_mix_grid(n: int, rng: random.Random, min_ctx: int, max_ctx: int,
                  max_batch: int) -> list[tuple[int, ...]]:
    """Decode batches whose contexts are unrelated (each log-uniform over the range)."""
    shapes = []
    for _ in range(n):
        b = max(2, min(max_batch, round(_log_uniform(rng, 2, max_batch))))
        shapes.append(tuple(round(_log_uniform(rng, min_ctx, max_ctx)) for _ in range(b)))
    return shapes if max_batch > 1 else []


# -- timing worker steps --------------------------------------------------------------------

class StepTimer:
    """Times ``runner.run`` + greedy sampling for prefill or decode batch shapes."""

    def __init__(self, runner, vocab_size: int, seed: int):
        from pdserve.engine.sampler import Sampler
        from pdserve.engine.sampling_params import SamplingParams

        self.runner = runner
        self.sampler = Sampler()
        self.greedy = SamplingParams(max_tokens=1, temperature=0.0)
        self.block_size = runner.kv_cache.spec.block_size
        self.num_blocks = runner.kv_cache.spec.num_blocks
        self.vocab = vocab_size
        self.rng = random.Random(seed)
        self.cuda = runner.device.type == "cuda"

    def blocks_needed(self, tokens: Sequence[int]) -> int:
        return sum(-(-t // self.block_size) for t in tokens)

    def _tables(self, tokens: Sequence[int]) -> list[list[int]]:
        ids = self.rng.sample(range(self.num_blocks), self.blocks_needed(tokens))
        tables, at = [], 0
        for t in tokens:
            n = -(-t // self.block_size)
            tables.append(ids[at:at + n])
            at += n
        return tables

    def prefill_inputs(self, lens: Sequence[int]):
        from pdserve.engine.model_runner import ModelInput

        return [ModelInput([self.rng.randrange(self.vocab) for _ in range(n)], 0, table)
                for n, table in zip(lens, self._tables(lens), strict=True)]

    def decode_inputs(self, contexts: Sequence[int]):
        from pdserve.engine.model_runner import ModelInput

        # The new token goes at position ctx, so ctx + 1 slots are needed.
        tables = self._tables([c + 1 for c in contexts])
        return [ModelInput([self.rng.randrange(self.vocab)], c, table)
                for c, table in zip(contexts, tables, strict=True)]

    def time_ms(self, inputs) -> float:
        params, gens = [self.greedy] * len(inputs), [None] * len(inputs)
        with torch.inference_mode():
            if self.cuda:
                torch.cuda.synchronize(self.runner.device)
            t0 = time.perf_counter()
            logits = self.runner.run(inputs)
            self.sampler(logits, params, gens)  # .tolist() inside synchronises
            return (time.perf_counter() - t0) * 1e3


def measure_points(timer: StepTimer, inputs: Sequence, reps: int, warmup_passes: int,
                   rng: random.Random, progress: Progress | None = None,
                   repeat: Sequence[int] | None = None) -> list[tuple[int, int, float]]:
    """Timed steps in execution order as (pass, point index, ms): ``warmup_passes``
    discarded passes, then ``reps`` passes, each timing point ``i`` ``repeat[i]`` times
    (default once), all in a fresh random order."""
    log: list[tuple[int, int, float]] = []
    repeat = repeat or [1] * len(inputs)
    total = warmup_passes + reps
    for p in range(total):
        order = [i for i, k in enumerate(repeat) for _ in range(k)]
        rng.shuffle(order)
        t0 = time.perf_counter()
        for i in order:
            ms = timer.time_ms(inputs[i])
            if p >= warmup_passes:
                log.append((p - warmup_passes, i, ms))
        if progress is not None:
            kind = "warm-up pass" if p < warmup_passes else "pass"
            num = p + 1 if p < warmup_passes else p - warmup_passes + 1
            of = warmup_passes if p < warmup_passes else reps
            progress(f"{kind} {num}/{of}: {len(order)} steps in "
                     f"{time.perf_counter() - t0:.1f} s")
    return log


def drift_corrected_medians(log: Sequence[tuple[int, float]], n_points: int, window: int,
                            iters: int = 3) -> tuple[list[float], np.ndarray]:
    """Per-point median times after removing the machine's slowdown of the moment.

    On a shared host everything runs slower for a while when another process takes the
    cores. Because every pass visits the points in random order, the median over a
    step's ``window`` neighbours (in execution order) of ``time / its point's median``
    estimates that slowdown whatever the points are; each step is divided by it
    (normalised to a median of 1, so times stay at the run's typical level) before the
    per-point medians are taken. ``window <= 1`` turns the correction off. Returns the
    medians and the slowdown factor of every step of ``log``.
    """
    idx = np.array([i for i, _ in log], dtype=int)
    ms = np.array([m for _, m in log], dtype=float)
    groups = [np.flatnonzero(idx == k) for k in range(n_points)]
    drift = np.ones(len(ms))
    half = window // 2
    for _ in range(iters if window > 1 else 0):
        corrected = ms / drift
        meds = np.array([np.median(corrected[g]) for g in groups])
        ratio = ms / meds[idx]
        drift = np.array([np.median(ratio[max(0, j - half):j + half + 1])
                          for j in range(len(ms))])
        drift /= np.median(drift)
    corrected = ms / drift
    return [float(np.median(corrected[g])) for g in groups], drift


# -- KV transfer bandwidth ------------------------------------------------------------------

def default_backends(device: torch.device | str) -> tuple[str, ...]:
    cuda = torch.device(device).type == "cuda"
    return ("inprocess", "shm", "tcp") + (("cuda_ipc",) if cuda else ())


def _payload(spec: KVCacheSpec, tokens: int, device: torch.device | str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(tokens)
    n_blocks = -(-tokens // spec.block_size)
    shape = (2, n_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
    return [torch.randn(shape, generator=g).to(spec.dtype).to(device)
            for _ in range(spec.num_layers)]


def _transfer_child(backend: str, conn, threads: int, device: str) -> None:
    """Spawned sender: one transfer per command, answers (t_begin, t_finished)."""
    from pdserve.kv_transfer.base import KVDestination
    from pdserve.kv_transfer.registry import create_sender

    torch.set_num_threads(threads)
    sender = create_sender(backend)
    payloads: dict[int, list[torch.Tensor]] = {}
    try:
        while (cmd := conn.recv()) is not None:
            endpoint, tid, dst_ids, tokens = cmd
            try:
                spec = endpoint.spec.to_spec()
                layers = payloads.get(tokens) or payloads.setdefault(
                    tokens, _payload(spec, tokens, device))
                dest = KVDestination(tid, endpoint, tuple(dst_ids), tokens)
                t0 = time.perf_counter()
                t = sender.begin(dest, spec)
                for layer, kv in enumerate(layers):
                    sender.send_layer(t, layer, kv)
                sender.finish(t, timeout=120)
                conn.send((t0, time.perf_counter()))
            except Exception as exc:  # reported to the parent, which raises
                conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        sender.close()


class _SenderProcess:
    def __init__(self, backend: str, threads: int, device: str):
        ctx = mp.get_context("spawn")
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=_transfer_child, args=(backend, child_conn, threads,
                                                              device), daemon=True)
        self.proc.start()
        child_conn.close()

    def send(self, endpoint, tid: str, dst_ids: list[int], tokens: int) -> None:
        self.conn.send((endpoint, tid, dst_ids, tokens))

    def result(self, timeout: float = 300.0) -> tuple[float, float]:
        if not self.conn.poll(timeout):
            raise RuntimeError("the KV sender process did not answer")
        answer = self.conn.recv()
        if answer[0] == "error":
            raise RuntimeError(f"KV sender process: {answer[1]}")
        return answer

    def answered(self) -> bool:
        return self.conn.poll(0)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)


def _wait_delivered(receiver, tid: str, child: _SenderProcess, timeout: float = 300.0):
    """Block until the receiver sees ``tid`` finish; stop early if the sender gave up."""
    deadline = time.perf_counter() + timeout
    while True:
        state = receiver.wait(tid, 0.5)
        if state.terminal or time.perf_counter() > deadline:
            return state
        if child.answered() or not child.proc.is_alive():
            return receiver.wait(tid, 0.5)


def measure_transfer_bandwidth(spec: KVCacheSpec, backends: Sequence[str], *,
                               tokens: Sequence[int] = (512, 2048), reps: int = 7,
                               threads: int = 1, seed: int = 0,
                               device: torch.device | str = "cpu",
                               progress: Progress | None = None) -> dict[str, TransferBandwidth]:
    """Median bytes/s of moving ``tokens``-token KV transfers of ``spec``'s shape.

    The receiver (decode side) lives in this process with a cache of twice the largest
    transfer; destination blocks are a fresh random sample per repetition. Senders run
    in a spawned process (``inprocess``: in this process). Timed from the sender's
    ``begin`` to delivery: ``finish`` returning for direct-write backends, the receiver
    seeing DONE for ``tcp``. One discarded warm-up repetition, then ``reps``
    interleaved ones (backends in a rotating order).
    """
    from pdserve.kv_transfer.base import KVDestination, TransferState
    from pdserve.kv_transfer.registry import backend_classes, create_receiver, create_sender

    backends = tuple(backends)
    for b in backends:
        backend_classes(b)  # unknown names fail here, before anything starts
    if not backends:
        return {}
    sizes = tuple(sorted(set(tokens)))
    num_blocks = 2 * -(-max(sizes) // spec.block_size)
    rspec = replace(spec, num_blocks=num_blocks)
    dev = torch.device(device)
    cpu_dev = "cpu"
    receivers, children, local_sender = {}, {}, None
    payloads = {n: _payload(rspec, n, cpu_dev) for n in sizes} if "inprocess" in backends \
        else {}
    samples: dict[tuple[str, int], list[float]] = {(b, n): [] for b in backends for n in sizes}
    rng = random.Random(seed)
    try:
        for b in backends:
            rdev = dev if b == "cuda_ipc" else cpu_dev
            receivers[b] = create_receiver(b, rspec, f"profile-{b}", rdev)[0]
            if b == "inprocess":
                local_sender = create_sender(b)
            else:
                children[b] = _SenderProcess(b, threads, str(rdev))
        ids = itertools.count()
        for rep in range(-1, reps):
            order = backends[rep % len(backends):] + backends[:rep % len(backends)]
            for n in sizes:
                dst = rng.sample(range(num_blocks), -(-n // rspec.block_size))
                for b in order:
                    receiver = receivers[b]
                    tid = f"profile-{b}-{n}-{next(ids)}"
                    receiver.expect(tid, dst)
                    if b == "inprocess":
                        dest = KVDestination(tid, receiver.endpoint, tuple(dst), n)
                        t0 = time.perf_counter()
                        t = local_sender.begin(dest, rspec)
                        for layer, kv in enumerate(payloads[n]):
                            local_sender.send_layer(t, layer, kv)
                        local_sender.finish(t)
                        seconds = time.perf_counter() - t0
                    else:
                        children[b].send(receiver.endpoint, tid, dst, n)
                        if b == "tcp":
                            state = _wait_delivered(receiver, tid, children[b])
                            done = time.perf_counter()
                            t0, _ = children[b].result()
                            if state is not TransferState.DONE:
                                raise RuntimeError(f"tcp transfer {tid} ended {state}")
                            seconds = done - t0
                        else:
                            t0, t1 = children[b].result()
                            seconds = t1 - t0
                    receiver.forget(tid)
                    if rep >= 0:
                        samples[(b, n)].append(seconds)
            if progress is not None and rep >= 0:
                progress(f"transfer rep {rep + 1}/{reps} done")
    finally:
        for child in children.values():
            child.close()
        if local_sender is not None:
            local_sender.close()
        for receiver in receivers.values():
            receiver.close()
    out = {}
    for b in backends:
        rows = []
        for n in sizes:
            nbytes = rspec.tokens_to_bytes(-(-n // rspec.block_size) * rspec.block_size)
            med = statistics.median(samples[(b, n)])
            rows.append((n, nbytes, med, nbytes / med))
        out[b] = TransferBandwidth(b, rows[-1][3], tuple(rows),
                                   tuple((n, tuple(samples[(b, n)])) for n in sizes))
    return out


# -- the whole run --------------------------------------------------------------------------

def hardware_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from pdserve.benchmarks.hostinfo import cpu_model

    return cpu_model()


@dataclass(frozen=True)
class ProfileRun:
    """Everything one profiling run measured and fitted."""

    model: str
    hardware: str
    device: str
    dtype: str
    threads: int
    options: ProfileOptions
    kv_capacity_tokens: int
    kv_bytes_per_token: int
    prefill: tuple[Measurement, ...]
    decode: tuple[Measurement, ...]
    prefill_fit: PrefillFitResult
    decode_fit: DecodeFitResult
    wide_mix: tuple[Measurement, ...] = ()
    bandwidth: dict[str, TransferBandwidth] = field(default_factory=dict, compare=False)
    elapsed_s: float = 0.0
    info: dict = field(default_factory=dict, compare=False)

    @property
    def wide_mix_error(self) -> ErrorStats:
        fit = self.decode_fit.fit
        return ErrorStats.of(relative_errors([fit.ms(m.lens) for m in self.wide_mix],
                                             [m.ms for m in self.wide_mix]))

    def to_profile(self) -> LatencyProfile:
        entry = ParallelEntry(1, self.prefill_fit.fit, self.decode_fit.fit,
                              self.kv_capacity_tokens)
        pf, df = self.prefill_fit, self.decode_fit

        def points(ms: Sequence[Measurement], test: Sequence[int] = ()) -> list[dict]:
            held = set(test)
            return [{"lens": list(m.lens), "ms": m.ms, "samples_ms": list(m.samples),
                     "split": "test" if i in held else "train"} for i, m in enumerate(ms)]

        extra = {
            "profiler": {
                "pp": 1, "device": self.device, "dtype": self.dtype, "torch_threads": self.threads,
                "torch": torch.__version__, "elapsed_s": round(self.elapsed_s, 1),
                "options": asdict(self.options), **self.info,
            },
            "fit_details": {
                "metric": "|predicted - measured| / measured on held-out points",
                "prefill": {"heldout": asdict(pf.heldout), "train": asdict(pf.train_error),
                            "nonneg": pf.nonneg},
                "decode": {"heldout": asdict(df.heldout), "train": asdict(df.train_error),
                           "single_heldout": asdict(df.single_heldout),
                           "two_regime_heldout": asdict(df.two_regime_heldout)
                           if df.two_regime_heldout else None,
                           "two_regime": df.two_regime, "threshold": df.threshold,
                           "cv_mean_error_by_threshold": {str(t): e for t, e in df.cv},
                           "nonneg": df.nonneg},
                "decode_wide_mix": asdict(self.wide_mix_error),
            },
            "measurements": {"prefill": points(self.prefill, pf.test),
                             "decode": points(self.decode, df.test),
                             "decode_wide_mix": points(self.wide_mix)},
            "transfer_details": {b: {"sizes": [dict(zip(("tokens", "bytes", "median_s",
                                                           "bytes_per_s"), r, strict=True))
                                               for r in bw.sizes]}
                                 for b, bw in self.bandwidth.items()},
        }
        notes = (f"measured by pdserve profile: worker step = runner.run + greedy sampling, "
                 f"{self.threads} torch thread(s), median of {self.options.reps} interleaved "
                 "reps; transfer_bandwidth is the largest transfer's median "
                 f"({max(self.options.transfer_tokens)} tokens)")
        return LatencyProfile(
            self.model, self.hardware, (entry,), self.kv_bytes_per_token,
            tuple((b, bw.bytes_per_s) for b, bw in self.bandwidth.items()),
            (("prefill", pf.heldout.median), ("decode", df.heldout.median)), notes, extra)


def _limits(options: ProfileOptions, config: EngineConfig, max_model_len: int) -> dict:
    max_prompt = options.max_prompt_len or min(2048, max_model_len)
    max_prompt = min(max_prompt, max_model_len)
    max_tokens = options.max_batch_tokens or max(config.max_num_batched_tokens, max_prompt)
    max_ctx = min(options.max_context or min(2048, max_model_len - 1), max_model_len - 1)
    max_batch = options.max_batch or min(64, config.max_num_seqs)
    return {"max_prompt_len": max_prompt, "max_batch_tokens": max_tokens,
            "max_context": max_ctx, "max_batch": max_batch}


def profile_model(engine_config: EngineConfig, options: ProfileOptions | None = None,
                  progress: Progress | None = None) -> ProfileRun:
    """Measure, fit and (optionally) time KV transfers; see the module docstring."""
    from pdserve.engine.loader import build_runner, kv_cache_spec, load_model, num_kv_blocks

    options = options or ProfileOptions()
    say = progress or (lambda _msg: None)
    started = time.perf_counter()
    prev_threads = torch.get_num_threads()
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    try:
        loaded = load_model(engine_config, load_tokenizer=False)
        mc = loaded.model_config
        capacity = num_kv_blocks(loaded) * engine_config.block_size
        kv_bytes = mc.kv_bytes_per_token(torch.empty((), dtype=loaded.dtype).element_size())
        lim = _limits(options, engine_config, loaded.max_model_len)
        rng = random.Random(options.seed)
        prefill_shapes = prefill_grid(options.prefill_points, rng, options.min_prompt_len,
                                      lim["max_prompt_len"], options.max_prefill_seqs,
                                      lim["max_batch_tokens"])
        decode_shapes = decode_grid(options.decode_points, rng, options.min_context,
                                    lim["max_context"], lim["max_batch"],
                                    options.context_spread)
        wide_shapes = wide_mix_grid(options.wide_mix_points, rng, options.min_context,
                                    lim["max_context"], lim["max_batch"])
        bs = engine_config.block_size
        need = max([sum(-(-n // bs) for n in s) for s in prefill_shapes]
                   + [sum(-(-(c + 1) // bs) for c in s) for s in decode_shapes + wide_shapes])
        runner = build_runner(loaded, kv_cache_spec(loaded, num_blocks=need + 1))
        timer = StepTimer(runner, mc.vocab_size, options.seed)
        inputs = ([timer.prefill_inputs(s) for s in prefill_shapes]
                  + [timer.decode_inputs(s) for s in decode_shapes + wide_shapes])
        say(f"{Path(engine_config.model).name} on {loaded.device} ({loaded.dtype}), "
            f"{torch.get_num_threads()} thread(s): {len(prefill_shapes)} prefill + "
            f"{len(decode_shapes)} decode (+{len(wide_shapes)} wide-mix) points, "
            f"{options.reps} reps")
        for inp in (inputs[1], inputs[len(prefill_shapes) + 3], inputs[0]):
            for _ in range(2):
                timer.time_ms(inp)
        repeat = [1] * len(prefill_shapes) + [options.decode_repeat] * (
            len(decode_shapes) + len(wide_shapes))
        log = measure_points(timer, inputs, options.reps, options.warmup_passes,
                             random.Random(options.seed + 1), say, repeat)
        del runner, timer
        medians, drift = drift_corrected_medians([(i, t) for _, i, t in log], len(inputs),
                                                 options.drift_window)
        passes = np.array([p for p, _, _ in log])
        raw: list[list[float]] = [[] for _ in inputs]
        for _, i, t in log:
            raw[i].append(t)
        ms = [Measurement(s, m, t) for s, m, t in
              zip(prefill_shapes + decode_shapes + wide_shapes, medians, raw, strict=True)]
        n_pre, n_dec = len(prefill_shapes), len(decode_shapes)
        prefill, decode = tuple(ms[:n_pre]), tuple(ms[n_pre:n_pre + n_dec])
        wide = tuple(ms[n_pre + n_dec:])
        pf = fit_prefill(prefill, holdout=options.holdout, seed=options.seed)
        df = fit_decode(decode, holdout=options.holdout, seed=options.seed)
        backends = options.backends if options.backends is not None \
            else default_backends(loaded.device)
        bandwidth = {}
        if backends:
            say(f"KV transfer bandwidth: {', '.join(backends)}")
            bandwidth = measure_transfer_bandwidth(
                kv_cache_spec(loaded, num_blocks=1), backends, tokens=options.transfer_tokens,
                reps=options.transfer_reps, threads=torch.get_num_threads(),
                seed=options.seed, device=loaded.device, progress=say)
        info = {"date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "cpu_count": os.cpu_count(), "architecture": mc.architecture,
                "model_path": str(engine_config.model), "block_size": bs,
                "engine_config": asdict(engine_config), "limits": lim,
                "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
                "drift": {"window": options.drift_window,
                          "p10": float(np.quantile(drift, 0.1)),
                          "p90": float(np.quantile(drift, 0.9)),
                          "per_pass_median": [float(np.median(drift[passes == p]))
                                              for p in range(options.reps)]}}
        return ProfileRun(
            model=Path(engine_config.model).name, hardware=hardware_name(loaded.device),
            device=str(loaded.device), dtype=str(loaded.dtype).removeprefix("torch."),
            threads=torch.get_num_threads(), options=options, kv_capacity_tokens=capacity,
            kv_bytes_per_token=kv_bytes, prefill=prefill, decode=decode, prefill_fit=pf,
            decode_fit=df, wide_mix=wide, bandwidth=bandwidth,
            elapsed_s=time.perf_counter() - started, info=info)
    finally:
        torch.set_num_threads(prev_threads)
