"""The request path across the pools: reserve on decode, prefill, hand over, stream.

For each request ``generate`` (an async generator of ``TokenEvent``):
1. ranks decode workers (policy) and reserves the prompt's KV blocks on the first that
   has room (RESOURCE_EXHAUSTED if none has);
2. sends the prompt with the reservation to the best prefill worker, which writes the
   KV into those blocks and returns the first token: yielded at once (TTFT);
3. tells the decode worker to start; its per-step ``TokenBatch`` messages (consumed by
   one task per decode worker for the router's life) are dispatched to the request's
   queue and yielded until a finish reason arrives.
Whatever way the generator ends (finish, client cancel, a stop string found by the
caller, an error), ``finally`` releases the request on both workers. The worker ids of
every request in flight are tracked so that a worker's load is always known.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from pdserve.decode_worker.messages import ReserveRequest, StartDecode, TokenBatch, TokenDelta
from pdserve.decode_worker.worker import NoCapacityError
from pdserve.engine.sampler import SampledToken
from pdserve.prefill_worker.messages import PrefillRequest
from pdserve.router.clients import DecodeClient, PrefillClient, WorkerGone
from pdserve.router.policy import RoutingPolicy, RoutingRequest, WorkerLoad
from pdserve.router.slo import SloConfig
from pdserve.router.status import InvalidArgument, NoWorkerAvailable, Overloaded, TransferFailed
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


class Orchestrator:
    def __init__(self, prefills: Sequence[PrefillClient], decodes: Sequence[DecodeClient],
                 policy: RoutingPolicy, slo: SloConfig | None = None,
                 admission: str = "reject", stats_interval_s: float = 0.5,
                 units: dict[str, int] | None = None):
        """With no prefill clients, the decode clients are colocated workers (both phases).
        ``units`` maps worker ids to units: a request's prefill worker is then chosen among
        those of its decode worker's unit (low node-affinity plans keep KV inside a node)."""
        if admission not in ADMISSION_MODES:
            raise ValueError(f"admission must be one of {ADMISSION_MODES}, got {admission!r}")
        self.prefills = {c.worker_id: c for c in prefills}
        self.decodes = {c.worker_id: c for c in decodes}
        self.policy = policy
        self.slo = slo or SloConfig()
        self.admission = admission
        self.stats_interval_s = stats_interval_s
        self.rejected = 0
        self.colocated = not self.prefills
        self.units = units or {}
        self.prefill_load = {w: WorkerLoad(w) for w in self.prefills}
        self.decode_load = {w: WorkerLoad(w) for w in self.decodes}
        self._queues: dict[str, asyncio.Queue[TokenDelta]] = {}
        self._tasks: list[asyncio.Task] = []
        self._cleanup: set[asyncio.Task] = set()

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Start one consumer per decode worker's token stream (call inside the event loop)."""
        for client in self.decodes.values():
            self._tasks.append(asyncio.create_task(self._consume(client)))
        self._tasks.append(asyncio.create_task(self._refresh_forever()))

    async def _refresh_forever(self) -> None:
        while True:
            try:
                await self.refresh_loads()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("refreshing worker loads failed")
            await asyncio.sleep(self.stats_interval_s)

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, *self._cleanup, return_exceptions=True)

    async def _consume(self, client: DecodeClient) -> None:
        while True:
            try:
                async for batch in client.stream():
                    self._dispatch(batch)
            except asyncio.CancelledError:
                raise
            except WorkerGone:
                log.error("decode worker %s is gone", client.worker_id)
                self.decode_load[client.worker_id].healthy = False
                self._fail_worker_requests(client.worker_id)
                return
            except Exception:
                log.exception("token stream from %s broke; resubscribing", client.worker_id)
                await asyncio.sleep(0.5)

    def _dispatch(self, batch: TokenBatch) -> None:
        contexts = self.decode_load[batch.worker_id].decode_contexts \
            if batch.worker_id in self.decode_load else {}
        for delta in batch.deltas:
            if delta.request_id in contexts:
                contexts[delta.request_id] += len(delta.token_ids)
            q = self._queues.get(delta.request_id)
            if q is not None:
                q.put_nowait(delta)

    def _fail_worker_requests(self, worker_id: str) -> None:
        for rid, q in self._queues.items():
            if getattr(q, "decode_worker", None) == worker_id:
                q.put_nowait(TokenDelta(rid, (), (), "abort", error="decode worker died"))

    async def refresh_loads(self) -> None:
        """Pull KV headroom from decode workers (and mark dead ones)."""
        for wid, client in self.decodes.items():
            try:
                s = await client.stats()
            except WorkerGone:
                self.decode_load[wid].healthy = False
                continue
            load = self.decode_load[wid]
            load.free_blocks, load.total_blocks = s.num_free_blocks, s.num_blocks
            load.block_size = getattr(s, "block_size", load.block_size)

    # -- the request path ---------------------------------------------------------------
    async def generate(self, req: ValidatedRequest) -> AsyncIterator[TokenEvent]:
        rid, prompt, params = req.request_id, req.prompt_token_ids, req.params
        if rid in self._queues:
            raise InvalidArgument(f"request id {rid!r} is already in flight")
        slo = self.slo.with_overrides(req.slo.ttft_s, req.slo.tpot_s)
        routing = RoutingRequest(rid, len(prompt), params.max_tokens, slo.ttft_s, slo.tpot_s)
        if self.colocated:
            async for ev in self._generate_colocated(req, routing):
                yield ev
            return
        # Admission happens here, before any reservation (after it, when units constrain the pair).
        prefill_id = None if self.units else self._pick_prefill(routing)
        needs_decode = params.max_tokens > 1
        queue: asyncio.Queue[TokenDelta] = asyncio.Queue()
        self._queues[rid] = queue
        decode_id = None
        prefill_task: asyncio.Task | None = None
        finished = False
        try:
            destination = None
            if needs_decode:
                decode_id, destination = await self._reserve(routing)
                queue.decode_worker = decode_id  # type: ignore[attr-defined]
            if prefill_id is None:
                prefill_id = self._pick_prefill(routing, self.units.get(decode_id))
            pl = self.prefill_load[prefill_id]
            pl.in_flight += 1
            pl.queued_tokens += len(prompt)
            pl.prefill_queue[rid] = len(prompt)
            try:
                prefill_task = asyncio.ensure_future(self.prefills[prefill_id].prefill(
                    PrefillRequest(rid, prompt, params, destination)))
                result = await prefill_task
            except WorkerGone as exc:
                self.prefill_load[prefill_id].healthy = False
                raise NoWorkerAvailable(f"prefill worker {prefill_id} failed: {exc}") from exc
            finally:
                pl.in_flight -= 1
                pl.queued_tokens -= len(prompt)
                pl.prefill_queue.pop(rid, None)
            if not result.ok:
                raise TransferFailed(result.error or "prefill failed")
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
            await self.decodes[decode_id].start(StartDecode(rid, prompt, params, first))
            first_decode = True
            while True:
                delta = await queue.get()
                if delta.error:
                    raise TransferFailed(delta.error)
                if delta.finish_reason is not None:
                    finished = True
                yield TokenEvent(delta.token_ids, delta.logprobs, delta.finish_reason,
                                 decode_queue_s=time.monotonic() - started if first_decode else None)
                first_decode = False
                if finished:
                    return
        finally:
            self._queues.pop(rid, None)
            if decode_id is not None:
                self.decode_load[decode_id].in_flight -= 1
                self.decode_load[decode_id].decode_contexts.pop(rid, None)
            if not finished:
                # Runs in its own task: this generator may be closing because its task was
                # cancelled, and the release must still happen.
                t = asyncio.ensure_future(self._release(rid, decode_id, prefill_id, prefill_task))
                self._cleanup.add(t)
                t.add_done_callback(self._cleanup.discard)

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
        self._queues[rid] = queue
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
            load.in_flight -= 1
            load.decode_contexts.pop(rid, None)
            if not finished:
                t = asyncio.ensure_future(self._release(rid, wid, None, None))
                self._cleanup.add(t)
                t.add_done_callback(self._cleanup.discard)

    async def _reserve(self, routing: RoutingRequest):
        ranked = self.policy.rank_decode(routing, list(self.decode_load.values()))
        if not ranked:
            raise NoWorkerAvailable("no healthy decode worker")
        full = 0
        for wid in ranked:
            try:
                res = await self.decodes[wid].reserve(
                    ReserveRequest(routing.request_id, routing.num_prompt_tokens))
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

    def _pick_prefill(self, routing: RoutingRequest, unit: int | None = None) -> str:
        loads = [w for w in self.prefill_load.values()
                 if unit is None or self.units.get(w.worker_id) == unit]
        ranked = self.policy.rank_prefill(routing, loads)
        if not ranked:
            raise NoWorkerAvailable("no healthy prefill worker")
        best = ranked[0]
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
        if prefill_task is not None and not prefill_task.done():
            prefill_task.cancel()
        if prefill_id is not None:
            with contextlib.suppress(Exception):
                await self.prefills[prefill_id].abort(rid)
        if decode_id is not None:
            with contextlib.suppress(Exception):
                await self.decodes[decode_id].release(rid)

    def in_flight(self) -> int:
        return len(self._queues)

    @staticmethod
    def now() -> float:
        return time.monotonic()
