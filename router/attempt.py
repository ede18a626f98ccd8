"""One attempt at serving a request: reserve on decode, prefill, hand over, stream.

``AttemptRunner.run`` is an async generator of ``TokenEvent``: it reserves the prompt's KV
blocks on the best decode worker with room, sends the prompt with that reservation to a
prefill worker (which writes the KV there and answers with the first token: yielded at
once, TTFT), tells the decode worker to start, and yields its tokens (delivered to the
attempt's ``Route`` by the stream dispatch) until a finish reason. When conditional
disaggregation (``prefill_placement.py``) says so, the prompt is instead prefilled on the
best decode worker that takes it (``prefill_local``), and every token, the first
included, comes through the route; if none takes it, the attempt goes the first way. A
resumed request
prefills its prompt plus the tokens already sent, with ``max_tokens`` shrunk and
``output_offset`` advanced so seeded draws stay aligned.

Failures another attempt may not meet (a worker died or hung, a KV transfer broke, a
reservation was lost to a restart) raise ``AttemptFailed`` with a metrics cause. However
the attempt ends (finish, client cancel, a stop string found by the caller, an error),
its ``finally`` releases it on both workers, in a task of its own: the generator may be
closing because its task was cancelled, and the release must still happen. A reservation
whose call was in flight when the attempt was cancelled is released once it lands.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import NoReturn

from pdserve.decode_worker.messages import (
    LocalPrefillRequest,
    NoCapacityError,
    Reservation,
    ReservationLost,
    ReserveRequest,
    StartDecode,
)
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kv_transfer.messages import KVDestination
from pdserve.prefill_worker.messages import PrefillRequest, PrefillResult
from pdserve.router.admission import Admission, overloaded
from pdserve.router.clients import DecodeClient, PrefillClient, WorkerGone
from pdserve.router.events import TokenEvent
from pdserve.router.health import WorkerHealth
from pdserve.router.hops import AttemptStamps
from pdserve.router.local_prefill import LOCAL, REMOTE
from pdserve.router.policy import RoutingRequest
from pdserve.router.prefill_placement import DECODE_FULL, PrefillPlacement
from pdserve.router.reliability import ReliabilityConfig
from pdserve.router.request_types import ValidatedRequest
from pdserve.router.routes import AttemptId, Route, RouteTable, attempt_id
from pdserve.router.status import NoWorkerAvailable, Overloaded


class AttemptFailed(Exception):
    """This attempt failed in a way another attempt can fix; what was already sent to the
    client stays sent. ``cause``: prefill_failed, decode_failed or transfer_failed."""

    def __init__(self, message: str, cause: str):
        super().__init__(message)
        self.cause = cause


@dataclass
class _Attempt:
    """One attempt's moving parts, for its ``finally``."""

    aid: AttemptId
    route: Route
    prompt: tuple[int, ...]
    params: SamplingParams
    routing: RoutingRequest
    decode_id: str | None = None
    prefill_id: str | None = None
    prefill_task: asyncio.Task | None = None
    finished: bool = False
    stamps: AttemptStamps = dataclasses.field(default_factory=lambda: AttemptStamps(
        time.monotonic()))


class AttemptRunner:
    def __init__(self, prefills: dict[str, PrefillClient], decodes: dict[str, DecodeClient],
                 admission: Admission, health: WorkerHealth, routes: RouteTable,
                 reliability: ReliabilityConfig, placement: PrefillPlacement | None = None):
        self.prefills = prefills
        self.placement = placement or PrefillPlacement()
        self.decodes = decodes
        self.admission = admission
        self.health = health
        self.routes = routes
        self.reliability = reliability
        self._cleanup: set[asyncio.Task] = set()

    async def run(self, req: ValidatedRequest, routing: RoutingRequest,
                  queue: asyncio.Queue, sent: tuple[int, ...], attempt: int
                  ) -> AsyncIterator[TokenEvent]:
        """Attempt ``attempt`` (0 = the first; only it goes through admission) of ``req``,
        after ``sent`` tokens already streamed."""
        a = self._begin(req, routing, queue, sent, attempt)
        try:
            if await self._prefilled_locally(a):
                async for ev in self._stream(a, time.monotonic(), local=True):
                    yield ev
                return
            result, destination = await self._reserve_and_prefill(a, admit=attempt == 0)
            first = result.token
            done = result.finish_reason is not None or a.decode_id is None
            reason = result.finish_reason or ("length" if done else None)
            yield TokenEvent((first.token_id,), (first,) if a.params.logprobs is not None else (),
                             reason, result.num_cached_tokens, result.queue_s, result.prefill_s,
                             result.transfer_wait_s, stamps=a.stamps)
            if done:
                a.finished = True
                return
            async for ev in self._decode(a, result, destination):
                yield ev
        finally:
            self._end(a)

    def _begin(self, req, routing, queue, sent, attempt) -> _Attempt:
        aid = attempt_id(req.request_id, attempt)
        prompt = req.prompt_token_ids + sent
        params = req.params if not sent else dataclasses.replace(
            req.params, max_tokens=req.params.max_tokens - len(sent),
            output_offset=req.params.output_offset + len(sent))
        routing = dataclasses.replace(routing, request_id=aid, num_prompt_tokens=len(prompt),
                                      max_tokens=params.max_tokens, prompt_token_ids=prompt)
        return _Attempt(aid, self.routes.open(aid, queue), prompt, params, routing)

    async def _reserve_and_prefill(self, a: _Attempt, admit: bool):
        units = self.admission.units
        # Admission before any reservation (after it when units constrain the pair).
        if not units:
            a.prefill_id = self.admission.pick_prefill(a.routing, admit=admit)
        reservation = None
        if a.params.max_tokens > 1 and not units and self.admission.decode_room_likely(a.routing):
            # The prompt goes out first and its destination after it: the reservation's
            # round trip overlaps the prefill instead of preceding it.
            self._dispatch_prefill(a, None, follows=True)
            reservation = await self._reserve_for(a)
            await self._send_destination(a, reservation.destination)
        else:
            if a.params.max_tokens > 1:
                reservation = await self._reserve_for(a)
            if a.prefill_id is None:
                a.prefill_id = self.admission.pick_prefill(a.routing, units.get(a.decode_id),
                                                           admit=admit)
            self._dispatch_prefill(a, reservation.destination if reservation else None)
        result = await self._prefill_result(a)
        if result.ok:
            self.admission.policy.observe_prefill(
                a.routing, a.prefill_id, result.num_cached_tokens,
                self.admission.prefill_load[a.prefill_id].block_size)
        else:
            raise AttemptFailed(result.error or "prefill failed", "transfer_failed")
        return result, reservation.destination if reservation else None

    async def _reserve_for(self, a: _Attempt) -> Reservation:
        a.stamps.reserve_sent = time.monotonic()
        a.decode_id, reservation = await self._reserve(a.routing)
        a.stamps.reserved, a.stamps.reserved_at = time.monotonic(), reservation.reserved_at
        a.route.decode_worker = a.decode_id
        return reservation

    def _dispatch_prefill(self, a: _Attempt, destination: KVDestination | None,
                          follows: bool = False) -> None:
        """Send the prompt, with its destination or (``follows``) before it; the worker's
        load counts it until the call ends."""
        load = self.admission.prefill_load[a.prefill_id]
        load.in_flight += 1
        load.queued_tokens += len(a.prompt)
        load.prefill_queue[a.aid] = len(a.prompt)

        def ended(_task) -> None:
            load.in_flight -= 1
            load.queued_tokens -= len(a.prompt)
            load.prefill_queue.pop(a.aid, None)

        a.stamps.prefill_sent = time.monotonic()
        a.prefill_task = asyncio.ensure_future(self.prefills[a.prefill_id].prefill(
            PrefillRequest(a.aid, a.prompt, a.params, destination, destination_follows=follows)))
        a.prefill_task.add_done_callback(ended)

    async def _send_destination(self, a: _Attempt, destination: KVDestination) -> None:
        if a.prefill_task.done():  # it failed, or its first token ended it: its result says
            return
        a.stamps.destination_sent = time.monotonic()
        try:
            await self._unless_dead(asyncio.ensure_future(
                self.prefills[a.prefill_id].set_destination(destination)), a.prefill_id)
        except WorkerGone as exc:
            self._prefill_gone(a, exc)

    async def _prefill_result(self, a: _Attempt) -> PrefillResult:
        try:
            result = await self._unless_dead(a.prefill_task, a.prefill_id)
        except WorkerGone as exc:
            self._prefill_gone(a, exc)
        a.stamps.prefill_returned, a.stamps.prefill = time.monotonic(), result.times
        return result

    def _prefill_gone(self, a: _Attempt, exc: WorkerGone) -> NoReturn:
        self.health.mark_dead(a.prefill_id, str(exc)[:200])
        raise AttemptFailed(f"prefill worker {a.prefill_id} failed", "prefill_failed") from exc

    async def _decode(self, a: _Attempt, result: PrefillResult, destination
                      ) -> AsyncIterator[TokenEvent]:
        started = time.monotonic()
        try:
            await self.decodes[a.decode_id].start(StartDecode(
                a.aid, a.prompt, a.params, result.token, destination.endpoint.incarnation,
                result.kv_digest, a.prefill_id))
        except WorkerGone as exc:
            self.health.mark_dead(a.decode_id, str(exc)[:200])
            raise AttemptFailed(f"decode worker {a.decode_id} failed", "decode_failed") from exc
        except ReservationLost as exc:  # it restarted since the reservation
            raise AttemptFailed(str(exc), "decode_failed") from exc
        async for ev in self._stream(a, started):
            yield ev

    async def _stream(self, a: _Attempt, started: float, local: bool = False
                      ) -> AsyncIterator[TokenEvent]:
        """The attempt's tokens from its decode worker, until a finish reason. ``local``:
        the worker prefilled the prompt itself, so the first delta holds the first token
        (TTFT: it carries the attempt's stamps) and no decode queue is measured."""
        first = True
        while True:
            delta = await a.route.queue.get()
            if delta.error:
                raise AttemptFailed(delta.error,
                                    "decode_failed" if a.route.died else "transfer_failed")
            a.finished = delta.finish_reason is not None
            if first and local:
                a.stamps.local_first = time.monotonic()
                yield TokenEvent(delta.token_ids, delta.logprobs, delta.finish_reason,
                                 stamps=a.stamps, prefilled_locally=True)
            else:
                yield TokenEvent(delta.token_ids, delta.logprobs, delta.finish_reason,
                                 decode_queue_s=time.monotonic() - started if first else None)
            first = False
            if a.finished:
                return

    def _end(self, a: _Attempt) -> None:
        self.routes.close(a.aid)
        if a.decode_id is not None:
            load = self.admission.decode_load[a.decode_id]
            load.in_flight -= 1
            load.decode_contexts.pop(a.aid, None)
        # Nothing to release for an attempt refused before it reserved or sent anything
        # (the common case under overload: no task per rejected request).
        if not a.finished and (a.decode_id is not None or a.prefill_task is not None):
            self.spawn(self.release(a.aid, a.decode_id, a.prefill_id, a.prefill_task))

    async def _prefilled_locally(self, a: _Attempt) -> bool:
        """Whether the attempt's prompt went to a decode worker to be prefilled there
        (conditional disaggregation); the decision is counted either way."""
        decision = self.placement.decide(a.routing, list(self.admission.prefill_load.values()))
        where, reason = decision.where, decision.reason
        if decision.local:
            msg = LocalPrefillRequest(a.aid, a.prompt, a.params)

            def send(wid: str):
                # Its first token may reach the stream before the call's answer: the route
                # takes that worker's tokens from the moment the call leaves.
                self._route_to(a, wid)
                return self.decodes[wid].prefill_local(msg)

            a.stamps.reserve_sent = time.monotonic()
            try:
                a.decode_id, _ = await self._on_decode(a.routing, send)
                a.stamps.reserved = time.monotonic()
            except (Overloaded, NoWorkerAvailable):  # nobody took it: the prefill pool will
                self._route_to(a, None)
                a.stamps.reserve_sent = None
                where, reason = REMOTE, DECODE_FULL
        self.placement.count(where, reason)
        return where == LOCAL

    def _route_to(self, a: _Attempt, wid: str | None) -> None:
        """Point the attempt's route at ``wid``; anything a worker tried before said
        (a death notice) is dropped with the old route."""
        if a.route.decode_worker is not None:
            a.route = self.routes.open(a.aid, a.route.queue)
        a.route.decode_worker = wid

    async def _reserve(self, routing: RoutingRequest):
        return await self._on_decode(routing, lambda wid: self.decodes[wid].reserve(
            ReserveRequest(routing.request_id, routing.num_prompt_tokens)))

    async def _on_decode(self, routing: RoutingRequest, send: Callable[[str], Awaitable]):
        """(worker id, answer) of the first decode worker, in rank order, that takes
        ``send(worker id)`` (a reservation or a local prefill) without NoCapacityError."""
        full = 0
        for wid in self.admission.rank_decode(routing):
            if self.admission.decode_load[wid].seats_full:
                # This router alone holds as many requests there as the worker takes: it
                # would refuse. Not asking spares an overloaded worker a call per request
                # (under 5x overload those calls starved its event loop past the heartbeat).
                full += 1
                continue
            try:
                res = await self._call_on(wid, routing.request_id, send)
            except NoCapacityError:
                full += 1
                self.admission.decode_load[wid].refused = True
                continue
            except WorkerGone:
                self.admission.decode_load[wid].healthy = False
                continue
            load = self.admission.decode_load[wid]
            load.in_flight += 1
            load.decode_contexts[routing.request_id] = routing.num_prompt_tokens
            return wid, res
        if not full:  # nobody answered: that is an outage, not overload
            raise NoWorkerAvailable("no decode worker is reachable")
        raise overloaded("every decode worker's KV cache is full", 1.0, "kv_full")

    async def _call_on(self, wid: str, aid: str, send: Callable[[str], Awaitable]):
        """``send(wid)``. If this task is cancelled (client gone, deadline) while
        the call is in flight, the worker may still take the request: the call is left to
        finish and whatever it took is released, instead of waiting for the lease."""
        call = asyncio.ensure_future(send(wid))
        try:
            return await asyncio.shield(call)
        except asyncio.CancelledError:
            self.spawn(self._release_when_reserved(call, wid, aid))
            raise

    async def _release_when_reserved(self, call: asyncio.Future, wid: str, aid: str) -> None:
        try:
            await asyncio.wait_for(call, self.reliability.heartbeat_timeout_s)
        except Exception:  # nothing was reserved, or the worker is gone (its lease frees it)
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.decodes[wid].release(aid),
                                   self.reliability.heartbeat_timeout_s)

    async def _unless_dead(self, call: asyncio.Future, wid: str):
        """``call``'s result, or ``WorkerGone`` as soon as the heartbeat declares ``wid``
        dead (a hung worker never answers; a killed one may take Ray a moment)."""
        if not call.done():
            dead = self.health.death(wid)
            try:
                await asyncio.wait((call, dead), return_when=asyncio.FIRST_COMPLETED)
            finally:
                dead.cancel()
        if call.done():
            return call.result()
        raise WorkerGone(f"worker {wid} missed its heartbeats")

    async def release(self, aid: str, decode_id: str | None, prefill_id: str | None,
                      prefill_task: asyncio.Task | None) -> None:
        """Free ``aid`` on both workers; bounded by the heartbeat timeout, since a hung
        worker may never answer (its reservations then expire by their lease)."""
        if prefill_task is not None and not prefill_task.done():
            prefill_task.cancel()
        timeout = self.reliability.heartbeat_timeout_s
        if prefill_id is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.prefills[prefill_id].abort(aid), timeout)
        if decode_id is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.decodes[decode_id].release(aid), timeout)

    def spawn(self, coro) -> None:
        """Run ``coro`` to completion even if the request that started it is cancelled."""
        t = asyncio.ensure_future(coro)
        self._cleanup.add(t)
        t.add_done_callback(self._cleanup.discard)

    async def drain(self) -> None:
        """Wait for the releases still running."""
        await asyncio.gather(*self._cleanup, return_exceptions=True)
