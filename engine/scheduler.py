"""Continuous-batching scheduler (plain Python: no torch, no Ray).

Each step every scheduled request contributes ``num_tokens - num_computed_tokens``
new tokens, capped by the step's token budget: a decode contributes 1, a prompt (or
the rest of a chunked prompt) up to the budget. Running requests go first, in
admission order, so decodes are never starved by new prompts; then waiting requests
are admitted while the budget, ``max_num_seqs`` and free KV blocks allow. When a
running request needs a block and none is free, the most recently admitted request
is preempted: its blocks are freed and it goes back to the front of the queue to be
recomputed later (its generated tokens are kept and become part of its prefill).

Lifecycle of a step: ``schedule()`` -> model runs the returned chunks ->
``after_step()`` advances ``num_computed_tokens`` and registers newly full blocks in
the prefix cache. Finished or aborted requests leave through ``finish()``, which frees
their blocks exactly once.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from pdserve.engine.block_manager import BlockManager, NoFreeBlocksError
from pdserve.engine.request import FinishReason, Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")


@dataclass(frozen=True)
class ScheduledChunk:
    """``num_tokens`` new tokens of ``request`` starting at position ``start``."""

    request: Request
    start: int
    num_tokens: int

    @property
    def token_ids(self) -> list[int]:
        return self.request.all_token_ids[self.start:self.start + self.num_tokens]

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the request's last known token (so logits are needed)."""
        return self.start + self.num_tokens == self.request.num_tokens


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: tuple[ScheduledChunk, ...]
    preempted: tuple[Request, ...] = ()
    # Finished by the scheduler itself (LENGTH): they outgrew the whole KV cache and could
    # never run again. The caller reports them; their blocks are already free.
    finished: tuple[Request, ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager):
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    # -- admission ----------------------------------------------------------------
    def add(self, request: Request) -> None:
        """Queue a new request (WAITING, no blocks yet)."""
        self.waiting.append(request)

    def add_running(self, request: Request) -> None:
        """Adopt a request whose blocks this scheduler's BlockManager already holds under its
        id and whose KV for ``num_computed_tokens`` tokens is in the cache (disaggregated
        decode: the prefill worker wrote it)."""
        if not self.blocks.has(request.request_id):
            raise ValueError(f"request {request.request_id} holds no blocks")
        request.transition(RequestStatus.RUNNING)
        self.running.append(request)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # -- one step -------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[Request] = []
        finished: list[Request] = []
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if n <= 0:
                i += 1
                continue
            if not self._grow(req, req.num_computed_tokens + n, preempted, finished):
                break  # req itself was preempted (it was the newest) or cannot ever fit
            chunks.append(ScheduledChunk(req, req.num_computed_tokens, n))
            budget -= n
            i += 1
        if not preempted:
            budget = self._admit(chunks, budget, finished)
        return SchedulerOutput(tuple(chunks), tuple(preempted), tuple(finished))

    def _grow(self, req: Request, num_tokens: int, preempted: list[Request],
              finished: list[Request]) -> bool:
        while True:
            try:
                self.blocks.ensure_capacity(req.request_id, num_tokens)
                return True
            except NoFreeBlocksError:
                if self.running == [req]:
                    # Alone and still out of blocks: the whole cache cannot hold it, and
                    # preempting it would only loop. It ends here, as LENGTH.
                    self.finish(req, FinishReason.LENGTH)
                    finished.append(req)
                    return False
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    return False

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.blocks.free(req.request_id)
        req.num_computed_tokens = 0
        req.transition(RequestStatus.WAITING)
        self.waiting.appendleft(req)

    def _admit(self, chunks: list[ScheduledChunk], budget: int, finished: list[Request]) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            tokens = req.all_token_ids
            if self.blocks.blocks_for_tokens(len(tokens)) > self.blocks.num_blocks:
                # A preempted request that grew past the whole cache can never come back.
                self.waiting.popleft()
                req.finish(FinishReason.LENGTH)
                finished.append(req)
                continue
            if not self.blocks.can_allocate(len(tokens)):
                break
            if not self.config.enable_chunked_prefill and len(tokens) > budget:
                break
            try:
                alloc = self.blocks.allocate(req.request_id, tokens)
            except NoFreeBlocksError:
                break
            self.waiting.popleft()
            req.num_computed_tokens = alloc.num_cached_tokens
            req.num_cached_tokens = alloc.num_cached_tokens
            req.transition(RequestStatus.RUNNING)
            self.running.append(req)
            n = min(len(tokens) - req.num_computed_tokens, budget)
            chunks.append(ScheduledChunk(req, req.num_computed_tokens, n))
            budget -= n
        return budget

    def after_step(self, output: SchedulerOutput) -> None:
        """The model ran ``output``: its tokens' KV is now in the cache."""
        for chunk in output.chunks:
            req = chunk.request
            req.num_computed_tokens = chunk.start + chunk.num_tokens
            bs = self.blocks.block_size
            # Only a newly completed block can enter the prefix cache; skip the O(n) call otherwise.
            if req.num_computed_tokens // bs > chunk.start // bs and self.blocks.has(req.request_id):
                self.blocks.mark_computed(req.request_id, req.all_token_ids[:req.num_computed_tokens])

    # -- leaving --------------------------------------------------------------------
    def detach(self, request: Request) -> None:
        """Take a running request out of the batch but keep its blocks: a prefill worker
        holds a computed prompt's KV until it can ship it. ``finish`` frees them later."""
        self.running.remove(request)

    def finish(self, request: Request, reason: FinishReason | None = None) -> None:
        """Remove a request and free its blocks (once). ``reason`` finishes it if not yet."""
        if reason is not None and not request.is_finished:
            request.finish(reason)
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        if self.blocks.has(request.request_id):
            self.blocks.free(request.request_id)

    def find(self, request_id: str) -> Request | None:
        for req in (*self.running, *self.waiting):
            if req.request_id == request_id:
                return req
        return None
