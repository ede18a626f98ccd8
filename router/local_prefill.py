"""Conditional disaggregation: prefill a request on its decode worker, or on the prefill pool.

Disaggregation pays a KV transfer and a hop to the prefill pool for every request. For a
prompt whose uncached part is short that costs more than it saves, and when the prefill
pool is backed up the decode worker may produce the first token sooner itself (at the
price of one prefill-shaped step in its decode batch: the interference disaggregation
exists to avoid, so it is kept to short prompts and real queues). Dynamo's conditional
disaggregation and llm-d's P/D decider use the same two tests.

The rule, per request (``decide``):

- ``short``: the tokens the prefill pool would have to compute (prompt minus the blocks
  the KV-aware index expects it to hold, or the whole prompt) are at most
  ``max_local_tokens``: prefill locally;
- ``queue``: with ``wait_factor`` set and a latency profile, the best predicted TTFT on
  the prefill pool exceeds ``wait_factor`` times the predicted time to prefill the whole
  prompt on the decode worker (which holds no prefix cache), and the local prefill is at
  most ``max_queue_local_tokens`` tokens (a long prompt would stall every decode running
  there): prefill locally;
- otherwise ``remote``.

The router (``attempt.py``) and the simulator (``simulator/disagg.py``) both call
``decide``, so a rule judged on a trace is the rule that runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# decision labels (the metric's ``decision`` and ``reason`` values)
LOCAL = "local"
REMOTE = "remote"
REASONS = ("short", "queue", "remote", "off")


@dataclass(frozen=True)
class LocalPrefillConfig:
    """``max_local_tokens`` 0 and ``wait_factor`` None: never prefill locally (the
    default: every request is disaggregated)."""

    max_local_tokens: int = 0
    wait_factor: float | None = None
    max_queue_local_tokens: int = 2048

    def __post_init__(self) -> None:
        if self.max_local_tokens < 0:
            raise ValueError(f"local prefill threshold (max_local_tokens) must be >= 0 tokens, "
                             f"got {self.max_local_tokens}")
        if self.wait_factor is not None and not (math.isfinite(self.wait_factor)
                                                 and self.wait_factor >= 1.0):
            raise ValueError("local prefill wait_factor must be a finite number >= 1 (the "
                             "prefill pool's predicted TTFT must exceed the local prefill "
                             f"time by that factor), got {self.wait_factor!r}")
        if self.max_queue_local_tokens < 1:
            raise ValueError(f"max_queue_local_tokens must be >= 1, got "
                             f"{self.max_queue_local_tokens}")

    @property
    def enabled(self) -> bool:
        return self.max_local_tokens > 0 or self.wait_factor is not None

    @property
    def needs_profile(self) -> bool:
        return self.wait_factor is not None


@dataclass(frozen=True)
class Decision:
    where: str  # LOCAL or REMOTE
    reason: str  # one of REASONS

    @property
    def local(self) -> bool:
        return self.where == LOCAL


def decide(config: LocalPrefillConfig, prompt_tokens: int, uncached_tokens: int,
           remote_ttft_s: float | None, local_prefill_s: float | None) -> Decision:
    """Where to prefill one request. ``uncached_tokens``: what the prefill pool would
    compute (``prompt_tokens`` without a prefix index); ``remote_ttft_s``: the best
    predicted TTFT on the prefill pool; ``local_prefill_s``: the predicted time to prefill
    ``prompt_tokens`` on the decode worker (both None without a latency profile)."""
    if not config.enabled:
        return Decision(REMOTE, "off")
    if uncached_tokens <= config.max_local_tokens:
        return Decision(LOCAL, "short")
    if (config.wait_factor is not None and remote_ttft_s is not None
            and local_prefill_s is not None and prompt_tokens <= config.max_queue_local_tokens
            and remote_ttft_s > config.wait_factor * local_prefill_s):
        return Decision(LOCAL, "queue")
    return Decision(REMOTE, "remote")
