"""Engine values that cross process boundaries (worker -> router -> client), torch-free.

The router imports these without pulling in torch or the model code.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SampledToken:
    """One sampled token and, when requested, its log-probability information.

    ``logprob`` is the log-probability of ``token_id`` under the raw model distribution
    (``None`` unless ``params.logprobs`` is set). ``top_logprobs`` holds the
    ``params.logprobs`` most likely ``(token_id, logprob)`` pairs, highest first, and is
    empty when not requested.
    """

    token_id: int
    logprob: float | None
    top_logprobs: tuple[tuple[int, float], ...]
