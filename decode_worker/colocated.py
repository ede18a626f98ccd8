"""A colocated worker: one engine does both phases, vLLM-style (the baseline).

It exposes the decode worker's streaming interface (``step`` returns one
``TokenBatch`` per step, ``release`` cancels), plus ``submit`` for whole requests: the
first token also arrives through the stream. Prefill and decode of different requests
share each step's batch (the engine's continuous batching with chunked prefill), which
is exactly the interference disaggregation removes; running both architectures on the
same hardware through the same router and benchmark is what makes them comparable.
"""

from __future__ import annotations

import time

from pdserve.decode_worker.messages import ColocatedRequest, DecodeStats, TokenBatch, TokenDelta
from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.loader import load_model
from pdserve.engine.worker_base import EngineWorker


class ColocatedWorker(EngineWorker):
    """Steps through its ``LLMEngine`` (which owns the request outputs), so the base's
    ``model_step`` is the engine's."""

    def __init__(self, worker_id: str, engine: LLMEngine):
        super().__init__(worker_id, engine.parts)
        self.model_step = engine.model_step
        self.engine = engine
        self._steps = 0

    @classmethod
    def from_config(cls, worker_id: str, config: EngineConfig) -> ColocatedWorker:
        # Text and stop strings are the router's job; the engine works on token ids.
        loaded = load_model(config, load_tokenizer=False)
        return cls(worker_id, LLMEngine.from_config(config, loaded))

    def submit(self, msg: ColocatedRequest) -> None:
        """Queue a whole request; its first token comes through the stream, like the rest."""
        self.engine.add_request(list(msg.prompt_token_ids), msg.params, msg.request_id)
        self.refresh_state()

    def release(self, request_id: str) -> bool:
        released = self.engine.abort_request(request_id) is not None
        self.refresh_state()
        return released

    def has_work(self) -> bool:
        return self.engine.has_unfinished_requests()

    def stats(self) -> DecodeStats:
        blocks = self.engine.blocks
        s = blocks.stats()
        sched = self.engine.scheduler
        return DecodeStats(self.worker_id, 0, len(sched.running), len(sched.waiting), blocks.usage,
                           s.num_free_blocks, s.num_blocks, s.num_used_blocks, self._steps,
                           blocks.block_size)

    def step(self) -> TokenBatch | None:
        t0 = time.perf_counter()
        outs = self.engine.step()
        last = self.engine.last_step
        if self.metrics is not None and last is not None:
            self.metrics.observe_step(len(last.chunks), last.num_tokens,
                                      time.perf_counter() - t0, len(last.preempted))
        self.refresh_state()
        if not outs:
            return None
        self._steps += 1
        return TokenBatch(self.worker_id, self._steps, tuple(
            TokenDelta(o.request_id, o.new_token_ids, o.logprobs,
                       o.finish_reason.value if o.finish_reason else None) for o in outs))
