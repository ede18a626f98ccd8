"""Open-loop load generator: replay a ``Trace`` against an endpoint as a real client.

Each trace request is sent at its arrival time whether or not earlier ones have
finished (open loop: a slow server builds a queue instead of slowing the offered
load, which is what latency-under-load numbers need). Prompts are seeded (see
``prompts``: random token ids of the traced length, shared blocks for a trace's prefix
hashes, or text), with ``max_tokens = output_len``, greedy sampling and ``ignore_eos`` so
the output length follows the trace. Every streamed message is timestamped on the
client, so TTFT, TPOT and end-to-end latency include the network and the protocol, as a
user would see them.

The protocol is the driver's (``LoadGenConfig.api``: gRPC or OpenAI HTTP, see
``driver``); arrival scheduling, records, progress and everything downstream are shared.
All times in a ``RunResult`` are seconds since the start of the run (``perf_counter``).
``run_trace`` is the synchronous entry point; ``run_trace_async`` runs on a caller's loop.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import replace
from typing import Any

from pdserve.cluster.cli.progress import bar, refresh_due
from pdserve.cluster.cli.replay.config import LoadGenConfig
from pdserve.cluster.cli.replay.driver import DRIVERS, RequestFailed
from pdserve.cluster.cli.replay.prompts import build_bench_request
from pdserve.cluster.cli.replay.records import Outcome, RequestRecord, RunResult
from pdserve.workloads.trace import Trace, TraceRequest

_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._:-]")


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
    records: list[RequestRecord | None] = [None] * len(trace)
    in_flight = asyncio.Semaphore(cfg.max_in_flight)
    async with DRIVERS.get(cfg.api)(address, cfg) as driver:
        progress = _Progress(name, len(trace), cfg.quiet, cfg.progress_interval_s)
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
                    async for event in driver.stream(req):
                        times.append(now())
                        tokens.append(event.num_tokens)
                        if event.finish_reason:
                            finish = event.finish_reason
                        if event.usage is not None:
                            usage = event.usage
                except RequestFailed as exc:
                    status, error = exc.status, exc.message
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
