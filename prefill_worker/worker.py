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
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pdserve.engine.block_manager import BlockManager
from pdserve.engine.config import EngineConfig
from pdserve.engine.loader import LoadedModel, build_runner, load_model
from pdserve.engine.metrics import WorkerMetrics
from pdserve.engine.model_runner import ModelInput, ModelRunner
from pdserve.engine.output_processor import token_stop_reason
from pdserve.engine.request import FinishReason, Request
from pdserve.engine.sampler import Sampler, next_token_generator
from pdserve.engine.scheduler import Scheduler, SchedulerConfig
from pdserve.engine.step_log import StepLog
from pdserve.kv_transfer.base import KVSender, Transfer, TransferError
from pdserve.kv_transfer.checksum import KVDigest
from pdserve.kv_transfer.incarnation import new_incarnation
from pdserve.prefill_worker.messages import PrefillRequest, PrefillResult, PrefillStats


@dataclass
class _Pending:
    msg: PrefillRequest
    request: Request
    arrived: float
    scheduled: float | None = None
    transfer: Transfer | None = None
    error: str | None = None
    error_reason: str = "error"  # TransferError.reason of ``error`` (metrics label)
    digest: KVDigest | None = None


@dataclass
class _Counters:
    completed: int = 0
    failed: int = 0
    step_times: list[float] = field(default_factory=list)


class PrefillWorker:
    def __init__(self, worker_id: str, loaded: LoadedModel, runner: ModelRunner,
                 scheduler: Scheduler, sender: KVSender | None, sampler: Sampler,
                 transfer_timeout_s: float = 30.0):
        self.worker_id = worker_id
        self.loaded = loaded
        self.runner = runner
        self.scheduler = scheduler
        self.blocks: BlockManager = scheduler.blocks
        self.sender = sender
        self.sampler = sampler
        self.transfer_timeout_s = transfer_timeout_s
        self.kv_checksum = "off"  # KVTransferConfig.checksum, set by the host builder
        # This life of the worker: the router sees a restart as a change of incarnation.
        self.incarnation = new_incarnation()
        self._pending: dict[str, _Pending] = {}
        self._counters = _Counters()
        self.on_step_timing: Callable[[int, float], None] | None = None
        self.metrics: WorkerMetrics | None = None  # attached by the host builder
        self.step_log = StepLog()

    @classmethod
    def from_config(cls, worker_id: str, config: EngineConfig, sender: KVSender | None,
                    loaded: LoadedModel | None = None) -> PrefillWorker:
        loaded = loaded or load_model(config, load_tokenizer=False)
        runner = build_runner(loaded)
        spec = runner.kv_cache.spec
        blocks = BlockManager(spec.num_blocks, spec.block_size, config.enable_prefix_caching)
        sched = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                                          config.enable_chunked_prefill), blocks)
        return cls(worker_id, loaded, runner, sched, sender, Sampler())

    # -- commands (called on the loop thread) -------------------------------------------
    def add(self, msg: PrefillRequest) -> None:
        if msg.request_id in self._pending:
            raise ValueError(f"request {msg.request_id} is already queued on {self.worker_id}")
        req = Request(msg.request_id, msg.prompt_token_ids, msg.params)
        self._pending[msg.request_id] = _Pending(msg, req, time.monotonic())
        self.scheduler.add(req)
        self._refresh_state()

    def abort(self, request_id: str) -> bool:
        p = self._pending.pop(request_id, None)
        if p is None:
            return False
        if p.transfer is not None and self.sender is not None:
            self.sender.abort(p.transfer)
        self.scheduler.finish(p.request, FinishReason.ABORT)
        self._refresh_state()
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
        sched = self.scheduler.schedule()
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
        inputs = [ModelInput(c.token_ids, c.start, self.blocks.block_table(c.request.request_id),
                             c.samples) for c in sched.chunks]
        hook = self._layer_hook(sending, src_tables) if sending else None
        t0 = time.perf_counter()
        logits = self.runner.run(inputs, layer_done=hook)
        self.scheduler.after_step(sched)
        reqs = [p.request for p in completing]
        tokens = self.sampler(logits, [r.params for r in reqs],
                              [next_token_generator(r.params, 0) for r in reqs])
        sampled_at = time.monotonic()
        if self.on_step_timing is not None:
            self.on_step_timing(sched.num_tokens, time.perf_counter() - t0)
        results = []
        for p, tok in zip(completing, tokens, strict=True):
            wait_s = self._finish_transfer(p)
            reason = token_stop_reason(tok.token_id, 1, p.request.num_tokens + 1, p.msg.params,
                                       self.loaded.eos_token_ids, self.loaded.max_model_len)
            self._pending.pop(p.msg.request_id, None)
            self.scheduler.finish(p.request, FinishReason.STOP)
            ok = p.error is None
            self._counters.completed += ok
            self._counters.failed += not ok
            results.append(PrefillResult(
                request_id=p.msg.request_id, token=tok if ok else None,
                finish_reason=reason.value if reason else None,
                num_cached_tokens=p.request.num_cached_tokens,
                queue_s=(p.scheduled or sampled_at) - p.arrived,
                prefill_s=sampled_at - (p.scheduled or sampled_at),
                transfer_wait_s=wait_s, error=p.error, kv_digest=p.digest if ok else None))
        duration = time.perf_counter() - step_t0
        self.step_log.add("prefill", [c.num_tokens for c in sched.chunks], duration, step_wall)
        if self.metrics is not None:
            self._record(sched, completing, duration)
        return results

    def _record(self, sched, completing: list[_Pending], duration_s: float) -> None:
        m = self.metrics
        m.observe_step(len(sched.chunks), sched.num_tokens, duration_s, len(sched.preempted))
        self._refresh_state()
        for p in completing:
            t = p.transfer
            if t is not None:
                end = t.finished_at or time.perf_counter()
                m.observe_transfer(self.sender.name, t.bytes_sent, end - t.started_at,
                                   p.error is None, p.error_reason)
            elif p.error is not None and p.msg.destination is not None:
                m.observe_transfer(p.msg.destination.endpoint.backend, 0, 0.0, False,
                                   p.error_reason)

    def _refresh_state(self) -> None:
        """Gauges follow every change (add, abort, step), so an aborted queue shows empty."""
        if self.metrics is None:
            return
        s = self.blocks.stats()
        self.metrics.set_state(len(self.scheduler.running), len(self.scheduler.waiting),
                               self.blocks.usage, s.num_blocks, self.blocks.block_size,
                               s.prefix_queries_tokens, s.prefix_hit_tokens)

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

    def _finish_transfer(self, p: _Pending) -> float:
        if p.transfer is None or p.error is not None:
            return 0.0
        t0 = time.monotonic()
        try:
            self.sender.finish(p.transfer, timeout=self.transfer_timeout_s)
            p.digest = p.transfer.digest()
        except TransferError as exc:
            p.error, p.error_reason = f"KV transfer failed: {exc}", exc.reason
        return time.monotonic() - t0
