"""Open-loop load generator: replay a ``Trace`` against the gRPC endpoint as a real client.

Each trace request is sent at its arrival time whether or not earlier ones have
finished (open loop: a slow server builds a queue instead of slowing the offered
load, which is what latency-under-load numbers need). Prompts are seeded random token
ids of the traced length (or random words when ``prompt_mode="text"``), with
``max_tokens = output_len``, greedy sampling and ``ignore_eos`` so the output length
follows the trace. Every streamed message is timestamped on the client, so TTFT, TPOT
and end-to-end latency include the network and gRPC, as a user would see them.

All times in a ``RunResult`` are seconds since the start of the run (``perf_counter``).
``run_trace`` is the synchronous entry point; ``run_trace_async`` runs on a caller's loop.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

import grpc
import numpy as np

from pdserve.cluster.cli.client import ClientSecurity, auth_metadata
from pdserve.cluster.cli.progress import bar, refresh_due
from pdserve.protos import pdserve_pb2, pdserve_pb2_grpc
from pdserve.router.slo import tpot
from pdserve.workloads.trace import Trace, TraceRequest

# Ids 0..2 are the demo tokenizer's special tokens (<s>, </s>, <pad>); prompts avoid them
# so a random prompt never contains an end-of-sequence marker.
FIRST_PROMPT_TOKEN_ID = 3
_WORDS = ("the", "cache", "router", "prefill", "decode", "token", "batch", "worker", "model",
          "request", "stream", "latency", "memory", "layer", "queue", "block", "serve", "fast")
_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._:-]")

Outcome = Literal["ok", "rejected", "failed"]


@dataclass(frozen=True)
class LoadGenConfig:
    vocab_size: int = 512  # prompt ids are drawn from [3, vocab_size)
    seed: int = 0
    prompt_mode: Literal["tokens", "text"] = "tokens"
    slo_ttft_s: float | None = None  # sent as per-request SLO targets when set
    slo_tpot_s: float | None = None
    max_in_flight: int = 4096  # safety cap; sends past it wait (and show up as send lag)
    num_channels: int = 1
    timeout_s: float | None = None  # per-request gRPC deadline
    quiet: bool = False
    progress_interval_s: float = 0.5  # least time between redraws (log: progress.LOG_INTERVAL_S)
    # TLS / token sources for a secured endpoint: paths and an env var name only, so the
    # config can be saved with the results without leaking a secret.
    security: ClientSecurity | None = None

    def __post_init__(self) -> None:
        if self.vocab_size <= FIRST_PROMPT_TOKEN_ID:
            raise ValueError(f"vocab_size must be > {FIRST_PROMPT_TOKEN_ID}, got {self.vocab_size}")
        if self.prompt_mode not in ("tokens", "text"):
            raise ValueError(f"prompt_mode must be 'tokens' or 'text', got {self.prompt_mode!r}")
        for name in ("slo_ttft_s", "slo_tpot_s", "timeout_s"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"{name} must be positive when set, got {v!r}")
        if self.max_in_flight < 1 or self.num_channels < 1 or self.progress_interval_s <= 0:
            raise ValueError("max_in_flight, num_channels, progress_interval_s must be positive")


@dataclass(frozen=True)
class UsageRecord:
    """The server's ``Usage`` block from the final message (milliseconds as sent)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    ttft_ms: float = 0.0
    e2e_ms: float = 0.0
    prefill_queue_ms: float = 0.0
    prefill_ms: float = 0.0
    kv_transfer_wait_ms: float = 0.0

    @classmethod
    def from_proto(cls, u: pdserve_pb2.Usage) -> UsageRecord:
        return cls(**{f.name: getattr(u, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class RequestRecord:
    index: int
    request_id: str
    prompt_len: int  # as traced (text prompts tokenize to a different count: see usage)
    output_len: int
    arrival_s: float  # scheduled
    send_s: float  # actually handed to gRPC
    end_s: float  # stream finished (or failed)
    message_times_s: tuple[float, ...] = ()  # one per streamed message
    message_tokens: tuple[int, ...] = ()  # token ids carried by each message
    finish_reason: str = ""  # "stop" | "length" | "abort" | "" (none received)
    usage: UsageRecord | None = None
    status: str = "OK"  # gRPC status code name
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


def build_bench_request(index: int, req: TraceRequest, cfg: LoadGenConfig,
                        request_id: str) -> pdserve_pb2.GenerateRequest:
    """The request for trace entry ``index``; seeded per index so prompts do not depend on
    the order in which requests happen to be built."""
    rng = np.random.default_rng([cfg.seed, index])
    out = pdserve_pb2.GenerateRequest(request_id=request_id)
    if cfg.prompt_mode == "text":
        out.text = " ".join(_WORDS[i] for i in rng.integers(0, len(_WORDS), req.prompt_len))
    else:
        out.token_ids.ids.extend(
            rng.integers(FIRST_PROMPT_TOKEN_ID, cfg.vocab_size, req.prompt_len).tolist())
    out.sampling.temperature = 0.0
    out.sampling.max_tokens = req.output_len
    out.stop.ignore_eos = True
    if cfg.slo_ttft_s is not None:
        out.slo.ttft_ms = cfg.slo_ttft_s * 1e3
    if cfg.slo_tpot_s is not None:
        out.slo.tpot_ms = cfg.slo_tpot_s * 1e3
    return out


def _finish_reason(value: int) -> str:
    return pdserve_pb2.FinishReason.Name(value).removeprefix("FINISH_REASON_").lower()


class _Progress:
    """A run's counters, shown as a progress bar of finished requests on stderr
    (benchmarks/progress.py: live on a terminal, a line now and then in a log)."""

    def __init__(self, name: str, total: int, quiet: bool, interval_s: float):
        self.sent = self.done = self.rejected = self.failed = 0
        self.bar = bar(total=total, desc=f"bench {name}", unit="req", disable=quiet,
                       interval_s=interval_s)

    def send(self) -> None:
        self.sent += 1
        self._postfix()

    def finish(self, outcome: Outcome) -> None:
        self.done += outcome == "ok"
        self.rejected += outcome == "rejected"
        self.failed += outcome == "failed"
        self._postfix()
        self.bar.update(1)

    def _postfix(self) -> None:
        self.bar.set_postfix_str(f"sent {self.sent} ok {self.done} rejected {self.rejected} "
                                 f"failed {self.failed}", refresh=False)

    async def tick(self, interval: float) -> None:
        """Keep elapsed time and rate current while no request finishes."""
        while True:
            await asyncio.sleep(interval)
            refresh_due(self.bar)


async def run_trace_async(address: str, trace: Trace, config: LoadGenConfig | None = None,
                          run_name: str | None = None) -> RunResult:
    cfg = config or LoadGenConfig()
    name = run_name or trace.name
    id_prefix = _ID_UNSAFE.sub("_", name)[:96] or "bench"
    # A local subchannel pool per channel gives each channel its own HTTP/2 connection.
    options = [("grpc.use_local_subchannel_pool", 1)] if cfg.num_channels > 1 else []
    creds = cfg.security.credentials() if cfg.security is not None else None
    metadata = auth_metadata(cfg.security.token() if cfg.security is not None else None)
    channels = [grpc.aio.insecure_channel(address, options=options) if creds is None
                else grpc.aio.secure_channel(address, creds, options=options)
                for _ in range(cfg.num_channels)]
    stubs = [pdserve_pb2_grpc.GenerationStub(ch) for ch in channels]
    records: list[RequestRecord | None] = [None] * len(trace)
    progress = _Progress(name, len(trace), cfg.quiet, cfg.progress_interval_s)
    in_flight = asyncio.Semaphore(cfg.max_in_flight)
    started_unix = time.time()
    start = time.perf_counter()

    def now() -> float:
        return time.perf_counter() - start

    async def one(i: int, tr: TraceRequest) -> None:
        try:
            rid = f"{id_prefix}-{i}"
            req = build_bench_request(i, tr, cfg, rid)
            times: list[float] = []
            tokens: list[int] = []
            finish, usage, status, error = "", None, "OK", ""
            send_s = now()
            progress.send()
            try:
                call = stubs[i % len(stubs)].Generate(req, timeout=cfg.timeout_s,
                                                      metadata=metadata or None)
                async for msg in call:
                    times.append(now())
                    tokens.append(len(msg.token_ids))
                    if msg.finish_reason:
                        finish = _finish_reason(msg.finish_reason)
                    if msg.HasField("usage"):
                        usage = UsageRecord.from_proto(msg.usage)
            except grpc.aio.AioRpcError as exc:
                status, error = exc.code().name, exc.details() or ""
            except Exception as exc:  # noqa: BLE001 - a client-side bug must not end the run
                status, error = "CLIENT_ERROR", repr(exc)
            rec = RequestRecord(i, rid, tr.prompt_len, tr.output_len, tr.arrival_s, send_s,
                                now(), tuple(times), tuple(tokens), finish, usage, status,
                                error)
            records[i] = rec
            progress.finish(rec.outcome)
        finally:
            in_flight.release()

    ticker = asyncio.create_task(progress.tick(cfg.progress_interval_s))
    tasks: list[asyncio.Task] = []
    try:
        for i, tr in enumerate(trace.requests):
            delay = tr.arrival_s - now()
            if delay > 0:
                await asyncio.sleep(delay)
            await in_flight.acquire()
            tasks.append(asyncio.create_task(one(i, tr)))
        await asyncio.gather(*tasks)
        wall = now()
    finally:
        ticker.cancel()
        for t in tasks:
            t.cancel()
        await asyncio.gather(ticker, *tasks, return_exceptions=True)
        for ch in channels:
            await ch.close()
        progress.bar.close()
    return RunResult(address, trace.name, trace.rate, cfg,
                     tuple(r for r in records if r is not None), wall, started_unix)


def run_trace(address: str, trace: Trace, config: LoadGenConfig | None = None,
              run_name: str | None = None, **overrides: Any) -> RunResult:
    """Synchronous wrapper; ``overrides`` are ``LoadGenConfig`` fields (e.g. quiet=True)."""
    cfg = config or LoadGenConfig()
    if overrides:
        cfg = replace(cfg, **overrides)  # not asdict: nested configs stay typed
    return asyncio.run(run_trace_async(address, trace, cfg, run_name))


def outcome_counts(records: Sequence[RequestRecord]) -> dict[str, int]:
    counts = {"ok": 0, "rejected": 0, "failed": 0}
    for r in records:
        counts[r.outcome] += 1
    return counts
