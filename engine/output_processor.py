"""Turning sampled tokens into client-visible deltas, and deciding when a request stops.

Two halves, usable apart:

* ``token_stop_reason`` is the token-level check (stop token ids, EOS unless
  ``ignore_eos``, ``max_tokens``, the model's context length). Workers run it on
  every token so a request stops where it would in the single-process engine.
* ``TextStream`` detokenizes incrementally and applies stop strings. With stop
  strings, the last ``max_stop_len - 1`` characters are held back until they can no
  longer begin one, so streamed text never has to be taken back; the stop string
  itself is not returned. In the cluster the router runs it (it owns the tokenizer
  and the client stream), as vLLM's front end does.

``OutputProcessor`` combines both for the single-process engine.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pdserve.engine.messages import SampledToken
from pdserve.engine.request import FinishReason, Request
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.tokenizer import Tokenizer


@dataclass(frozen=True)
class RequestOutput:
    """What one request gained in one step (a delta), plus its running totals."""

    request_id: str
    new_token_ids: tuple[int, ...]
    new_text: str
    finished: bool
    finish_reason: FinishReason | None
    logprobs: tuple[SampledToken, ...]
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int = 0


def token_stop_reason(token: int, num_output_tokens: int, total_tokens: int,
                      params: SamplingParams, eos_token_ids: frozenset[int],
                      max_model_len: int) -> FinishReason | None:
    """Stop decision for the token just appended (counts include it)."""
    # Below min_tokens the sampler never draws a stop id; the rule is checked here too so
    # it holds for whatever fed this token.
    if not params.below_min_tokens(num_output_tokens) and (
            token in params.stop_token_ids or (not params.ignore_eos and token in eos_token_ids)):
        return FinishReason.STOP
    if num_output_tokens >= params.max_tokens or total_tokens >= max_model_len:
        return FinishReason.LENGTH
    return None


class TextStream:
    """Incremental text of one request's generated tokens, with stop strings applied."""

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int],
                 stop: Sequence[str] = (), min_tokens: int = 0):
        self._tokenizer = tokenizer
        # Stop strings match only in text decoded once min_tokens tokens are out (vLLM).
        self._min_tokens = min_tokens
        self._tokens = 0
        self._detok = tokenizer.detokenizer(prompt_token_ids)
        self._stop = tuple(stop)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._emitted = 0
        self.stopped = False

    def add(self, token_ids: Sequence[int]) -> str:
        """Feed new tokens; returns the text now safe to emit. Sets ``stopped`` on a stop string."""
        if self.stopped:
            return ""
        before = len(self._detok.text)
        self._detok.add(token_ids)
        self._tokens += len(token_ids)
        text = self._detok.text
        if self._stop and self._tokens >= self._min_tokens:
            # A stop string may straddle earlier text; search from where it could start.
            search_from = max(0, before - self._hold)
            hits = [i for i in (text.find(s, search_from) for s in self._stop) if i >= 0]
            if hits:
                self.stopped = True
                out = text[self._emitted:max(min(hits), self._emitted)]
                self._emitted = len(text)
                return out
        safe = max(self._emitted, len(text) - self._hold)
        out = text[self._emitted:safe]
        self._emitted = safe
        return out

    def flush(self) -> str:
        """At the end of the request: whatever was held back, for stop-string matching or
        because it did not decode yet (a trailing incomplete character), so the total
        equals ``tokenizer.decode`` of every generated token."""
        if self.stopped:
            return ""
        final = self._tokenizer.decode(self._detok.token_ids)
        if not final.startswith(self._detok.text[:self._emitted]):
            final = self._detok.text  # defensive: never emit text that contradicts the stream
        out = final[self._emitted:]
        self._emitted = len(final)
        return out


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None, eos_token_ids: Iterable[int], max_model_len: int):
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len
        self._text: dict[str, TextStream] = {}

    def register(self, request: Request) -> None:
        if self.tokenizer is None:
            return
        stream = TextStream(self.tokenizer, request.prompt_token_ids, request.params.stop,
                            request.params.min_tokens)
        self._text[request.request_id] = stream

    def release(self, request_id: str) -> None:
        self._text.pop(request_id, None)

    def process(self, request: Request, sampled: SampledToken) -> RequestOutput:
        """Append ``sampled`` to ``request``; finish it if a stop condition holds."""
        token = sampled.token_id
        request.output_token_ids.append(token)
        if request.params.logprobs is not None:
            request.output_logprobs.append(sampled)
        reason = token_stop_reason(token, len(request.output_token_ids), request.num_tokens,
                                   request.params, self.eos_token_ids, self.max_model_len)
        stream = self._text.get(request.request_id)
        new_text = ""
        if stream is not None:
            new_text = stream.add([token])
            if stream.stopped:
                reason = FinishReason.STOP
        if reason is not None:
            request.finish(reason)
            if stream is not None:
                new_text += stream.flush()
            self.release(request.request_id)
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=(token,),
            new_text=new_text,
            finished=reason is not None,
            finish_reason=reason,
            logprobs=(sampled,) if request.params.logprobs is not None else (),
            num_prompt_tokens=request.num_prompt_tokens,
            num_output_tokens=len(request.output_token_ids),
            num_cached_tokens=request.num_cached_tokens,
        )

    def finish_text(self, request: Request) -> str:
        """Held-back text of a request that was finished elsewhere (e.g. by the scheduler)."""
        stream = self._text.pop(request.request_id, None)
        return stream.flush() if stream is not None else ""

    def abort(self, request: Request) -> RequestOutput:
        """Finish ``request`` as aborted (the caller frees its blocks)."""
        if not request.is_finished:
            request.finish(FinishReason.ABORT)
        self.release(request.request_id)
        return RequestOutput(request.request_id, (), "", True, FinishReason.ABORT, (),
                             request.num_prompt_tokens, len(request.output_token_ids),
                             request.num_cached_tokens)
