"""The request path across the pools, and what keeps it going when workers fail.

``generate`` serves one request as a series of attempts (``attempt.py``: reserve on
decode, prefill, hand over, stream), yielding ``TokenEvent``s. An attempt that fails in a
way another can fix (a worker died or hung, a KV transfer broke) is retried on the
healthy workers: from scratch if no token was sent, else *resumed*: the prompt plus the
tokens already sent are prefilled elsewhere and the stream goes on with no token missing
or repeated, so greedy output is identical to a run with no failure. After
``max_retries`` the request ends with UNAVAILABLE.

Around the attempts, this class wires the parts by concern: ``Admission`` (bounds,
worker loads and the routing policy), ``RouteTable`` (which attempt each decode step's
tokens go to), ``WorkerHealth`` (heartbeats; a death fails the routes on that worker),
and one token-stream consumer per decode worker for the router's life. With no prefill
workers the decode workers are colocated (both phases): the baseline path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence

from pdserve.decode_worker.messages import ColocatedRequest, TokenDelta
from pdserve.router.admission import Admission
from pdserve.router.attempt import AttemptFailed, AttemptRunner
from pdserve.router.clients import DecodeClient, PrefillClient, WorkerGone
from pdserve.router.events import TokenEvent
from pdserve.router.health import WorkerHealth
from pdserve.router.policy import RoutingPolicy, RoutingRequest
from pdserve.router.prefill_placement import PrefillPlacement
from pdserve.router.reliability import ReliabilityConfig
from pdserve.router.request_types import ValidatedRequest
from pdserve.router.routes import AttemptId, RouteTable
from pdserve.router.slo import SloConfig
from pdserve.router.status import InvalidArgument, NoWorkerAvailable

__all__ = ["Orchestrator", "TokenEvent"]

log = logging.getLogger(__name__)


class Orchestrator:
    def __init__(self, prefills: Sequence[PrefillClient], decodes: Sequence[DecodeClient],
                 policy: RoutingPolicy, slo: SloConfig | None = None,
                 admission: str = "reject", units: dict[str, int] | None = None,
                 reliability: ReliabilityConfig | None = None,
                 placement: PrefillPlacement | None = None):
        """With no prefill clients, the decode clients are colocated workers (both phases).
        ``units``: see ``Admission``; ``placement``: where prompts are prefilled (default:
        always on the prefill pool)."""
        self.reliability = rel = reliability or ReliabilityConfig()
        self.prefills = {c.worker_id: c for c in prefills}
        self.decodes = {c.worker_id: c for c in decodes}
        self.slo = slo or SloConfig()
        self.admission = Admission(policy, self.prefills, self.decodes, admission,
                                   units or {}, rel)
        self.prefill_load = self.admission.prefill_load
        self.decode_load = self.admission.decode_load
        self.routes = RouteTable()
        self.health = WorkerHealth({**self.prefill_load, **self.decode_load},
                                   rel.heartbeat_interval_s, rel.heartbeat_timeout_s,
                                   on_death=self._on_death)
        self.attempts = AttemptRunner(self.prefills, self.decodes, self.admission, self.health,
                                      self.routes, rel, placement)
        self.colocated = not self.prefills
        self.retries = 0  # attempts beyond the first, over the router's life
        self.failed_after_retries = 0
        self.on_retry: Callable[[str], None] | None = None  # metrics hook: the cause
        self._requests: set[str] = set()  # client request ids in flight
        self._tasks: list[asyncio.Task] = []

    @property
    def rejected(self) -> int:
        return self.admission.rejected

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Start one token-stream consumer per decode worker and one heartbeat per worker
        (call inside the event loop)."""
        for client in self.decodes.values():
            self._tasks.append(asyncio.create_task(self._consume(client)))
            self._tasks.append(asyncio.create_task(
                self.health.watch(client.worker_id, client.stats, self._on_decode_stats)))
        for client in self.prefills.values():
            self._tasks.append(asyncio.create_task(
                self.health.watch(client.worker_id, client.stats, self._on_prefill_stats)))
            client.open()

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.attempts.drain()
        await asyncio.gather(*(c.close() for c in self.prefills.values()),
                             return_exceptions=True)

    async def _consume(self, client: DecodeClient) -> None:
        """The worker's token stream for the router's life; after the worker dies, wait for
        the heartbeat to see it back (Ray restarts it) and subscribe again."""
        wid = client.worker_id
        while True:
            await self.health[wid].alive.wait()
            try:
                async for batch in client.stream():
                    self.routes.dispatch(batch, self.decode_load[wid].decode_contexts)
            except asyncio.CancelledError:
                raise
            except WorkerGone as exc:
                self.health.mark_dead(wid, f"token stream: {exc}"[:200])
                continue
            except Exception:
                log.exception("token stream from %s broke; resubscribing", wid)
            await asyncio.sleep(0.5)

    def _on_death(self, wid: str, why: str) -> None:
        """Attempts waiting on a dead decode worker's stream get a retryable error (prefill
        waits race ``health[wid].dead`` themselves). Its caches are gone either way."""
        if wid in self.decode_load:
            self.routes.fail_worker(wid)
        self.admission.policy.forget_worker(wid)

    def _on_prefill_stats(self, wid: str, s) -> None:
        load = self.prefill_load[wid]
        load.block_size = getattr(s, "block_size", load.block_size)
        self.admission.policy.prefill_stats(wid, s.num_blocks)

    def _on_decode_stats(self, wid: str, s) -> None:
        load = self.decode_load[wid]
        load.free_blocks, load.total_blocks = s.num_free_blocks, s.num_blocks
        load.block_size = getattr(s, "block_size", load.block_size)
        load.max_seqs = getattr(s, "max_num_seqs", 0)
        load.refused = False

    # -- the request path ---------------------------------------------------------------
    async def generate(self, req: ValidatedRequest) -> AsyncIterator[TokenEvent]:
        """Serve ``req``, retrying failed attempts (see ``ReliabilityConfig``): the events
        yielded across attempts are exactly one uninterrupted run's."""
        rid = req.request_id
        if rid in self._requests:
            raise InvalidArgument(f"request id {rid!r} is already in flight")
        self.admission.admit(len(self._requests))
        slo = self.slo.with_overrides(req.slo.ttft_s, req.slo.tpot_s)
        routing = RoutingRequest(rid, len(req.prompt_token_ids), req.params.max_tokens,
                                 slo.ttft_s, slo.tpot_s, req.prompt_token_ids)
        self._requests.add(rid)
        try:
            serve = self._colocated if self.colocated else self._with_retries
            async with contextlib.aclosing(serve(req, routing)) as events:
                async for ev in events:
                    yield ev
        finally:
            self._requests.discard(rid)

    async def _with_retries(self, req: ValidatedRequest, routing: RoutingRequest
                            ) -> AsyncIterator[TokenEvent]:
        queue: asyncio.Queue[TokenDelta] = asyncio.Queue()
        sent: list[int] = []
        failures = 0
        while True:
            try:
                async with contextlib.aclosing(self.attempts.run(
                        req, routing, queue, tuple(sent), failures)) as events:
                    async for ev in events:
                        sent.extend(ev.token_ids)
                        yield ev
                return
            except AttemptFailed as exc:
                failures += 1
                if failures > self.reliability.max_retries:
                    self.failed_after_retries += 1
                    raise NoWorkerAvailable(
                        f"request failed after {failures} attempts; last: {exc}") from exc
                self.retries += 1
                if self.on_retry is not None:
                    self.on_retry(exc.cause)
                log.warning("request %s: attempt %d failed (%s); %s", req.request_id,
                            failures, exc,
                            f"resuming after {len(sent)} tokens" if sent else "retrying")
                await asyncio.sleep(failures * self.reliability.retry_backoff_s)

    async def _colocated(self, req: ValidatedRequest, routing: RoutingRequest
                         ) -> AsyncIterator[TokenEvent]:
        """Baseline path: one worker prefills and decodes; every token comes by its stream.
        A worker that dies fails the request (no resume here)."""
        aid = AttemptId(req.request_id)
        wid = self.admission.rank_decode(routing)[0]
        route = self.routes.open(aid, asyncio.Queue())
        route.decode_worker = wid
        load = self.decode_load[wid]
        load.in_flight += 1
        load.decode_contexts[aid] = routing.num_prompt_tokens
        finished = False
        try:
            try:
                await self.decodes[wid].submit(ColocatedRequest(aid, req.prompt_token_ids,
                                                                req.params))
            except WorkerGone as exc:
                load.healthy = False
                raise NoWorkerAvailable(f"worker {wid} failed: {exc}") from exc
            while not finished:
                delta = await route.queue.get()
                if delta.error:
                    raise NoWorkerAvailable(delta.error)
                finished = delta.finish_reason is not None
                yield TokenEvent(delta.token_ids, delta.logprobs, delta.finish_reason)
        finally:
            self.routes.close(aid)
            load.in_flight -= 1
            load.decode_contexts.pop(aid, None)
            if not finished:
                self.attempts.spawn(self.attempts.release(aid, wid, None, None))

    def reliability_report(self) -> dict:
        return {"retries": self.retries, "failed_after_retries": self.failed_after_retries,
                "workers": {wid: {"alive": w.load.healthy, "deaths": w.deaths}
                            for wid, w in self.health.workers.items()},
                "prefill_paths": {wid: c.path_report() for wid, c in self.prefills.items()}}

    def in_flight(self) -> int:
        return len(self._requests)
