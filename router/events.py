"""What the orchestrator yields to a protocol layer for each request: token events."""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.engine.messages import SampledToken
from pdserve.router.hops import AttemptStamps


@dataclass(frozen=True)
class TokenEvent:
    token_ids: tuple[int, ...]
    logprobs: tuple[SampledToken, ...]
    finish_reason: str | None  # engine FinishReason value on the last event
    # Set on the first event only: what the prefill worker measured.
    num_cached_tokens: int = 0
    prefill_queue_s: float = 0.0
    prefill_s: float = 0.0
    transfer_wait_s: float = 0.0
    decode_queue_s: float | None = None  # on the first decode event: start -> first token
    # On the first event: how the attempt that produced it spent its time (``hops.py``).
    stamps: AttemptStamps | None = None
    # On the first event: its decode worker prefilled the prompt (no prefill pool queue).
    prefilled_locally: bool = False
