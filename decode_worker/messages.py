"""Typed messages between the router and a decode worker."""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.engine.messages import SampledToken
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kv_transfer.messages import KVDestination, KVDigest


class NoCapacityError(RuntimeError):
    """The worker cannot hold this request's KV now (retry elsewhere or later)."""


class ReservationLost(RuntimeError):
    """``start`` names a request this worker holds no reservation for: it was reserved on
    an earlier incarnation (the worker restarted), or released (lease, cancel). Another
    attempt, reserved anew, can succeed."""


@dataclass(frozen=True)
class ReserveRequest:
    """Reserve KV blocks for a prompt of ``num_prompt_tokens`` tokens (no KV moves yet)."""

    request_id: str
    num_prompt_tokens: int

    def __post_init__(self) -> None:
        if self.num_prompt_tokens < 1:
            raise ValueError("num_prompt_tokens must be >= 1")


@dataclass(frozen=True)
class Reservation:
    destination: KVDestination
    # When the worker reserved (time.monotonic(): CLOCK_MONOTONIC, comparable with the
    # router's clock on the same host), for the router's timing of the round trip.
    reserved_at: float = 0.0


@dataclass(frozen=True)
class ColocatedRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams


@dataclass(frozen=True)
class LocalPrefillRequest:
    """Prefill this prompt here, on the decode worker, and decode on (conditional
    disaggregation, ``router/local_prefill.py``): no prefill worker and no KV transfer.
    Its first token, like the rest, comes through the worker's ``TokenBatch`` stream."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("prompt_token_ids must not be empty")


@dataclass(frozen=True)
class StartDecode:
    """The prefill worker has written the KV and sampled ``first_token``: decode the rest.

    ``incarnation`` is the decode cache incarnation the blocks were reserved on;
    ``kv_digest`` what the prefill worker (``prefill_worker``) wrote, verified before the
    request is admitted (None: checksums off)."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    first_token: SampledToken
    incarnation: str = ""
    kv_digest: KVDigest | None = None
    prefill_worker: str = ""


@dataclass(frozen=True)
class TokenDelta:
    """New tokens of one request from one decode step; ``finish_reason`` on the last."""

    request_id: str
    token_ids: tuple[int, ...]
    logprobs: tuple[SampledToken, ...] = ()
    finish_reason: str | None = None  # engine FinishReason value
    error: str | None = None


@dataclass(frozen=True)
class TokenBatch:
    """Everything one decode step produced: one message per step, not one per token."""

    worker_id: str
    step: int
    deltas: tuple[TokenDelta, ...]


@dataclass(frozen=True)
class DecodeStats:
    worker_id: str
    num_reserved: int  # reservations waiting for their KV / start
    num_running: int
    num_waiting: int  # preempted, waiting to be recomputed
    kv_usage: float
    num_free_blocks: int
    num_blocks: int
    num_used_blocks: int
    steps: int
    block_size: int = 16
    incarnation: str = ""  # of the worker's KV cache: changes when the worker restarts
    max_num_seqs: int = 0  # requests it holds at most, reserved or running (0: unknown)
