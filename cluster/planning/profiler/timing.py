"""Timing worker steps on a loaded model: ``StepTimer``, the timed passes, drift correction.

A step is what a worker pays per step: ``runner.run(inputs)`` followed by the greedy
``Sampler`` call (a prefill worker's KV sends are not included: they are modelled by the
transfer bandwidth, measured in ``bandwidth``). Decode steps attend to a context that is
"already there": block tables point at distinct random blocks of the cache (their
content does not matter for timing), nothing is prefilled. ``measure_points`` runs
``warmup_passes`` discarded passes and ``reps`` timed passes over all points, each pass
in a fresh random order so drift of a shared machine spreads over every point;
``drift_corrected_medians`` then takes a point's time as its median after dividing each
step by the machine's slowdown of the moment, estimated from the steps around it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

Progress = Callable[[str], None]


class StepTimer:
    """Times ``runner.run`` + greedy sampling for prefill or decode batch shapes."""

    def __init__(self, runner, vocab_size: int, seed: int):
        from pdserve.engine.sampler import Sampler
        from pdserve.engine.sampling_params import SamplingParams

        self.runner = runner
        self.sampler = Sampler()
        self.greedy = SamplingParams(max_tokens=1, temperature=0.0)
        self.block_size = runner.kv_cache.spec.block_size
        self.num_blocks = runner.usable_blocks  # never the CUDA graphs' scratch block
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
