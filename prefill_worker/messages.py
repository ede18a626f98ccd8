"""Typed messages between the router and a prefill worker.

Times are ``time.monotonic()`` seconds: CLOCK_MONOTONIC on Linux, one clock for every
process of a host, so the router subtracts a worker's timestamps from its own to time the
hops between them (on one host only: each host's clock starts at its own boot).
"""

from __future__ import annotations

from dataclasses import dataclass

from pdserve.engine.messages import SampledToken
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kv_transfer.messages import KVDestination, KVDigest


@dataclass(frozen=True)
class PrefillRequest:
    """Prefill ``prompt_token_ids``, sample the first token, write KV to ``destination``.

    ``destination`` is None when nothing decodes afterwards (the first token already
    finishes the request, or the worker runs colocated and keeps its own KV), or when
    ``destination_follows``: the router sends the prompt while it is still reserving the
    decode blocks, and the destination afterwards (``PrefillHost.set_destination``). The
    worker then computes the prompt at once and writes the KV when the destination is
    there (from the layer it arrives at, catching up on the earlier ones; or after the
    step, holding the prompt's blocks until then); the result waits for the KV as always,
    unless the first token already finishes the request.
    """

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    destination: KVDestination | None
    destination_follows: bool = False

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("prompt_token_ids must not be empty")
        if self.destination is not None and self.destination.transfer_id != self.request_id:
            raise ValueError("destination.transfer_id must equal request_id")
        if self.destination_follows and self.destination is not None:
            raise ValueError("a destination that follows cannot also come with the request")


@dataclass(frozen=True)
class PrefillTimes:
    """When the worker did what with one request (monotonic seconds, see the module doc)."""

    received: float  # the worker's event loop got the call
    queued: float  # its step loop added the request to the scheduler
    scheduled: float  # its first chunk was scheduled
    sampled: float  # the first token was sampled
    kv_done: float  # the KV transfer finished (= sampled when there was none to wait for)
    replied: float = 0.0  # the step handed the result on to the host's event loop
    destination: float | None = None  # a destination that followed the request arrived


@dataclass(frozen=True)
class PrefillResult:
    """The first token, or the error that prevented it (``token`` None)."""

    request_id: str
    token: SampledToken | None
    finish_reason: str | None  # engine FinishReason value when the first token ends the request
    times: PrefillTimes
    num_cached_tokens: int = 0
    error: str | None = None
    kv_digest: KVDigest | None = None  # of the KV written (None: checksums off, or no KV)

    @property
    def ok(self) -> bool:
        return self.error is None and self.token is not None

    @property
    def queue_s(self) -> float:
        """Queued at the worker -> first scheduled."""
        return self.times.scheduled - self.times.queued

    @property
    def prefill_s(self) -> float:
        """First scheduled -> first token sampled."""
        return self.times.sampled - self.times.scheduled

    @property
    def transfer_wait_s(self) -> float:
        """After sampling, waiting for the KV transfer to finish."""
        return self.times.kv_done - self.times.sampled


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
    block_size: int = 16  # tokens per KV block (prefix-cache keys are per block)
