"""A request's state inside one engine (or worker), with explicit transitions.

Lifecycle: WAITING -> RUNNING -> (WAITING again if preempted) -> FINISHED_*; a request
can be aborted from any unfinished state. The owning scheduler moves it and releases
its KV blocks exactly once when it leaves RUNNING/WAITING for a finished state.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pdserve.engine.sampling_params import SamplingParams

if TYPE_CHECKING:  # keep this module (and the scheduler) importable without torch
    from pdserve.engine.messages import SampledToken


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"

    @property
    def finished(self) -> bool:
        return self in _FINISHED


class FinishReason(str, enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


_FINISHED = {RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
             RequestStatus.FINISHED_ABORTED}
_ALLOWED = {
    # WAITING -> FINISHED_LENGTH: a preempted request that grew past the whole cache.
    RequestStatus.WAITING: {RequestStatus.RUNNING, RequestStatus.FINISHED_ABORTED,
                            RequestStatus.FINISHED_LENGTH},
    RequestStatus.RUNNING: {RequestStatus.WAITING} | _FINISHED,
}
FINISH_STATUS = {
    FinishReason.STOP: RequestStatus.FINISHED_STOPPED,
    FinishReason.LENGTH: RequestStatus.FINISHED_LENGTH,
    FinishReason.ABORT: RequestStatus.FINISHED_ABORTED,
}


class InvalidTransition(RuntimeError):
    pass


@dataclass(eq=False)
class Request:
    """Token-level state. ``num_computed_tokens`` counts tokens whose KV is in the cache."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[SampledToken] = field(default_factory=list)  # when params.logprobs
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    first_token_time: float | None = None

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.request_id}: prompt must not be empty")

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return [*self.prompt_token_ids, *self.output_token_ids]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def transition(self, new: RequestStatus) -> None:
        if new not in _ALLOWED.get(self.status, set()):
            raise InvalidTransition(f"request {self.request_id}: {self.status.value} -> {new.value}")
        self.status = new

    def finish(self, reason: FinishReason) -> None:
        self.transition(FINISH_STATUS[reason])
        self.finish_reason = reason
