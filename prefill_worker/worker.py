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
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from pdserve.engine.config import EngineConfig
from pdserve.engine.loader import LoadedModel
from pdserve.engine.model_step import EngineParts
from pdserve.engine.output_processor import token_stop_reason
from pdserve.engine.request import FinishReason, Request
from pdserve.engine.worker_base import EngineWorker
from pdserve.kv_transfer.base import KVSender, Transfer, TransferError
from pdserve.kv_transfer.incarnation import new_incarnation
from pdserve.kv_transfer.messages import KVDigest
from pdserve.prefill_worker.messages import (
    PrefillRequest,
    PrefillResult,
    PrefillStats,
    PrefillTimes,
)


@dataclass
class _Pending:
    msg: PrefillRequest
    request: Request
    received: float  # the host's event loop got the call
    queued: float
    scheduled: float | None = None
    transfer: Transfer | None = None
    error: str | None = None
    error_reason: str = "error"  # TransferError.reason of ``error`` (metrics label)
    digest: KVDigest | None = None


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
        req = Request(msg.request_id, msg.prompt_token_ids, msg.params)
        now = time.monotonic()
        received = now if received is None else received
        self._pending[msg.request_id] = _Pending(msg, req, received, now)
        self.scheduler.add(req)
        self.refresh_state()

    def abort(self, request_id: str) -> bool:
        p = self._pending.pop(request_id, None)
        if p is None:
            return False
        if p.transfer is not None and self.sender is not None:
            self.sender.abort(p.transfer)
        self.scheduler.finish(p.request, FinishReason.ABORT)
        self.refresh_state()
        return True

    def has_work(self) -> bool:
        return self.scheduler.num_unfinished > 0

    def stats(self) -> PrefillStats:
        s = self.blocks.stats()
        waiting_tokens = sum(r.num_tokens - r.num_computed_tokens
                             for r in (*self.scheduler.waiting, *self.scheduler.running))
        return PrefillStats(self.worker_id, len(self.scheduler.waiting), len(self.scheduler.running),
                            waiting_tokens, self.blocks.usage, s.num_free_blocks, s.num_blocks,
                            s.prefix_hit_tokens, s.prefix_queries_tokens,
                            self._counters.completed, self._counters.failed, self.incarnation)

    # -- one step ---------------------------------------------------------------------
    def step(self) -> list[PrefillResult]:
        sched = self.model_step.schedule()
        if not sched.chunks:
            return []
        step_t0, step_wall = time.perf_counter(), time.time()
        now = time.monotonic()
        for c in sched.chunks:
            p = self._pending[c.request.request_id]
            if p.scheduled is None:
                p.scheduled = now
        completing = [self._pending[c.request.request_id] for c in sched.chunks if c.samples]
        sending = [p for p in completing if self._begin_transfer(p)]
        # on the cache's device: the layer hook index_selects the (GPU) cache with it
        src_tables = {p.msg.request_id: torch.tensor(self.blocks.block_table(p.msg.request_id),
                                                     dtype=torch.long, device=self.runner.device)
                      for p in sending}
        hook = self._layer_hook(sending, src_tables) if sending else None
        sampled = self.model_step.run(sched, layer_done=hook)
        sampled_at = time.monotonic()
        results = []
        for p, (_, tok) in zip(completing, sampled, strict=True):
            kv_done = self._finish_transfer(p) or sampled_at
            reason = token_stop_reason(tok.token_id, 1, p.request.num_tokens + 1, p.msg.params,
                                       self.loaded.eos_token_ids, self.loaded.max_model_len)
            self._pending.pop(p.msg.request_id, None)
            self.scheduler.finish(p.request, FinishReason.STOP)
            ok = p.error is None
            self._counters.completed += ok
            self._counters.failed += not ok
            times = PrefillTimes(p.received, p.queued, p.scheduled or sampled_at, sampled_at,
                                 kv_done)
            results.append(PrefillResult(
                request_id=p.msg.request_id, token=tok if ok else None,
                finish_reason=reason.value if reason else None, times=times,
                num_cached_tokens=p.request.num_cached_tokens, error=p.error,
                kv_digest=p.digest if ok else None))
        duration = time.perf_counter() - step_t0
        self.step_log.add("prefill", [c.num_tokens for c in sched.chunks], duration, step_wall)
        if self.metrics is not None:
            self._record(sched, completing, duration)
        return results

    def _record(self, sched, completing: list[_Pending], duration_s: float) -> None:
        m = self.metrics
        m.observe_step(len(sched.chunks), sched.num_tokens, duration_s, len(sched.preempted))
        self.refresh_state()
        for p in completing:
            t = p.transfer
            if t is not None:
                end = t.finished_at or time.perf_counter()
                m.observe_transfer(self.sender.name, t.bytes_sent, end - t.started_at,
                                   p.error is None, p.error_reason)
            elif p.error is not None and p.msg.destination is not None:
                m.observe_transfer(p.msg.destination.endpoint.backend, 0, 0.0, False,
                                   p.error_reason)

    def _begin_transfer(self, p: _Pending) -> bool:
        dest = p.msg.destination
        if dest is None:
            return False
        if self.sender is None:
            p.error = "this prefill worker has no KV sender configured"
            return False
        try:
            p.transfer = self.sender.begin(dest, self.runner.kv_cache.spec, self.kv_checksum)
        except TransferError as exc:
            p.error, p.error_reason = f"KV transfer failed to start: {exc}", exc.reason
            return False
        return True

    def _layer_hook(self, sending: list[_Pending], tables: dict[str, torch.Tensor]):
        data = self.runner.kv_cache.data

        def layer_done(layer: int) -> None:
            for p in sending:
                if p.error is not None:
                    continue
                # index_select copies, so the sender may ship it asynchronously.
                kv = data[layer].index_select(1, tables[p.msg.request_id])
                try:
                    self.sender.send_layer(p.transfer, layer, kv)
                except TransferError as exc:
                    p.error, p.error_reason = f"KV transfer failed: {exc}", exc.reason
                    self.sender.abort(p.transfer)

        return layer_done

    def _finish_transfer(self, p: _Pending) -> float | None:
        """Wait for ``p``'s transfer; when it finished (None: there was none to wait for)."""
        if p.transfer is None or p.error is not None:
            return None
        try:
            self.sender.finish(p.transfer, timeout=self.transfer_timeout_s)
            p.digest = p.transfer.digest()
        except TransferError as exc:
            p.error, p.error_reason = f"KV transfer failed: {exc}", exc.reason
        return time.monotonic()
