"""The model step every caller shares: schedule, run the batch once, sample.

Lifecycle of one step, whoever drives it (the single-process engine, a prefill worker, a
decode worker): ``sched = step.schedule()``; the caller looks at what was scheduled (a
prefill worker starts the KV transfers of prompts that complete now); ``step.run(sched,
layer_done)`` builds the flat batch, runs the model once (``layer_done(i)`` after layer
``i``: a prefill worker ships layer ``i``'s KV while layer ``i + 1`` computes), advances
the scheduler and samples one token for every sequence that produces one, each with its
own seeded generator; the caller then applies its stop rules and hands the tokens on.

``EngineParts`` builds what a step needs (model, runner, scheduler, sampler) from an
``EngineConfig``, the same way for all three callers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pdserve.engine.block_manager import BlockManager
from pdserve.engine.config import EngineConfig
from pdserve.engine.kv_cache import KVCacheSpec
from pdserve.engine.loader import LoadedModel, build_runner, load_model
from pdserve.engine.messages import SampledToken
from pdserve.engine.model_runner import ModelInput, ModelRunner
from pdserve.engine.parallel.executor import DrivingRunner
from pdserve.engine.request import Request
from pdserve.engine.sampler import Sampler, next_token_generator
from pdserve.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput


class ModelStep:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, sampler: Sampler):
        self.runner = runner
        self.scheduler = scheduler
        self.sampler = sampler

    def schedule(self) -> SchedulerOutput:
        return self.scheduler.schedule()

    def run(self, sched: SchedulerOutput, layer_done: Callable[[int], None] | None = None,
            extra: bytes = b"", reply: int = 0) -> list[tuple[Request, SampledToken]]:
        """Run the scheduled chunks (there must be some); the sampled token of every
        request that completes its chunk this step, in schedule order."""
        blocks = self.scheduler.blocks
        inputs = [ModelInput(c.token_ids, c.start, blocks.block_table(c.request.request_id),
                             c.samples) for c in sched.chunks]
        logits = self.runner.run(inputs, layer_done=layer_done, extra=extra, reply=reply)
        self.scheduler.after_step(sched)
        reqs = [c.request for c in sched.chunks if c.samples]
        # The generator of a request's n-th output token depends only on (seed, n), so a
        # seeded request draws alike in one engine, split across workers, or recomputed.
        tokens = self.sampler(logits, [r.params for r in reqs],
                              [next_token_generator(r.params, len(r.output_token_ids))
                               for r in reqs],
                              [len(r.output_token_ids) for r in reqs])
        return list(zip(reqs, tokens, strict=True))


@dataclass
class EngineParts:
    """A loaded model with its runner (and KV cache), scheduler and sampler."""

    loaded: LoadedModel
    runner: ModelRunner
    scheduler: Scheduler
    sampler: Sampler

    @classmethod
    def build(cls, config: EngineConfig, loaded: LoadedModel | None = None, *,
              load_tokenizer: bool = True, kv_spec: KVCacheSpec | None = None,
              kv_buffer: torch.Tensor | None = None,
              prefix_caching: bool | None = None) -> EngineParts:
        """``kv_spec``/``kv_buffer``: a cache allocated elsewhere (a decode worker's lives
        where its transfer backend needs it). ``prefix_caching`` overrides the config's
        (a decode worker's blocks are written by prefill workers: nothing to share)."""
        loaded = loaded or load_model(config, load_tokenizer=load_tokenizer)
        runner = build_runner(loaded, kv_spec, kv_buffer=kv_buffer)
        if loaded.group is not None:  # rank 0 of a TP instance; the others run_follower
            runner = DrivingRunner.wrap(runner, loaded.group)
        spec = runner.kv_cache.spec
        caching = config.enable_prefix_caching if prefix_caching is None else prefix_caching
        # usable_blocks: CUDA graphs keep one block as scratch for their padded rows.
        blocks = BlockManager(runner.usable_blocks, spec.block_size, caching)
        scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                                              config.enable_chunked_prefill), blocks)
        return cls(loaded, runner, scheduler, Sampler(loaded.eos_token_ids))

    @property
    def blocks(self) -> BlockManager:
        return self.scheduler.blocks

    def model_step(self) -> ModelStep:
        return ModelStep(self.runner, self.scheduler, self.sampler)
