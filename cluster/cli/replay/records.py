"""What a replay records: one ``RequestRecord`` per request, and the run's ``RunResult``.

Protocol-neutral: every driver (replay/driver.py) reports the same figures, so reports
and plots never know which protocol a run used (``RunResult.config.api`` says). All
times are seconds since the start of the run (``perf_counter``), stamped by the load
generator as each streamed message arrives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pdserve.cluster.cli.client import ClientSecurity
from pdserve.cluster.cli.replay.config import LoadGenConfig
from pdserve.router.slo import tpot

Outcome = Literal["ok", "rejected", "failed"]


@dataclass(frozen=True)
class UsageRecord:
    """The server's usage figures from the end of the stream (milliseconds as sent)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    ttft_ms: float = 0.0
    e2e_ms: float = 0.0
    prefill_queue_ms: float = 0.0
    prefill_ms: float = 0.0
    kv_transfer_wait_ms: float = 0.0


@dataclass(frozen=True)
class RequestRecord:
    index: int
    request_id: str
    prompt_len: int  # as traced (text prompts tokenize to a different count: see usage)
    output_len: int
    arrival_s: float  # scheduled
    send_s: float  # actually handed to the driver
    end_s: float  # stream finished (or failed)
    message_times_s: tuple[float, ...] = ()  # one per streamed message
    message_tokens: tuple[int, ...] = ()  # token ids carried by each message
    finish_reason: str = ""  # "stop" | "length" | "abort" | "" (none received)
    usage: UsageRecord | None = None
    status: str = "OK"  # a gRPC status code name, whatever the protocol
    error: str = ""

    @property
    def num_tokens(self) -> int:
        return sum(self.message_tokens)

    @property
    def first_token_s(self) -> float | None:
        return next((t for t, n in zip(self.message_times_s, self.message_tokens, strict=True) if n), None)

    @property
    def last_token_s(self) -> float | None:
        return next((t for t, n in zip(reversed(self.message_times_s),
                                       reversed(self.message_tokens), strict=True) if n), None)

    @property
    def outcome(self) -> Outcome:
        if self.status == "RESOURCE_EXHAUSTED":
            return "rejected"
        # A server-side abort or an empty stream did not serve the request.
        if self.status != "OK" or self.finish_reason == "abort" or self.num_tokens == 0:
            return "failed"
        return "ok"

    @property
    def ttft_s(self) -> float | None:
        """Client-side: send -> first token (not from the scheduled arrival; see send lag)."""
        first = self.first_token_s
        return None if first is None else first - self.send_s

    @property
    def tpot_s(self) -> float | None:
        first, last = self.first_token_s, self.last_token_s
        return None if first is None else tpot(first, last, self.num_tokens)

    @property
    def e2e_s(self) -> float:
        return self.end_s - self.send_s

    @property
    def send_lag_s(self) -> float:
        return self.send_s - self.arrival_s

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RequestRecord:
        d = dict(d)
        d["message_times_s"] = tuple(d.get("message_times_s", ()))
        d["message_tokens"] = tuple(d.get("message_tokens", ()))
        d["usage"] = UsageRecord(**d["usage"]) if d.get("usage") else None
        return cls(**d)


@dataclass(frozen=True)
class RunResult:
    address: str
    trace_name: str
    offered_rate: float  # the trace's mean arrival rate, req/s
    config: LoadGenConfig
    records: tuple[RequestRecord, ...]
    wall_s: float  # run start -> last stream finished
    started_unix: float = field(default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunResult:
        d = dict(d)
        config = dict(d["config"])
        if config.get("security") is not None:
            config["security"] = ClientSecurity(**config["security"])
        d["config"] = LoadGenConfig(**config)
        d["records"] = tuple(RequestRecord.from_dict(r) for r in d["records"])
        return cls(**d)


def outcome_counts(records: Sequence[RequestRecord]) -> dict[str, int]:
    counts = {"ok": 0, "rejected": 0, "failed": 0}
    for r in records:
        counts[r.outcome] += 1
    return counts
