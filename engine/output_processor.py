"""Turning sampled tokens into client-visible deltas, and deciding when a request stops.

For each sampled token the processor appends it to the request, detokenizes
incrementally, checks stop conditions (stop token ids, EOS unless ``ignore_eos``,
stop strings, ``max_tokens``, the model's context length) and returns a
``RequestOutput`` holding only what is new. With stop strings, the last
``max_stop_len - 1`` characters are held back until they can no longer begin a stop
string, so text streamed to a client never has to be taken back; the stop string
itself is not returned.

The same processor runs in the single-process engine, in the prefill worker (first
token) and in the decode worker (the rest), so the disaggregated cluster stops
exactly where the engine does.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pdserve.engine.request import FinishReason, Request
from pdserve.engine.sampler import SampledToken
from pdserve.engine.tokenizer import IncrementalDetokenizer, Tokenizer


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


@dataclass
class _TextState:
    detok: IncrementalDetokenizer
    emitted: int = 0  # characters of detok.text already returned


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None, eos_token_ids: Iterable[int], max_model_len: int):
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len
        self._text: dict[str, _TextState] = {}

    def register(self, request: Request) -> None:
        """Start text state for a request; tokens already in ``output_token_ids`` count as seen."""
        if self.tokenizer is None:
            return
        detok = self.tokenizer.detokenizer(request.prompt_token_ids)
        if request.output_token_ids:
            detok.add(request.output_token_ids)
        self._text[request.request_id] = _TextState(detok, emitted=len(detok.text))

    def release(self, request_id: str) -> None:
        self._text.pop(request_id, None)

    def process(self, request: Request, sampled: SampledToken) -> RequestOutput:
        """Append ``sampled`` to ``request``; finish it if a stop condition holds."""
        token = sampled.token_id
        request.output_token_ids.append(token)
        if request.params.logprobs is not None:
            request.output_logprobs.append(sampled)
        params = request.params
        reason: FinishReason | None = None
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
            reason = FinishReason.STOP
        new_text, stop_hit = self._advance_text(request, token)
        if stop_hit:
            reason = FinishReason.STOP
        if reason is None and (len(request.output_token_ids) >= params.max_tokens
                               or request.num_tokens >= self.max_model_len):
            reason = FinishReason.LENGTH
        if reason is not None:
            request.finish(reason)
            new_text += self._flush(request)
            self.release(request.request_id)
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=(token,),
            new_text=new_text,
            finished=reason is not None,
            finish_reason=reason,
            logprobs=(sampled,) if params.logprobs is not None else (),
            num_prompt_tokens=request.num_prompt_tokens,
            num_output_tokens=len(request.output_token_ids),
            num_cached_tokens=request.num_cached_tokens,
        )

    def abort(self, request: Request) -> RequestOutput:
        """Finish ``request`` as aborted (the caller frees its blocks)."""
        if not request.is_finished:
            request.finish(FinishReason.ABORT)
        self.release(request.request_id)
        return RequestOutput(request.request_id, (), "", True, FinishReason.ABORT, (),
                             request.num_prompt_tokens, len(request.output_token_ids),
                             request.num_cached_tokens)

    def _advance_text(self, request: Request, token: int) -> tuple[str, bool]:
        state = self._text.get(request.request_id)
        if state is None:
            return "", False
        before = len(state.detok.text)
        state.detok.add([token])
        text = state.detok.text
        stops = request.params.stop
        if stops:
            longest = max(len(s) for s in stops)
            # A stop string may straddle the previous delta; search from where it could start.
            search_from = max(0, before - longest + 1)
            hits = [i for i in (text.find(s, search_from) for s in stops) if i >= 0]
            if hits:
                cut = max(min(hits), state.emitted)
                out = text[state.emitted:cut]
                state.emitted = len(text)  # nothing more is ever returned
                return out, True
            safe = max(state.emitted, len(text) - (longest - 1))
        else:
            safe = len(text)
        out = text[state.emitted:safe]
        state.emitted = safe
        return out, False

    def _flush(self, request: Request) -> str:
        state = self._text.get(request.request_id)
        if state is None:
            return ""
        out = state.detok.text[state.emitted:]
        state.emitted = len(state.detok.text)
        return out
