"""The decode worker: reserves KV blocks, receives KV, runs continuous-batching decode.

Lifecycle of a request: ``reserve`` allocates blocks for the prompt and registers the
transfer with the KV receiver, returning where the prefill worker must write (a lease:
unclaimed reservations are freed after ``lease_s``); ``start`` hands over the first
token once prefill is done; the request joins the running batch as soon as its
transfer is DONE and, when the prefill worker sent a KV digest, the digest of its own
blocks matches it (a FAILED transfer or a mismatch ends it with an error and frees its
blocks; the router retries). A ``start`` for a request reserved on an earlier
incarnation of this worker's cache (it restarted) raises ``ReservationLost``.
Each ``step`` decodes one token for every running request and returns one
``TokenBatch``. Requests finish on a token-level stop (EOS, stop ids, max_tokens,
context length) or when ``release`` is called (client cancel, a stop string found by
the router, failure elsewhere). If blocks run out, the scheduler preempts and the
request is recomputed here from prompt + generated tokens.

A request the router chose to prefill here (conditional disaggregation) skips the
reservation: ``prefill_local`` queues it in the scheduler with nothing computed, the
way a preempted request is queued for recomputation, and its prompt runs in this
worker's own steps; from there on (stream, finish, ``release``) it is like any other.

At tensor parallel > 1 this is rank 0: every rank has its own KV receiver and holds its
KV heads of the same blocks (``follower.py``). A reservation's destination names every
rank's endpoint (gathered once at start-up). Where receivers learn of arrival themselves
(TCP), the other ranks are told which transfers to expect before the reservation is
handed out, and a request is admitted once every rank's part landed
(``rank_control.py``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from pdserve.decode_worker.messages import (
    DecodeStats,
    LocalPrefillRequest,
    NoCapacityError,
    Reservation,
    ReservationLost,
    ReserveRequest,
    StartDecode,
    TokenBatch,
    TokenDelta,
)
from pdserve.decode_worker.rank_control import (
    FAILED,
    LANDED,
    STATE_CODES,
    RankControl,
    Register,
    decode_endpoint,
    encode_control,
    encode_endpoint,
)
from pdserve.engine.block_manager import NoFreeBlocksError
from pdserve.engine.config import EngineConfig
from pdserve.engine.loader import LoadedModel, kv_cache_spec, load_model
from pdserve.engine.model_step import EngineParts
from pdserve.engine.output_processor import token_stop_reason
from pdserve.engine.request import FinishReason, Request
from pdserve.engine.worker_base import EngineWorker
from pdserve.kv_transfer.base import KVDestination, KVReceiver, TransferState
from pdserve.kv_transfer.checksum import checksum_blocks
from pdserve.kv_transfer.tp_destination import TPKVDestination

DEFAULT_LEASE_S = 120.0

log = logging.getLogger(__name__)


@dataclass
class _Reserved:
    destination: KVDestination
    created: float
    start: StartDecode | None = None


class DecodeWorker(EngineWorker):
    REPORTS_PREFIX_CACHE = False

    def __init__(self, worker_id: str, parts: EngineParts, receiver: KVReceiver,
                 lease_s: float = DEFAULT_LEASE_S):
        super().__init__(worker_id, parts)
        self.receiver = receiver
        self.lease_s = lease_s
        self._reserved: dict[str, _Reserved] = {}
        # every admitted request the scheduler holds (running, or waiting to be computed)
        self._running: dict[str, Request] = {}
        self._pending_deltas: list[TokenDelta] = []
        self._steps = 0
        # (contexts, perf_counter start, wall-clock start) of the last step
        self._prev_step: tuple[list[int], float, float] | None = None
        # tensor parallel: the other ranks' receivers, and whether they track transfers
        self.rank_endpoints = self._gather_endpoints()
        self._ranks_track = bool(self.rank_endpoints) and not receiver.sender_delivers
        self._rank_forgets: list[str] = []  # forgotten here, not yet on the other ranks

    def _gather_endpoints(self):
        if self.runner.num_ranks == 1:
            return ()
        mine = self.receiver.endpoint
        endpoints = tuple(decode_endpoint(b) for b in
                          self.runner.all_gather_bytes(encode_endpoint(mine))[1:])
        # the whole view must be consistent (each rank holds its share of the heads)
        TPKVDestination(f"{self.worker_id}-check", (mine, *endpoints), (0,), 1,
                        self.loaded.model_config.num_kv_heads)
        return endpoints

    @classmethod
    def from_config(cls, worker_id: str, config: EngineConfig, receiver_factory,
                    loaded: LoadedModel | None = None, lease_s: float = DEFAULT_LEASE_S
                    ) -> DecodeWorker:
        """``receiver_factory(spec) -> (KVReceiver, KVCache)`` allocates the cache the way the
        transfer backend needs it (e.g. inside a shared-memory segment)."""
        loaded = loaded or load_model(config, load_tokenizer=False)
        spec = kv_cache_spec(loaded)
        receiver, cache = receiver_factory(spec)
        # Reservations are written by prefill workers, so the decode side does not share
        # blocks between requests (no prefix caching here).
        parts = EngineParts.build(config, loaded, kv_spec=spec, kv_buffer=cache.data,
                                  prefix_caching=False)
        return cls(worker_id, parts, receiver, lease_s)

    # -- commands (called on the loop thread) -------------------------------------------
    def _check_new(self, rid: str, num_prompt_tokens: int) -> None:
        """Whether a new request of ``num_prompt_tokens`` may enter (ValueError: it never
        may; NoCapacityError: not now)."""
        if rid in self._reserved or rid in self._running:
            raise ValueError(f"request {rid} already holds blocks on {self.worker_id}")
        if num_prompt_tokens >= self.loaded.max_model_len:
            raise ValueError(f"prompt of {num_prompt_tokens} tokens exceeds the context")
        if len(self._reserved) + len(self._running) >= self.scheduler.config.max_num_seqs:
            raise NoCapacityError(f"{self.worker_id} is at max_num_seqs")

    def reserve(self, msg: ReserveRequest) -> Reservation:
        rid = msg.request_id
        self._check_new(rid, msg.num_prompt_tokens)
        try:
            # Token ids are not needed to reserve (no prefix sharing on decode): placeholders.
            alloc = self.blocks.allocate(rid, [0] * msg.num_prompt_tokens)
        except NoFreeBlocksError as exc:
            raise NoCapacityError(f"{self.worker_id} has no free KV blocks") from exc
        dest = KVDestination(transfer_id=rid, endpoint=self.receiver.endpoint,
                             block_ids=tuple(alloc.block_ids), num_tokens=msg.num_prompt_tokens,
                             rank_endpoints=self.rank_endpoints)
        self.receiver.expect(rid, alloc.block_ids)
        if self._ranks_track and not self._register_on_ranks(rid, dest.block_ids):
            self.receiver.forget(rid)
            self.blocks.free(rid)
            self.refresh_state()
            raise RuntimeError(f"{self.worker_id}: another tensor-parallel rank refused the "
                               f"reservation of {rid}")
        now = time.monotonic()
        self._reserved[rid] = _Reserved(dest, now)
        self.refresh_state()
        return Reservation(dest, now)

    def prefill_local(self, msg: LocalPrefillRequest) -> None:
        """Compute the prompt here (conditional disaggregation): the request joins the
        scheduler's queue with nothing computed, exactly as a preempted request waits to
        be recomputed, and the scheduler admits it (blocks, then the prompt's chunks) in
        its next step; its first token streams out like every later one. Refused with
        ``NoCapacityError`` when the worker is at ``max_num_seqs`` or the prompt's blocks
        are not free now. At tensor parallel > 1 the other ranks run its prefill steps as
        they run every step of rank 0 (a recomputation is one already)."""
        rid, n = msg.request_id, len(msg.prompt_token_ids)
        self._check_new(rid, n)
        if not self.blocks.can_allocate(n):
            raise NoCapacityError(f"{self.worker_id} has no free KV blocks")
        req = Request(rid, msg.prompt_token_ids, msg.params)
        self.scheduler.add(req)
        self._running[rid] = req
        self.refresh_state()

    def start(self, msg: StartDecode) -> None:
        r = self._reserved.get(msg.request_id)
        mine = self.receiver.endpoint.incarnation
        if r is None or (msg.incarnation and msg.incarnation != mine):
            why = (f"it was reserved on incarnation {msg.incarnation[:8]} and this worker "
                   f"now runs {mine[:8]} (restarted)"
                   if msg.incarnation and msg.incarnation != mine else
                   "it was released (cancelled, or its lease expired)")
            raise ReservationLost(f"request {msg.request_id} holds no reservation on "
                                  f"{self.worker_id}: {why}")
        self.receiver.mark_delivered(msg.request_id)
        r.start = msg

    def release(self, request_id: str) -> bool:
        """Cancel a request wherever it is; frees its blocks exactly once."""
        if request_id in self._reserved:
            del self._reserved[request_id]
            self._forget(request_id)
            self.blocks.free(request_id)
            self.refresh_state()
            return True
        req = self._running.pop(request_id, None)
        if req is None:
            return False
        self.scheduler.finish(req, FinishReason.ABORT)
        self.refresh_state()
        return True

    def has_work(self) -> bool:
        return bool(self._running) or any(r.start is not None for r in self._reserved.values())

    def housekeeping(self) -> None:
        """Free reservations nobody claimed within the lease (router or prefill died)."""
        now = time.monotonic()
        for rid in [rid for rid, r in self._reserved.items()
                    if r.start is None and now - r.created > self.lease_s]:
            self.release(rid)

    def stats(self) -> DecodeStats:
        s = self.blocks.stats()
        return DecodeStats(self.worker_id, len(self._reserved), len(self.scheduler.running),
                           len(self.scheduler.waiting), self.blocks.usage, s.num_free_blocks,
                           s.num_blocks, s.num_used_blocks, self._steps, self.blocks.block_size,
                           self.receiver.endpoint.incarnation, self.scheduler.config.max_num_seqs)

    # -- the other tensor-parallel ranks' receivers --------------------------------------
    def _forget(self, rid: str) -> None:
        self.receiver.forget(rid)
        if self._ranks_track:
            self._rank_forgets.append(rid)

    def _rank_control(self, register: tuple[Register, ...] = (), poll: tuple[str, ...] = ()
                      ) -> list[int]:
        """Tell the other ranks' receivers (and flush what they should forget); their
        answers, MIN over the ranks."""
        msg = RankControl(tuple(self._rank_forgets), register, poll)
        self._rank_forgets = []
        self.runner.control(encode_control(msg), msg.reply)
        return self.runner.agree([1] * len(register) + [LANDED] * len(poll)) if msg.reply \
            else []

    def _register_on_ranks(self, rid: str, block_ids: tuple[int, ...]) -> bool:
        return self._rank_control(register=(Register(rid, block_ids),)) == [1]

    def _states(self, rids: list[str]) -> dict[str, TransferState]:
        """Each transfer's state on this rank, then (for those DONE here) on every rank."""
        states = {rid: self.receiver.state(rid) for rid in rids}
        landed = [rid for rid, st in states.items() if st is TransferState.DONE]
        if self._ranks_track and landed:
            for rid, code in zip(landed, self._rank_control(poll=tuple(landed)), strict=True):
                if code == FAILED:
                    states[rid] = TransferState.FAILED
                elif code != STATE_CODES[TransferState.DONE]:
                    states[rid] = TransferState.TRANSFERRING
        return states

    # -- one step ---------------------------------------------------------------------
    def _admit_landed(self) -> None:
        started = [rid for rid, r in self._reserved.items() if r.start is not None]
        for rid, state in self._states(started).items() if started else ():
            r = self._reserved[rid]
            problem = ""
            if state is TransferState.DONE:
                problem = self._checksum_problem(r)
                if not problem:
                    del self._reserved[rid]
                    self._forget(rid)
                    self._adopt(r.start)
                    continue
            elif state is TransferState.FAILED:
                problem = "KV transfer failed"
            else:
                continue
            self.release(rid)
            self._pending_deltas.append(TokenDelta(rid, (), (), FinishReason.ABORT.value,
                                                   error=problem))

    def _checksum_problem(self, r: _Reserved) -> str:
        """"" if the reserved blocks hold what the prefill worker says it wrote."""
        want = r.start.kv_digest
        if want is None:
            return ""
        got = checksum_blocks(self.receiver.cache.data, r.destination.block_ids, want.mode)
        if got == want:
            return ""
        backend = self.receiver.endpoint.backend
        log.error("KV checksum mismatch for request %s: prefill worker %s wrote %016x, decode "
                  "worker %s holds %016x (%s, %s mode)", r.start.request_id,
                  r.start.prefill_worker or "?", want.value, self.worker_id, got.value,
                  backend, want.mode)
        if self.metrics is not None:
            self.metrics.observe_transfer(backend, 0, 0.0, False, "checksum")
        return (f"KV transfer failed: checksum mismatch ({r.start.prefill_worker or '?'} -> "
                f"{self.worker_id}, {backend})")

    def _adopt(self, msg: StartDecode) -> None:
        req = Request(msg.request_id, msg.prompt_token_ids, msg.params)
        req.output_token_ids.append(msg.first_token.token_id)
        req.num_computed_tokens = len(msg.prompt_token_ids)
        self.scheduler.add_running(req)
        self._running[req.request_id] = req

    def step(self) -> TokenBatch | None:
        cycle_start = time.perf_counter()
        if self._prev_step is not None:
            # A running request waits a whole loop cycle per token (model step plus the
            # scheduling, streaming and actor work around it), so that is what the step
            # log records for the previous step's shape.
            lens, started, wall = self._prev_step
            self.step_log.add("decode", lens, cycle_start - started, wall)
            self._prev_step = None
        self._admit_landed()
        deltas, self._pending_deltas = self._pending_deltas, []
        sched = self.model_step.schedule()
        step_t0 = time.perf_counter()
        for req in sched.finished:  # outgrew the whole cache
            self._running.pop(req.request_id, None)
            deltas.append(TokenDelta(req.request_id, (), (), FinishReason.LENGTH.value))
        if sched.chunks:
            for req, tok in self.model_step.run(sched):
                req.output_token_ids.append(tok.token_id)
                reason = token_stop_reason(tok.token_id, len(req.output_token_ids), req.num_tokens,
                                           req.params, self.loaded.eos_token_ids,
                                           self.loaded.max_model_len)
                if reason is not None:
                    self._running.pop(req.request_id, None)
                    self.scheduler.finish(req, reason)
                deltas.append(TokenDelta(req.request_id, (tok.token_id,),
                                         (tok,) if req.params.logprobs is not None else (),
                                         reason.value if reason else None))
        duration = time.perf_counter() - step_t0
        if sched.chunks and all(c.num_tokens == 1 for c in sched.chunks) and self._running:
            # pure decode steps only (recomputation after preemption is prefill-shaped), and
            # only while more steps follow at once, so the cycle has no idle time in it
            self._prev_step = ([c.start + 1 for c in sched.chunks], cycle_start,
                               time.time() - (time.perf_counter() - cycle_start))
        if self.metrics is not None:
            self._record(sched, duration)
        if not deltas:
            return None
        self._steps += 1
        return TokenBatch(self.worker_id, self._steps, tuple(deltas))

    def _record(self, sched, duration_s: float) -> None:
        if sched.chunks:
            self.metrics.observe_step(len(sched.chunks), sched.num_tokens, duration_s,
                                      len(sched.preempted))
        self.refresh_state()

    def num_waiting(self) -> int:
        return len(self._reserved) + len(self.scheduler.waiting)
