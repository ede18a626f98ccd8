"""The single-process engine: continuous batching over one model and one KV cache.

Lifecycle: ``add_request`` validates and queues a request; each ``step`` schedules
(running requests first, then new ones under the token budget), runs the model once
for the whole batch, samples, and returns one ``RequestOutput`` delta per request that
produced a token; requests join and leave the batch between steps. ``abort_request``
frees a request's blocks at once. This is the correctness reference for the
disaggregated cluster and the colocated baseline for benchmarks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.engine.config import EngineConfig
from pdserve.engine.loader import LoadedModel
from pdserve.engine.messages import SampledToken
from pdserve.engine.model_step import EngineParts
from pdserve.engine.output_processor import OutputProcessor, RequestOutput
from pdserve.engine.request import FinishReason, Request
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import SchedulerOutput


@dataclass(frozen=True)
class Completion:
    """A finished request, as ``generate`` returns it."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason | None
    logprobs: tuple[SampledToken, ...] = ()


def validate_prompt(prompt_token_ids: Sequence[int], vocab_size: int, max_model_len: int,
                    max_blocks: int, block_size: int) -> None:
    """Raise ValueError with a user-facing message if the prompt cannot be served."""
    n = len(prompt_token_ids)
    if n == 0:
        raise ValueError("prompt is empty")
    if n >= max_model_len:
        raise ValueError(f"prompt has {n} tokens; the model's context is {max_model_len}")
    bad = [t for t in prompt_token_ids if not (0 <= t < vocab_size)]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    if -(-(n + 1) // block_size) > max_blocks:
        raise ValueError(f"prompt of {n} tokens does not fit the KV cache ({max_blocks} blocks)")


class LLMEngine:
    def __init__(self, parts: EngineParts, outputs: OutputProcessor):
        self.parts = parts
        self.loaded = parts.loaded
        self.runner = parts.runner
        self.scheduler = parts.scheduler
        self.blocks = parts.blocks
        self.outputs = outputs
        self.model_step = parts.model_step()
        self._requests: dict[str, Request] = {}
        self._counter = 0
        self.last_step: SchedulerOutput | None = None  # what the last step() ran (for metrics)

    @classmethod
    def from_config(cls, config: EngineConfig, loaded: LoadedModel | None = None) -> LLMEngine:
        parts = EngineParts.build(config, loaded)
        loaded = parts.loaded
        outputs = OutputProcessor(loaded.tokenizer, loaded.eos_token_ids, loaded.max_model_len)
        return cls(parts, outputs)

    @property
    def tokenizer(self):
        return self.loaded.tokenizer

    # -- requests -----------------------------------------------------------------
    def add_request(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> Request:
        params = params or SamplingParams()
        if request_id is None:
            self._counter += 1
            request_id = f"req-{self._counter}"
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; pass token ids")
            token_ids = self.tokenizer.encode(prompt)
        else:
            token_ids = list(prompt)
        validate_prompt(token_ids, self.loaded.model_config.vocab_size, self.loaded.max_model_len,
                        self.blocks.num_blocks, self.blocks.block_size)
        req = Request(request_id, tuple(token_ids), params)
        self.outputs.register(req)
        self.scheduler.add(req)
        self._requests[request_id] = req
        return req

    def abort_request(self, request_id: str) -> RequestOutput | None:
        req = self._requests.pop(request_id, None)
        if req is None:
            return None
        out = self.outputs.abort(req)
        self.scheduler.finish(req)
        return out

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # -- stepping -------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        sched = self.model_step.schedule()
        self.last_step = sched if sched.chunks else None
        results = [self._capacity_finished(r) for r in sched.finished]
        if not sched.chunks:
            return results
        for req, tok in self.model_step.run(sched):
            out = self.outputs.process(req, tok)
            if out.finished:
                self.scheduler.finish(req)
                self._requests.pop(req.request_id, None)
            results.append(out)
        return results

    def _capacity_finished(self, req: Request) -> RequestOutput:
        self._requests.pop(req.request_id, None)
        text = self.outputs.finish_text(req)
        return RequestOutput(req.request_id, (), text, True, req.finish_reason, (),
                             req.num_prompt_tokens, len(req.output_token_ids),
                             req.num_cached_tokens)

    def generate(self, prompts: Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Completion]:
        """Run ``prompts`` to completion together; results in prompt order."""
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        reqs = [self.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
        texts = {r.request_id: [] for r in reqs}
        while any(not r.is_finished for r in reqs):
            for out in self.step():
                if out.request_id in texts:
                    texts[out.request_id].append(out.new_text)
        return [Completion(r.request_id, r.prompt_token_ids, tuple(r.output_token_ids),
                           "".join(texts[r.request_id]), r.finish_reason,
                           tuple(r.output_logprobs)) for r in reqs]
