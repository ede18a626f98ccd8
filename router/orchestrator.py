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
and one token-stream consumer per decode worker for as long as it is in its pool. With no
prefill workers the decode workers are colocated (both phases): the baseline path.

Pools change while the router runs (the autoscaler, ``router/membership.py``): ``attach``
adds a worker, ``begin_drain`` stops routing to one, ``finish_drain`` waits until it
holds nothing (``router/drain.py``) and then ``detach``es it; a drain that runs out of
time puts the worker back in service instead, so leaving never loses a request.
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
from pdserve.router.drain import DrainTimeout, work_held
from pdserve.router.events import TokenEvent
from pdserve.router.health import WorkerHealth
from pdserve.router.policy import RoutingPolicy, RoutingRequest, WorkerLoad
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
        self._tasks: dict[str, list[asyncio.Task]] = {}  # per worker: stream, heartbeat
        self._started = False

    @property
    def rejected(self) -> int:
        return self.admission.rejected

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Start one token-stream consumer per decode worker and one heartbeat per worker
        (call inside the event loop)."""
        self._started = True
        for client in (*self.decodes.values(), *self.prefills.values()):
            self._start_worker(client)

    def _start_worker(self, client: PrefillClient | DecodeClient) -> None:
        wid = client.worker_id
        if wid in self.decodes:
            self._tasks[wid] = [
                asyncio.create_task(self._consume(client)),
                asyncio.create_task(self.health.watch(wid, client.stats, self._on_decode_stats))]
        else:
            self._tasks[wid] = [asyncio.create_task(
                self.health.watch(wid, client.stats, self._on_prefill_stats))]
            client.open()

    async def close(self) -> None:
        tasks = [t for ts in self._tasks.values() for t in ts]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
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

    # -- pool membership ----------------------------------------------------------------
    def attach(self, client: PrefillClient | DecodeClient, role: str) -> None:
        """Add a ready worker (``role`` "prefill" or "decode") to its pool; it takes requests
        from its first heartbeat on. A colocated router takes only decode workers."""
        wid = client.worker_id
        if wid in self.prefills or wid in self.decodes:
            raise ValueError(f"worker {wid!r} is already in a pool")
        if role == "prefill" and self.colocated:
            raise ValueError("a colocated router has no prefill pool")
        if role not in ("prefill", "decode"):
            raise ValueError(f"role must be prefill or decode, got {role!r}")
        workers, loads = ((self.prefills, self.prefill_load) if role == "prefill"
                          else (self.decodes, self.decode_load))
        load = loads[wid] = WorkerLoad(wid)
        workers[wid] = client
        self.health.add(wid, load)
        if self._started:
            self._start_worker(client)

    def begin_drain(self, wid: str) -> None:
        """No new request goes to ``wid`` from now on (``finish_drain`` then waits for it
        to hold nothing). ``KeyError`` if it is in no pool, ``ValueError`` if it is the
        last of its pool in service."""
        loads = self.prefill_load if wid in self.prefill_load else self.decode_load
        load = loads[wid]
        if not load.draining and sum(not w.draining for w in loads.values()) <= 1:
            raise ValueError(f"worker {wid} is the last of its pool in service")
        load.draining = True

    async def finish_drain(self, wid: str, timeout_s: float, poll_s: float = 0.2) -> None:
        """Wait until ``wid`` holds nothing (``router/drain.py``), then ``detach`` it. Raises
        ``DrainTimeout``, the worker back in service, if it still holds work after
        ``timeout_s``."""
        client = self.prefills.get(wid) or self.decodes[wid]
        load = self.prefill_load.get(wid) or self.decode_load[wid]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        idle_looks = 0
        try:
            while True:
                try:
                    held = load.in_flight + work_held(await client.stats())
                except Exception:  # dead: its routes failed, it holds nothing; else unknown
                    held = load.in_flight + (1 if load.healthy else 0)
                idle_looks = idle_looks + 1 if held == 0 else 0
                if idle_looks == 2:
                    break
                if loop.time() >= deadline:
                    raise DrainTimeout(wid, held, timeout_s)
                await asyncio.sleep(poll_s)
        except BaseException:
            load.draining = False
            raise
        await self.detach(wid)

    async def detach(self, wid: str) -> None:
        """Remove ``wid`` from its pool at once: its stream and heartbeat stop and the
        policy forgets it. Callers drain it first (``begin_drain``, ``finish_drain``)."""
        tasks = self._tasks.pop(wid, [])
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        client = self.prefills.pop(wid, None)
        self.decodes.pop(wid, None)
        self.prefill_load.pop(wid, None)
        self.decode_load.pop(wid, None)
        self.health.remove(wid)
        self.admission.policy.forget_worker(wid)
        if client is not None:
            await client.close()

    def pool_sizes(self) -> dict[str, dict[str, int]]:
        """Workers per pool, in service and draining."""
        return {pool: {"active": sum(not w.draining for w in loads.values()),
                       "draining": sum(w.draining for w in loads.values())}
                for pool, loads in (("prefill", self.prefill_load),
                                    ("decode", self.decode_load))}

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
