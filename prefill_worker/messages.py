"""Typed messages between the router and a prefill worker."""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.engine.messages import SampledToken
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kv_transfer.messages import KVDestination, KVDigest


@dataclass(frozen=True)
class PrefillRequest:
    """Prefill ``prompt_token_ids``, sample the first token, write KV to ``destination``.

    ``destination`` is None when nothing decodes afterwards (the first token already
    finishes the request, or the worker runs colocated and keeps its own KV).
    """

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    destination: KVDestination | None

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("prompt_token_ids must not be empty")
        if self.destination is not None and self.destination.transfer_id != self.request_id:
            raise ValueError("destination.transfer_id must equal request_id")


@dataclass(frozen=True)
class PrefillResult:
    """The first token, or the error that prevented it (``token`` None)."""

    request_id: str
    token: SampledToken | None
    finish_reason: str | None  # engine FinishReason value when the first token ends the request
    num_cached_tokens: int = 0
    queue_s: float = 0.0  # arrival at the worker -> first scheduled
    prefill_s: float = 0.0  # first scheduled -> first token sampled
    transfer_wait_s: float = 0.0  # after sampling, waiting for the KV transfer to finish
    error: str | None = None
    kv_digest: KVDigest | None = None  # of the KV written (None: checksums off, or no KV)

    @property
    def ok(self) -> bool:
        return self.error is None and self.token is not None


@dataclass(frozen=True)
class PrefillStats:
    worker_id: str
    num_waiting: int
    num_running: int
    waiting_tokens: int  # prompt tokens not yet computed (queue depth in tokens)
    kv_usage: float
    num_free_blocks: int
    num_blocks: int
    prefix_hit_tokens: int
    prefix_query_tokens: int
    completed: int
    failed: int
    incarnation: str = ""  # this life of the worker process
