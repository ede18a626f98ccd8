"""Service-level objectives: TTFT and TPOT targets and the share of requests that must meet them.

One ``SloConfig`` per deployment (CLI / plan), overridable per request (the API's
``SloTargets``). TPOT of a request = (time of last token - time of first token) /
(output tokens - 1); a request with one output token meets TPOT trivially.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class SloConfig:
    ttft_s: float = 1.0
    tpot_s: float = 0.1
    attainment: float = 0.9  # share of requests that must meet both targets

    def __post_init__(self) -> None:
        for name in ("ttft_s", "tpot_s"):
            v = getattr(self, name)
            if not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be positive and finite, got {v!r}")
        if not (0.0 < self.attainment <= 1.0):
            raise ValueError(f"attainment must be in (0, 1], got {self.attainment!r}")

    def with_overrides(self, ttft_s: float | None, tpot_s: float | None) -> SloConfig:
        return SloConfig(ttft_s if ttft_s is not None else self.ttft_s,
                         tpot_s if tpot_s is not None else self.tpot_s, self.attainment)

    def met(self, ttft_s: float, tpot_s: float | None) -> bool:
        return ttft_s <= self.ttft_s and (tpot_s is None or tpot_s <= self.tpot_s)


def tpot(first_token_s: float, last_token_s: float, num_output_tokens: int) -> float | None:
    """Mean time per output token after the first; None for single-token outputs."""
    if num_output_tokens < 2:
        return None
    return (last_token_s - first_token_s) / (num_output_tokens - 1)
