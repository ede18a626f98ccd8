"""Turn one step of logits into one token per request.

Contract:

* ``Sampler()(logits, params, generators)`` takes ``logits`` of shape ``[B, V]`` (any
  float dtype; all maths runs in float32), one ``SamplingParams`` per row and one
  ``torch.Generator | None`` per row, and returns one ``SampledToken`` per row, in order.
* Greedy rows (``temperature == 0``) take ``argmax`` (ties go to the lowest token id).
* Random rows divide by ``temperature``, go through :func:`apply_top_k_top_p`, and draw
  from the resulting softmax. A row with a generator draws only from that generator, so a
  seeded request gets the same tokens whatever else shares its batch; rows without one use
  torch's global RNG.
* A row whose request is still below its ``min_tokens`` (``output_counts`` says how many
  tokens it has) cannot draw an end-of-sequence id or one of its ``stop_token_ids``:
  their logits are masked before greedy or random selection.
* Log-probabilities always describe the raw model distribution (``log_softmax`` of the
  logits before temperature, filtering and ``min_tokens`` masking) and are computed only
  when some row asks.
* Results are plain Python ints and floats: the caller ships them over the wire.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from pdserve.engine.messages import SampledToken
from pdserve.engine.sampling_params import SamplingParams


def step_generator(seed: int | None, step: int,
                   device: torch.device | str = "cpu") -> torch.Generator | None:
    """The generator for output token number ``step`` of a request seeded with ``seed``.

    Deriving a fresh generator per token (instead of keeping one stream per request)
    makes token k's draw a function of (seed, k) alone, so a request sampled partly on
    a prefill worker and partly on a decode worker (or recomputed after preemption)
    draws exactly what the single-process engine draws.
    """
    if seed is None:
        return None
    mixed = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9) % (1 << 63)
    return make_generator(mixed, device)


def next_token_generator(params, num_output_tokens: int,
                         device: torch.device | str = "cpu") -> torch.Generator | None:
    """The generator for a request's next output token: ``step_generator`` numbered from
    ``params.output_offset`` (tokens produced before a resumed request began)."""
    return step_generator(params.seed, params.output_offset + num_output_tokens, device)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """Return a ``torch.Generator`` on ``device`` seeded with ``seed``, or ``None``.

    The caller keeps one generator per request for the request's whole life, so the
    request's draws form one reproducible stream independent of batch composition.
    """
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Mask logits outside each row's top-k / nucleus set with ``-inf``.

    ``logits`` is ``[B, V]``; ``top_k`` is ``[B]`` int64 where ``<= 0`` or ``>= V``
    disables top-k for that row; ``top_p`` is ``[B]`` float where ``1.0`` disables top-p.
    Top-k runs first; top-p then keeps the smallest set of most likely tokens whose
    cumulative probability under the top-k-renormalised distribution reaches ``top_p``.
    The most likely token always survives. The input tensor is not modified.
    """
    vocab = logits.shape[-1]
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    positions = torch.arange(vocab, device=logits.device)

    k = top_k.to(device=logits.device, dtype=torch.long)
    k = torch.where((k <= 0) | (k >= vocab), torch.full_like(k, vocab), k)
    # Masking by sorted position (not by value threshold) keeps exactly k tokens even
    # when logits tie at the boundary.
    sorted_mask = positions.unsqueeze(0) >= k.unsqueeze(1)

    p = top_p.to(device=logits.device, dtype=torch.float32)
    # Softmax over the top-k survivors gives the renormalised distribution directly.
    probs = sorted_logits.float().masked_fill(sorted_mask, float("-inf")).softmax(dim=-1)
    # A token is needed while the mass strictly before it is still short of top_p; the
    # first token has zero mass before it, so it is always kept.
    mass_before = probs.cumsum(dim=-1) - probs
    nucleus_mask = mass_before >= p.unsqueeze(1)
    # Rows with top_p == 1 are skipped explicitly: float rounding can push the cumulative
    # sum to 1.0 before the tail and would otherwise drop low-probability tokens.
    nucleus_mask &= (p < 1.0).unsqueeze(1)
    sorted_mask |= nucleus_mask

    mask = torch.empty_like(sorted_mask).scatter_(-1, sorted_idx, sorted_mask)
    return logits.masked_fill(mask, float("-inf"))


class Sampler:
    """Stateless per-step sampler; see the module docstring for the contract.

    ``eos_token_ids``: the model's end-of-sequence ids, masked for ``min_tokens``."""

    def __init__(self, eos_token_ids: Iterable[int] = ()):
        self.eos_token_ids = tuple(sorted(set(eos_token_ids)))

    def __call__(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        output_counts: Sequence[int] | None = None,
    ) -> list[SampledToken]:
        """Sample one token per row of ``logits`` according to ``params``; ``output_counts``
        (tokens each row's request has generated so far) enables ``min_tokens``."""
        if logits.dim() != 2:
            raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
        batch, vocab = logits.shape
        if len(params) != batch or len(generators) != batch:
            raise ValueError(
                f"got {batch} logit rows, {len(params)} params and {len(generators)} generators"
            )
        if batch == 0:
            return []

        device = logits.device
        logits = logits.float()
        raw = logits
        if output_counts is not None:
            logits = self._mask_min_tokens(logits, params, output_counts)
        token_ids = torch.empty(batch, dtype=torch.long, device=device)

        greedy_rows = [i for i, p in enumerate(params) if p.greedy]
        random_rows = [i for i, p in enumerate(params) if not p.greedy]

        if greedy_rows:
            idx = torch.tensor(greedy_rows, dtype=torch.long, device=device)
            token_ids[idx] = logits[idx].argmax(dim=-1)

        if random_rows:
            token_ids[torch.tensor(random_rows, dtype=torch.long, device=device)] = (
                self._sample_random(logits, random_rows, params, generators)
            )

        logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        token_list: list[int] = token_ids.tolist()
        if not logprob_rows:
            return [SampledToken(t, None, ()) for t in token_list]
        return self._with_logprobs(raw, token_ids, token_list, logprob_rows, params)

    def _mask_min_tokens(self, logits: torch.Tensor, params: Sequence[SamplingParams],
                         output_counts: Sequence[int]) -> torch.Tensor:
        """``logits`` with each young row's stop ids at -inf (a copy, only if any row is)."""
        rows: list[int] = []
        cols: list[int] = []
        vocab = logits.shape[-1]
        for i, (p, n) in enumerate(zip(params, output_counts, strict=True)):
            if p.below_min_tokens(n):
                banned = set(p.stop_token_ids) | set(self.eos_token_ids)
                ids = [t for t in banned if t < vocab]
                rows += [i] * len(ids)
                cols += ids
        if not rows:
            return logits
        masked = logits.clone()
        masked[torch.tensor(rows, device=logits.device),
               torch.tensor(cols, device=logits.device)] = float("-inf")
        return masked

    @staticmethod
    def _sample_random(
        logits: torch.Tensor,
        rows: list[int],
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
    ) -> torch.Tensor:
        device = logits.device
        vocab = logits.shape[-1]
        idx = torch.tensor(rows, dtype=torch.long, device=device)
        temps = torch.tensor([params[i].temperature for i in rows], device=device)
        scaled = logits[idx] / temps.unsqueeze(1)

        # Deciding on the host avoids a full-vocabulary sort when no row filters.
        if any(0 < params[i].top_k < vocab or params[i].top_p < 1.0 for i in rows):
            top_k = torch.tensor([params[i].top_k for i in rows], dtype=torch.long, device=device)
            top_p = torch.tensor([params[i].top_p for i in rows], device=device)
            scaled = apply_top_k_top_p(scaled, top_k, top_p)
        probs = scaled.softmax(dim=-1)

        out = torch.empty(len(rows), dtype=torch.long, device=device)
        unseeded = [j for j, i in enumerate(rows) if generators[i] is None]
        if unseeded:
            sel = torch.tensor(unseeded, dtype=torch.long, device=device)
            out[sel] = torch.multinomial(probs[sel], 1).squeeze(1)
        # Each seeded row draws alone from its own generator so that the number of draws
        # taken from it never depends on the rest of the batch.
        for j, i in enumerate(rows):
            generator = generators[i]
            if generator is not None:
                out[j] = torch.multinomial(probs[j], 1, generator=generator)[0]
        return out

    @staticmethod
    def _with_logprobs(
        logits: torch.Tensor,
        token_ids: torch.Tensor,
        token_list: list[int],
        rows: list[int],
        params: Sequence[SamplingParams],
    ) -> list[SampledToken]:
        device = logits.device
        idx = torch.tensor(rows, dtype=torch.long, device=device)
        logprobs = torch.log_softmax(logits[idx], dim=-1)
        chosen = logprobs.gather(1, token_ids[idx].unsqueeze(1)).squeeze(1).tolist()

        # One topk for all rows at the largest requested width; each row keeps its prefix.
        width = min(max(params[i].logprobs or 0 for i in rows), logits.shape[-1])
        top_vals_list: list[list[float]] = []
        top_ids_list: list[list[int]] = []
        if width > 0:
            top_vals, top_ids = logprobs.topk(width, dim=-1)
            top_vals_list, top_ids_list = top_vals.tolist(), top_ids.tolist()

        extra: dict[int, tuple[float, tuple[tuple[int, float], ...]]] = {}
        for j, i in enumerate(rows):
            n = params[i].logprobs or 0
            top: tuple[tuple[int, float], ...] = ()
            if n > 0:
                top = tuple(zip(top_ids_list[j][:n], top_vals_list[j][:n], strict=True))
            extra[i] = (chosen[j], top)

        result = []
        for i, t in enumerate(token_list):
            if i in extra:
                result.append(SampledToken(t, extra[i][0], extra[i][1]))
            else:
                result.append(SampledToken(t, None, ()))
        return result
