"""The prefill worker: batches prompts, samples first tokens, ships KV to decode workers.

Lifecycle of a request: ``add`` queues it (WAITING); ``step`` schedules prompts under
the token budget (long prompts are chunked across steps; prefix-cache hits skip
computed blocks), runs the model once for the batch, and for every prompt that
completes in this step sends its KV to the decode worker's reserved blocks layer by
layer from the model's per-layer hook (so the transfer of layer i overlaps the compute
of layer i+1), samples the first token, waits for the transfer to finish and returns a
``PrefillResult``, which carries the digest of the KV it wrote (``kv_checksum``) for the
decode worker to verify. The request's blocks are then freed (full blocks stay in the
prefix cache). ``abort`` drops a request wherever it is. A failed transfer (including a
destination reserved on an earlier incarnation of the decode cache, refused before any
byte moves) fails only its own request: the result carries the error and the blocks are
freed all the same.

A request sent before its decode reservation (``destination_follows``) is computed at
once; its destination comes through the ``destinations`` mailbox. If it lands while the
prompt's last step runs, the layer hook starts the transfer there and catches up on the
layers already computed; if it lands later, the request is *parked* after sampling (out
of the batch, blocks held) and shipped whole by the next ``step``, or failed once it has
waited ``transfer_timeout_s``. A first token that already finishes the request needs no
KV and is returned at once.

``step`` returns the results before anything is recorded; ``after_step`` then adds the
step to the step log and metrics (the step loop calls it after handing the results on).

At tensor parallel > 1 this is rank 0: every rank sends its own KV heads
(``follower.py``). The step message carries the step's ``ShipOrders`` and a request's
result waits for every rank's transfer (the runner's ``agree``); a destination that
arrives mid-step parks its request (the other ranks are already computing without it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import validate_prompt
from pdserve.engine.loader import LoadedModel
from pdserve.engine.messages import SampledToken
from pdserve.engine.model_step import EngineParts
from pdserve.engine.output_processor import token_stop_reason
from pdserve.engine.request import FinishReason, Request
from pdserve.engine.scheduler import SchedulerOutput
from pdserve.engine.worker_base import EngineWorker
from pdserve.kv_transfer.base import KVSender, TransferError
from pdserve.kv_transfer.incarnation import new_incarnation
from pdserve.kv_transfer.messages import KVDestination, KVDigest
from pdserve.kv_transfer.tp_destination import TPKVDestination
from pdserve.kv_transfer.tp_send import RankSends
from pdserve.prefill_worker.destinations import DestinationMailbox
from pdserve.prefill_worker.messages import (
    PrefillRequest,
    PrefillResult,
    PrefillStats,
    PrefillTimes,
)
from pdserve.prefill_worker.rank_sends import ShipOrder, ShipOrders, encode_orders


@dataclass
class _Pending:
    msg: PrefillRequest
    request: Request
    received: float  # the host's event loop got the call
    queued: float
    scheduled: float | None = None
    destination: KVDestination | None = None  # the request's, or the one that followed it
    destination_at: float | None = None  # when a destination that followed arrived
    # sampled: (first token, the finish reason it gives, when sampled)
    first: tuple[SampledToken, FinishReason | None, float] | None = None
    kv_done: float = 0.0  # when its KV landed (or its transfer failed)
    transfer: RankSends | None = None  # this rank's share (all of it at tp 1)
    error: str | None = None
    error_reason: str = "error"  # TransferError.reason of ``error`` (metrics label)
    digest: KVDigest | None = None

    @property
    def awaits_destination(self) -> bool:
        return self.msg.destination_follows and self.destination is None


@dataclass
class _Counters:
    completed: int = 0
    failed: int = 0


class PrefillWorker(EngineWorker):
    def __init__(self, worker_id: str, parts: EngineParts, sender: KVSender | None,
                 transfer_timeout_s: float = 30.0, kv_checksum: str = "off"):
        """``kv_checksum``: ``KVTransferConfig.checksum_mode``, what digest of the KV it
        writes the decode worker will verify."""
        super().__init__(worker_id, parts)
        self.sender = sender
        self.transfer_timeout_s = transfer_timeout_s
        self.kv_checksum = kv_checksum
        # This life of the worker: the router sees a restart as a change of incarnation.
        self.incarnation = new_incarnation()
        self._pending: dict[str, _Pending] = {}
        self._parked: dict[str, _Pending] = {}  # computed, waiting for their destination
        # (step, duration, wall-clock start, completed requests) not yet in metrics and log
        self._unrecorded: list[tuple[SchedulerOutput | None, float, float, list[_Pending]]] = []
        self.destinations = DestinationMailbox()  # written by the host's event loop
        self._counters = _Counters()

    @classmethod
    def from_config(cls, worker_id: str, config: EngineConfig, sender: KVSender | None,
                    loaded: LoadedModel | None = None, **options) -> PrefillWorker:
        """``options``: ``transfer_timeout_s``, ``kv_checksum``."""
        return cls(worker_id, EngineParts.build(config, loaded, load_tokenizer=False), sender,
                   **options)

    # -- commands (called on the loop thread) -------------------------------------------
    def add(self, msg: PrefillRequest, received: float | None = None) -> None:
        """Queue ``msg``; ``received``: when the host got the call (default: now)."""
        if msg.request_id in self._pending:
            raise ValueError(f"request {msg.request_id} is already queued on {self.worker_id}")
        # The router validates prompts against the model; only the worker knows its cache.
        # (A prompt larger than the whole cache would otherwise wait in the queue forever.)
        validate_prompt(msg.prompt_token_ids, self.loaded.model_config.vocab_size,
                        self.loaded.max_model_len, self.blocks.num_blocks, self.blocks.block_size)
        req = Request(msg.request_id, msg.prompt_token_ids, msg.params)
        now = time.monotonic()
        received = now if received is None else received
        self._pending[msg.request_id] = _Pending(msg, req, received, now,
                                                 destination=msg.destination)
        self.scheduler.add(req)
        self.refresh_state()

    def abort(self, request_id: str) -> bool:
        self.destinations.discard(request_id)
        self._parked.pop(request_id, None)
        p = self._pending.pop(request_id, None)
        if p is None:
            return False
        if p.transfer is not None:
            p.transfer.abort()
        self.scheduler.finish(p.request, FinishReason.ABORT)
        self.refresh_state()
        return True

    def has_work(self) -> bool:
        return self.scheduler.num_unfinished > 0 or (bool(self._parked) and self._parked_ready())

    def housekeeping(self) -> None:
        """Drop destinations nobody claimed (their request was aborted before they came)."""
        self.destinations.expire(self.transfer_timeout_s)

    def stats(self) -> PrefillStats:
        s = self.blocks.stats()
        waiting_tokens = sum(r.num_tokens - r.num_computed_tokens
                             for r in (*self.scheduler.waiting, *self.scheduler.running))
        return PrefillStats(self.worker_id, len(self.scheduler.waiting),
                            len(self.scheduler.running) + len(self._parked),
                            waiting_tokens, self.blocks.usage, s.num_free_blocks, s.num_blocks,
                            s.prefix_hit_tokens, s.prefix_queries_tokens,
                            self._counters.completed, self._counters.failed, self.incarnation,
                            self.blocks.block_size)

    # -- one step ---------------------------------------------------------------------
    def step(self) -> list[PrefillResult]:
        completed = self._ship_parked() if self._parked else []
        sched = self.model_step.schedule()
        if sched.chunks:
            completed += self._run(sched)
        replied = time.monotonic()
        return [self._result(p, replied) for p in completed]

    def _run(self, sched: SchedulerOutput) -> list[_Pending]:
        """One model step; the requests it completed (their KV landed or failed)."""
        step_t0, step_wall = time.perf_counter(), time.time()
        now = time.monotonic()
        for c in sched.chunks:
            p = self._pending[c.request.request_id]
            if p.scheduled is None:
                p.scheduled = now
        completing = [self._pending[c.request.request_id] for c in sched.chunks if c.samples]
        sending = [p for p in completing if self._claim_destination(p) and self._begin_transfer(p)]
        # With other ranks, a destination must be known when the step is sent to them.
        late = [p for p in completing if p.awaits_destination] if self._single else []
        # on the cache's device: the layer hook index_selects the (GPU) cache with it
        src_tables = {p.msg.request_id: torch.tensor(self.blocks.block_table(p.msg.request_id),
                                                     dtype=torch.long, device=self.runner.device)
                      for p in (*sending, *late)}
        hook = self._layer_hook(sending, late, src_tables) if sending or late else None
        ordered = list(sending)  # what the other ranks ship (the hook may add late ones here)
        sampled = self.model_step.run(sched, layer_done=hook, extra=self._orders(ordered),
                                      reply=0 if self._single else len(ordered))
        sampled_at = time.monotonic()
        done = []
        for p, (_, tok) in zip(completing, sampled, strict=True):
            reason = token_stop_reason(tok.token_id, 1, p.request.num_tokens + 1, p.msg.params,
                                       self.loaded.eos_token_ids, self.loaded.max_model_len)
            p.first = (tok, reason, sampled_at)
            if p.awaits_destination and reason is None and p.error is None:
                self._park(p)  # its KV goes out when the destination comes
                continue
            done.append(p)
        self._finish_all(done, ordered)
        for p in done:
            self._settle(p)
        self._unrecorded.append((sched, time.perf_counter() - step_t0, step_wall, done))
        return done

    @property
    def _single(self) -> bool:
        """One rank: no other rank to tell what to ship or to wait for."""
        return self.runner.num_ranks == 1

    def _orders(self, ordered: list[_Pending]) -> bytes:
        """The step message's ``extra``: what every other rank ships (none at tp 1)."""
        if self._single or not ordered:
            return b""
        return encode_orders(ShipOrders(tuple(
            ShipOrder(p.destination, tuple(self.blocks.block_table(p.msg.request_id)))
            for p in ordered), self.kv_checksum))

    def _finish_all(self, done: list[_Pending], ordered: list[_Pending]) -> None:
        """Wait for this rank's transfers of ``done``; then, with other ranks, for theirs
        of ``ordered`` (a request fails if any rank's part failed)."""
        for p in done:
            p.kv_done = self._finish_transfer(p) or p.first[2]
        if self._single or not ordered:
            return
        agreed = self.runner.agree([int(p.error is None) for p in ordered])
        for p, ok in zip(ordered, agreed, strict=True):
            if not ok and p.error is None:
                p.error = "KV transfer failed on another tensor-parallel rank"
                p.digest = None
                p.kv_done = time.monotonic()

    def after_step(self) -> None:
        """The step log and metrics of the steps since the last call (the step loop calls
        this once their results are on their way; so must whoever else drives ``step``)."""
        for sched, duration, step_wall, done in self._unrecorded:
            if sched is not None:
                self.step_log.add("prefill", [c.num_tokens for c in sched.chunks], duration,
                                  step_wall)
            if self.metrics is not None:
                if sched is not None:
                    self.metrics.observe_step(len(sched.chunks), sched.num_tokens, duration,
                                              len(sched.preempted))
                self._record(done)
        self._unrecorded.clear()

    def _settle(self, p: _Pending) -> None:
        """``p``'s KV landed (``_finish_all``): free its blocks (full ones stay cached)."""
        self._pending.pop(p.msg.request_id, None)
        self.scheduler.finish(p.request, FinishReason.STOP)
        ok = p.error is None
        self._counters.completed += ok
        self._counters.failed += not ok

    def _result(self, p: _Pending, replied: float) -> PrefillResult:
        tok, reason, sampled_at = p.first
        ok = p.error is None
        times = PrefillTimes(p.received, p.queued, p.scheduled or sampled_at, sampled_at,
                             p.kv_done, replied, p.destination_at)
        return PrefillResult(
            request_id=p.msg.request_id, token=tok if ok else None,
            finish_reason=reason.value if reason else None, times=times,
            num_cached_tokens=p.request.num_cached_tokens, error=p.error,
            kv_digest=p.digest if ok else None)

    # -- destinations that follow their prompt ----------------------------------------
    def _claim_destination(self, p: _Pending) -> bool:
        """Whether ``p`` has its destination, taking it from the mailbox if it came."""
        if p.destination is None and p.msg.destination_follows:
            got = self.destinations.take(p.msg.request_id)
            if got is not None:
                p.destination, p.destination_at = got
        return p.destination is not None

    def _park(self, p: _Pending) -> None:
        """Computed and sampled, but no destination yet: hold the blocks, leave the batch."""
        self.scheduler.detach(p.request)
        self._parked[p.msg.request_id] = p

    def _parked_ready(self) -> bool:
        now = time.monotonic()
        return any(self.destinations.has(rid) or now - p.first[2] > self.transfer_timeout_s
                   for rid, p in self._parked.items())

    def _ship_parked(self) -> list[_Pending]:
        """Ship every parked prompt whose destination came, all layers at once; fail those
        that waited past the transfer timeout (the router gave up on them). Those done."""
        shipped, ordered, now = [], [], time.monotonic()
        for rid, p in list(self._parked.items()):
            if self._claim_destination(p):
                if self._begin_transfer(p):
                    ordered.append(p)
            elif now - p.first[2] > self.transfer_timeout_s:
                p.error = f"no KV destination came within {self.transfer_timeout_s:g}s"
            else:
                continue
            del self._parked[rid]
            shipped.append(p)
        if ordered and not self._single:
            self.runner.control(self._orders(ordered), reply=len(ordered))
        for p in ordered:
            table = torch.tensor(self.blocks.block_table(p.msg.request_id), dtype=torch.long,
                                 device=self.runner.device)
            self._send_all_layers(p, table)
        self._finish_all(shipped, ordered)
        for p in shipped:
            self._settle(p)
        if shipped:
            self._unrecorded.append((None, 0.0, 0.0, shipped))
        return shipped

    def _record(self, completed: list[_Pending]) -> None:
        m = self.metrics
        self.refresh_state()
        for p in completed:
            t = p.transfer
            if t is not None and t.started_at is not None:
                end = t.finished_at or time.perf_counter()
                m.observe_transfer(self.sender.name, t.bytes_sent, end - t.started_at,
                                   p.error is None, p.error_reason)
            elif p.error is not None and p.destination is not None:
                m.observe_transfer(p.destination.endpoint.backend, 0, 0.0, False,
                                   p.error_reason)

    def _begin_transfer(self, p: _Pending) -> bool:
        dest = p.destination
        if dest is None:
            return False
        if self.sender is None:
            p.error = "this prefill worker has no KV sender configured"
            return False
        try:
            whole = TPKVDestination.of(dest, self.loaded.model_config.num_kv_heads)
            p.transfer = RankSends.begin(self.sender, whole, 0, self.runner.num_ranks,
                                         self.runner.kv_cache.spec, self.kv_checksum)
        except TransferError as exc:
            p.error, p.error_reason = f"KV transfer failed to start: {exc}", exc.reason
            return False
        except ValueError as exc:  # a destination that does not fit this model's heads
            p.error = f"KV transfer failed to start: {exc}"
            return False
        return True

    def _layer_hook(self, sending: list[_Pending], late: list[_Pending],
                    tables: dict[str, torch.Tensor]):
        """Ship layer ``i`` of every transfer after the model computed it. A destination
        that arrives mid-step starts its transfer there, catching up on layers < ``i``."""

        def layer_done(layer: int) -> None:
            for p in list(late):
                if self._claim_destination(p):
                    late.remove(p)
                    if self._begin_transfer(p):
                        for done in range(layer):
                            self._send_layer(p, done, tables[p.msg.request_id])
                        sending.append(p)
            for p in sending:
                self._send_layer(p, layer, tables[p.msg.request_id])

        return layer_done

    def _send_layer(self, p: _Pending, layer: int, table: torch.Tensor) -> None:
        if p.error is not None:
            return
        # index_select copies, so the sender may ship it asynchronously.
        kv = self.runner.kv_cache.data[layer].index_select(1, table)
        self._sending(p, lambda: p.transfer.send_layer(layer, kv))

    def _send_all_layers(self, p: _Pending, table: torch.Tensor) -> None:
        """Every layer at once (its KV is all computed): one gather of the request's
        blocks over all layers, one stacked send (one copy where the backend can)."""
        if p.error is not None:
            return
        kv = self.runner.kv_cache.data.index_select(2, table)
        self._sending(p, lambda: p.transfer.send_layers(0, kv))

    def _sending(self, p: _Pending, send) -> None:
        try:
            send()
        except TransferError as exc:
            p.error, p.error_reason = f"KV transfer failed: {exc}", exc.reason
            p.transfer.abort()

    def _finish_transfer(self, p: _Pending) -> float | None:
        """Wait for ``p``'s transfer; when it finished (None: there was none to wait for)."""
        if p.transfer is None or p.error is not None:
            return None
        try:
            p.transfer.finish(timeout=self.transfer_timeout_s)
            p.digest = p.transfer.digest()
        except TransferError as exc:
            p.error, p.error_reason = f"KV transfer failed: {exc}", exc.reason
            p.transfer.abort()
        return time.monotonic()
