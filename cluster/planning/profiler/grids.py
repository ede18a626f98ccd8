"""The batch shapes ``pdserve profile`` times: prefill, decode and wide-mix decode grids.

* Prefill: batches of 1 .. ``max_prefill_seqs`` prompts, lengths log-uniform in
  ``[min_prompt_len, max_prompt_len]`` (independently per prompt, so batches mix short
  and long prompts), at most ``max_batch_tokens`` tokens per batch.
* Decode: batch sizes 1 .. ``max_batch`` (log-uniform, both ends included), a batch
  centre context log-uniform in ``[min_context, max_context]`` and each sequence's
  context within a factor ``context_spread`` around it.
* Wide mix: decode batches whose contexts are unrelated, a diagnostic that is not fitted.

Every grid draws from the ``random.Random`` it is given, so a seed fixes the shapes.
"""

from __future__ import annotations

import math
import random


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
