"""The request path across the pools: reserve on decode, prefill, hand over, stream.

For each request ``generate`` (an async generator of ``TokenEvent``):
1. ranks decode workers (policy) and reserves the prompt's KV blocks on the first that
   has room (RESOURCE_EXHAUSTED if none has);
2. sends the prompt with the reservation to the best prefill worker, which writes the
   KV into those blocks and returns the first token: yielded at once (TTFT);
3. tells the decode worker to start; its per-step ``TokenBatch`` messages (consumed by
   one task per decode worker for the router's life) are dispatched to the request's
   queue and yielded until a finish reason arrives.
Whatever way an attempt ends (finish, client cancel, a stop string found by the
caller, an error), ``finally`` releases the request on both workers. The worker ids of
every request in flight are tracked so that a worker's load is always known.

Failures (``ReliabilityConfig``): a worker that dies (Ray reports it) or hangs (misses
heartbeats, ``health.py``) fails the attempts that depend on it, and so does a broken KV
transfer. The request is then tried again on the healthy workers: from scratch if no
token was sent, else *resumed*: the prompt plus the tokens already sent are prefilled
elsewhere (``SamplingParams.output_offset`` keeps seeded draws aligned) and the stream
continues with no token missing or repeated. Greedy output is identical to a run with
no failure. After ``max_retries`` the request ends with UNAVAILABLE.
Bounds: ``max_in_flight`` requests in the router, ``max_queued_per_prefill`` per prefill
worker; beyond them RESOURCE_EXHAUSTED with a retry hint.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from pdserve.decode_worker.messages import (
    NoCapacityError,
    ReservationLost,
    ReserveRequest,
    StartDecode,
    TokenBatch,
    TokenDelta,
)
from pdserve.engine.sampler import SampledToken
from pdserve.prefill_worker.messages import PrefillRequest
from pdserve.router.clients import DecodeClient, PrefillClient, WorkerGone
from pdserve.router.health import WorkerHealth
from pdserve.router.policy import RoutingPolicy, RoutingRequest, WorkerLoad
from pdserve.router.reliability import ReliabilityConfig
from pdserve.router.slo import SloConfig
from pdserve.router.status import InvalidArgument, NoWorkerAvailable, Overloaded
from pdserve.router.validation import ValidatedRequest

ADMISSION_MODES = ("reject", "best_effort")

log = logging.getLogger(__name__)


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


class _Retry(Exception):
    """This attempt failed in a way another attempt can fix (a worker died or hung, a KV
    transfer broke); what was already sent to the client stays sent. ``cause`` is a
    metrics label: prefill_failed, decode_failed or transfer_failed."""

    def __init__(self, message: str, cause: str):
        super().__init__(message)
        self.cause = cause


class Orchestrator:
    def __init__(self, prefills: Sequence[PrefillClient], decodes: Sequence[DecodeClient],
                 policy: RoutingPolicy, slo: SloConfig | None = None,
                 admission: str = "reject", units: dict[str, int] | None = None,
                 reliability: ReliabilityConfig | None = None):
        """With no prefill clients, the decode clients are colocated workers (both phases).
        ``units`` maps worker ids to units: a request's prefill worker is then chosen among
        those of its decode worker's unit (low node-affinity plans keep KV inside a node)."""
        if admission not in ADMISSION_MODES:
            raise ValueError(f"admission must be one of {ADMISSION_MODES}, got {admission!r}")
        self.reliability = rel = reliability or ReliabilityConfig()
        self.prefills = {c.worker_id: c for c in prefills}
        self.decodes = {c.worker_id: c for c in decodes}
        self.policy = policy
        self.slo = slo or SloConfig()
        self.admission = admission
        self.rejected = 0
        self.retries = 0  # attempts beyond the first, over the router's life
        self.failed_after_retries = 0
        self.on_retry: Callable[[str], None] | None = None  # metrics hook: the cause
        self.colocated = not self.prefills
        self.units = units or {}
        self.prefill_load = {w: WorkerLoad(w) for w in self.prefills}
        self.decode_load = {w: WorkerLoad(w) for w in self.decodes}
        self.health = WorkerHealth({**self.prefill_load, **self.decode_load},
                                   rel.heartbeat_interval_s, rel.heartbeat_timeout_s,
                                   on_death=self._on_death)
        # client request id -> its token queue, for the request's life
        self._queues: dict[str, asyncio.Queue[TokenDelta]] = {}
        # attempt id (what the workers know the request as) -> the same queue
        self._routes: dict[str, asyncio.Queue[TokenDelta]] = {}
        self._tasks: list[asyncio.Task] = []
        self._cleanup: set[asyncio.Task] = set()

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
                self.health.watch(client.worker_id, client.stats)))

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, *self._cleanup, return_exceptions=True)

    async def _consume(self, client: DecodeClient) -> None:
        """The worker's token stream for the router's life; after the worker dies, wait for
        the heartbeat to see it back (Ray restarts it) and subscribe again."""
        wid = client.worker_id
        while True:
            await self.health[wid].alive.wait()
            try:
                async for batch in client.stream():
                    self._dispatch(batch)
            except asyncio.CancelledError:
                raise
            except WorkerGone as exc:
                self.health.mark_dead(wid, f"token stream: {exc}"[:200])
                continue
            except Exception:
                log.exception("token stream from %s broke; resubscribing", wid)
            await asyncio.sleep(0.5)

    def _dispatch(self, batch: TokenBatch) -> None:
        wid = batch.worker_id
        contexts = self.decode_load[wid].decode_contexts if wid in self.decode_load else {}
        for delta in batch.deltas:
            # Keyed by attempt: a request tried again must not hear from a worker it has
            # left (one that was only hung, say); that would duplicate tokens.
            q = self._routes.get(delta.request_id)
            if q is None or getattr(q, "decode_worker", None) != wid:
                continue
            if delta.request_id in contexts:
                contexts[delta.request_id] += len(delta.token_ids)
            q.put_nowait(delta)

    def _on_death(self, wid: str, why: str) -> None:
        """Every request waiting on a dead decode worker's stream gets a retryable error
        (prefill waits race ``health[wid].dead`` themselves)."""
        if wid not in self.decode_load:
            return
        for aid, q in self._routes.items():
            if getattr(q, "decode_worker", None) == wid:
                q.put_nowait(TokenDelta(aid, (), (), "abort", error=f"decode worker {wid} died"))
                q.died = True  # type: ignore[attr-defined]

    def _on_decode_stats(self, wid: str, s) -> None:
        load = self.decode_load[wid]
        load.free_blocks, load.total_blocks = s.num_free_blocks, s.num_blocks
        load.block_size = getattr(s, "block_size", load.block_size)

    # -- the request path ---------------------------------------------------------------
    async def generate(self, req: ValidatedRequest) -> AsyncIterator[TokenEvent]:
        """Serve ``req``, retrying failed attempts (see ``ReliabilityConfig``): the events
        yielded across attempts are exactly one uninterrupted run's."""
        rid = req.request_id
        if rid in self._queues:
            raise InvalidArgument(f"request id {rid!r} is already in flight")
        if len(self._queues) >= self.reliability.max_in_flight:
            err = Overloaded(f"the router already holds {len(self._queues)} requests",
                             retry_after_s=1.0)
            err.reason = "queue_full"
            raise err
        slo = self.slo.with_overrides(req.slo.ttft_s, req.slo.tpot_s)
        routing = RoutingRequest(rid, len(req.prompt_token_ids), req.params.max_tokens,
                                 slo.ttft_s, slo.tpot_s)
        if self.colocated:
            async for ev in self._generate_colocated(req, routing):
                yield ev
            return
        queue: asyncio.Queue[TokenDelta] = asyncio.Queue()
        self._queues[rid] = queue
        sent: list[int] = []
        failures = 0
        try:
            while True:
                try:
                    async with contextlib.aclosing(
                            self._attempt(req, routing, queue, tuple(sent),
                                          failures)) as events:
                        async for ev in events:
                            sent.extend(ev.token_ids)
                            yield ev
                    return
                except _Retry as exc:
                    failures += 1
                    if failures > self.reliability.max_retries:
                        self.failed_after_retries += 1
                        raise NoWorkerAvailable(
                            f"request failed after {failures} attempts; last: {exc}") from exc
                    self.retries += 1
                    if self.on_retry is not None:
                        self.on_retry(exc.cause)
                    log.warning("request %s: attempt %d failed (%s); %s", rid, failures, exc,
                                f"resuming after {len(sent)} tokens" if sent else "retrying")
                    await asyncio.sleep(failures * self.reliability.retry_backoff_s)
        finally:
            self._queues.pop(rid, None)

    async def _attempt(self, req: ValidatedRequest, routing: RoutingRequest,
                       queue: asyncio.Queue[TokenDelta], sent: tuple[int, ...], attempt: int
                       ) -> AsyncIterator[TokenEvent]:
        """Try ``attempt`` (0 = the first): reserve on decode, prefill (prompt + ``sent``),
        hand over, stream. Raises ``_Retry`` for failures another attempt may not meet.
        Workers know each attempt by its own id, so what a failed attempt left behind
        (blocks being released, late tokens) never meets the next one."""
        rid = req.request_id if attempt == 0 else f"{req.request_id}:retry{attempt}"
        admit = attempt == 0
        prompt = req.prompt_token_ids + sent
        params = req.params if not sent else dataclasses.replace(
            req.params, max_tokens=req.params.max_tokens - len(sent),
            output_offset=req.params.output_offset + len(sent))
        routing = dataclasses.replace(routing, request_id=rid, num_prompt_tokens=len(prompt),
                                      max_tokens=params.max_tokens)
        # Admission happens here, before any reservation (after it, when units constrain
        # the pair); a retry was admitted already.
        prefill_id = None if self.units else self._pick_prefill(routing, admit=admit)
        needs_decode = params.max_tokens > 1
        decode_id = None
        prefill_task: asyncio.Task | None = None
        finished = False
        while not queue.empty():  # what a failed attempt's worker said last
            queue.get_nowait()
        queue.decode_worker = None  # type: ignore[attr-defined]
        queue.died = False  # type: ignore[attr-defined]
        self._routes[rid] = queue
        try:
            destination = None
            if needs_decode:
                decode_id, destination = await self._reserve(routing)
                queue.decode_worker = decode_id  # type: ignore[attr-defined]
            if prefill_id is None:
                prefill_id = self._pick_prefill(routing, self.units.get(decode_id), admit=admit)
            pl = self.prefill_load[prefill_id]
            pl.in_flight += 1
            pl.queued_tokens += len(prompt)
            pl.prefill_queue[rid] = len(prompt)
            try:
                prefill_task = asyncio.ensure_future(self.prefills[prefill_id].prefill(
                    PrefillRequest(rid, prompt, params, destination)))
                result = await self._unless_dead(prefill_task, prefill_id)
            except WorkerGone as exc:
                self.health.mark_dead(prefill_id, str(exc)[:200])
                raise _Retry(f"prefill worker {prefill_id} failed", "prefill_failed") from exc
            finally:
                pl.in_flight -= 1
                pl.queued_tokens -= len(prompt)
                pl.prefill_queue.pop(rid, None)
            if not result.ok:
                raise _Retry(result.error or "prefill failed", "transfer_failed")
            first = result.token
            done = result.finish_reason is not None or not needs_decode
            reason = result.finish_reason or ("length" if done else None)
            yield TokenEvent((first.token_id,), (first,) if params.logprobs is not None else (),
                             reason, result.num_cached_tokens, result.queue_s, result.prefill_s,
                             result.transfer_wait_s)
            if done:
                finished = True
                return
            started = time.monotonic()
            try:
                await self.decodes[decode_id].start(StartDecode(
                    rid, prompt, params, first, destination.endpoint.incarnation,
                    result.kv_digest, prefill_id))
            except WorkerGone as exc:
                self.health.mark_dead(decode_id, str(exc)[:200])
                raise _Retry(f"decode worker {decode_id} failed", "decode_failed") from exc
            except ReservationLost as exc:  # it restarted since the reservation
                raise _Retry(str(exc), "decode_failed") from exc
            first_decode = True
            while True:
                delta = await queue.get()
                if delta.error:
                    died = getattr(queue, "died", False)
                    raise _Retry(delta.error, "decode_failed" if died else "transfer_failed")
                if delta.finish_reason is not None:
                    finished = True
                yield TokenEvent(delta.token_ids, delta.logprobs, delta.finish_reason,
                                 decode_queue_s=time.monotonic() - started if first_decode else None)
                first_decode = False
                if finished:
                    return
        finally:
            self._routes.pop(rid, None)
            if decode_id is not None:
                self.decode_load[decode_id].in_flight -= 1
                self.decode_load[decode_id].decode_contexts.pop(rid, None)
            if not finished:
                # Runs in its own task: this generator may be closing because its task was
                # cancelled, and the release must still happen.
                self._spawn(self._release(rid, decode_id, prefill_id, prefill_task))

    async def _unless_dead(self, task: asyncio.Task, wid: str):
        """``task``'s result, or ``WorkerGone`` as soon as the heartbeat declares ``wid``
        dead (a hung worker never answers; a killed one may take Ray a moment)."""
        dead = asyncio.ensure_future(self.health[wid].dead.wait())
        try:
            await asyncio.wait({task, dead}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            dead.cancel()
        if task.done():
            return task.result()
        raise WorkerGone(f"worker {wid} missed its heartbeats")

    async def _generate_colocated(self, req: ValidatedRequest,
                                  routing: RoutingRequest) -> AsyncIterator[TokenEvent]:
        """Baseline path: one worker prefills and decodes; every token comes by its stream."""
        from pdserve.decode_worker.colocated import ColocatedRequest

        rid = req.request_id
        ranked = self.policy.rank_decode(routing, list(self.decode_load.values()))
        if not ranked:
            raise NoWorkerAvailable("no healthy worker")
        wid = ranked[0]
        queue: asyncio.Queue[TokenDelta] = asyncio.Queue()
        queue.decode_worker = wid  # type: ignore[attr-defined]
        self._queues[rid] = self._routes[rid] = queue
        load = self.decode_load[wid]
        load.in_flight += 1
        load.decode_contexts[rid] = routing.num_prompt_tokens
        finished = False
        try:
            try:
                await self.decodes[wid].submit(ColocatedRequest(rid, req.prompt_token_ids,
                                                                req.params))
            except WorkerGone as exc:
                load.healthy = False
                raise NoWorkerAvailable(f"worker {wid} failed: {exc}") from exc
            while not finished:
                delta = await queue.get()
                if delta.error:
                    raise NoWorkerAvailable(delta.error)
                finished = delta.finish_reason is not None
                yield TokenEvent(delta.token_ids, delta.logprobs, delta.finish_reason)
        finally:
            self._queues.pop(rid, None)
            self._routes.pop(rid, None)
            load.in_flight -= 1
            load.decode_contexts.pop(rid, None)
            if not finished:
                self._spawn(self._release(rid, wid, None, None))

    async def _reserve(self, routing: RoutingRequest):
        ranked = self.policy.rank_decode(routing, list(self.decode_load.values()))
        if not ranked:
            raise NoWorkerAvailable("no healthy decode worker")
        full = 0
        for wid in ranked:
            try:
                res = await self._reserve_on(wid, routing)
            except NoCapacityError:
                full += 1
                continue
            except WorkerGone:
                self.decode_load[wid].healthy = False
                continue
            self.decode_load[wid].in_flight += 1
            self.decode_load[wid].decode_contexts[routing.request_id] = routing.num_prompt_tokens
            return wid, res.destination
        if not full:  # nobody answered: that is an outage, not overload
            raise NoWorkerAvailable("no decode worker is reachable")
        err = Overloaded("every decode worker's KV cache is full", retry_after_s=1.0)
        err.reason = "kv_full"
        raise err

    async def _reserve_on(self, wid: str, routing: RoutingRequest):
        """Reserve on ``wid``. If this task is cancelled (client gone, deadline) while the
        call is in flight, the worker may still reserve: the call is left to finish and
        whatever it reserved is released, instead of waiting for the lease."""
        call = asyncio.ensure_future(self.decodes[wid].reserve(
            ReserveRequest(routing.request_id, routing.num_prompt_tokens)))
        try:
            return await asyncio.shield(call)
        except asyncio.CancelledError:
            self._spawn(self._release_when_reserved(call, wid, routing.request_id))
            raise

    async def _release_when_reserved(self, call: asyncio.Future, wid: str, rid: str) -> None:
        try:
            await asyncio.wait_for(call, self.reliability.heartbeat_timeout_s)
        except Exception:  # nothing was reserved, or the worker is gone (its lease frees it)
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.decodes[wid].release(rid),
                                   self.reliability.heartbeat_timeout_s)

    def _spawn(self, coro) -> None:
        """Run ``coro`` to completion even if the request that started it is cancelled."""
        t = asyncio.ensure_future(coro)
        self._cleanup.add(t)
        t.add_done_callback(self._cleanup.discard)

    def _pick_prefill(self, routing: RoutingRequest, unit: int | None = None,
                      admit: bool = True) -> str:
        """The policy's best prefill worker. With ``admit``, first apply the bounds: a full
        queue or (admission "reject") a TTFT target the best worker cannot meet answers
        RESOURCE_EXHAUSTED now. Retries skip them: the request was admitted already."""
        loads = [w for w in self.prefill_load.values()
                 if unit is None or self.units.get(w.worker_id) == unit]
        ranked = self.policy.rank_prefill(routing, loads)
        if not ranked:
            raise NoWorkerAvailable("no healthy prefill worker")
        best = ranked[0]
        if not admit:
            return best
        cap = self.reliability.max_queued_per_prefill
        if all(self.prefill_load[w].in_flight >= cap for w in ranked):
            self.rejected += 1
            err = Overloaded(f"every prefill queue holds {cap} requests", retry_after_s=1.0)
            err.reason = "queue_full"
            raise err
        best = next(w for w in ranked if self.prefill_load[w].in_flight < cap)
        predicted = self.policy.predict_ttft_s(routing, self.prefill_load[best])
        if (self.admission == "reject" and predicted is not None
                and routing.ttft_slo_s is not None and predicted > routing.ttft_slo_s):
            # It would miss its TTFT target even on the best worker: say so now rather than
            # queue it (and slow everyone behind it) for a response that is already late.
            self.rejected += 1
            err = Overloaded(f"predicted TTFT {predicted:.3f}s exceeds the target "
                             f"{routing.ttft_slo_s:.3f}s",
                             retry_after_s=predicted - routing.ttft_slo_s)
            err.reason = "ttft_slo"
            raise err
        return best

    async def _release(self, rid: str, decode_id: str | None, prefill_id: str | None,
                       prefill_task: asyncio.Task | None) -> None:
        """Free ``rid`` on both workers; bounded by the heartbeat timeout, since a hung
        worker may never answer (its reservations then expire by their lease)."""
        if prefill_task is not None and not prefill_task.done():
            prefill_task.cancel()
        timeout = self.reliability.heartbeat_timeout_s
        if prefill_id is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.prefills[prefill_id].abort(rid), timeout)
        if decode_id is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.decodes[decode_id].release(rid), timeout)

    def reliability_report(self) -> dict:
        return {"retries": self.retries, "failed_after_retries": self.failed_after_retries,
                "workers": {wid: {"alive": w.load.healthy, "deaths": w.deaths}
                            for wid, w in self.health.workers.items()}}

    def in_flight(self) -> int:
        return len(self._queues)

    @staticmethod
    def now() -> float:
        return time.monotonic()
