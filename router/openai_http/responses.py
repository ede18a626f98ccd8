"""OpenAI response bodies built from the frontend's ``OutputChunk``s.

Shapes follow OpenAI and vLLM (what the ``openai`` SDK and benchmark tools such as AIPerf
parse): completions are ``text_completion`` objects with ``choices[].text``; chat uses
``chat.completion`` / ``chat.completion.chunk`` with a first chunk carrying the assistant
role, then ``delta.content`` chunks, the last with ``finish_reason``. The usage chunk
(``stream_options.include_usage``) has ``choices: []``. Two extensions: ``token_ids`` on a
choice when the request set ``return_token_ids`` (vLLM's name), and a ``timing`` object
next to ``usage`` with the router's TTFT, end-to-end, prefill queue, prefill and KV
transfer wait in milliseconds, and the hops to the first token (the figures gRPC's
``Usage`` carries, its ``ServerTiming`` included).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.engine.messages import SampledToken
from pdserve.router.generation import OutputChunk, Usage

TIMING_FIELDS = ("ttft_ms", "e2e_ms", "prefill_queue_ms", "prefill_ms", "kv_transfer_wait_ms")


def usage_json(usage: Usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def timing_json(usage: Usage) -> dict:
    out = {k: round(getattr(usage, k), 3) for k in TIMING_FIELDS}
    if usage.timing is not None:  # as gRPC's ServerTiming (router/hops.py)
        out["received_monotonic_s"] = usage.timing.received
        for key, hops in (("hops", usage.timing.hops), ("concurrent", usage.timing.concurrent)):
            out[key] = [{"name": name, "ms": round(s * 1e3, 3)} for name, s in hops]
    return out


class TokenText:
    """Token strings for logprobs (``decode`` of the single id, as vLLM returns them)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


@dataclass
class CompletionLogprobs:
    """The legacy completions ``logprobs`` object, accumulated over chunks."""

    tokens: list[str] = dataclasses.field(default_factory=list)
    token_logprobs: list[float | None] = dataclasses.field(default_factory=list)
    top_logprobs: list[dict[str, float]] = dataclasses.field(default_factory=list)
    text_offset: list[int] = dataclasses.field(default_factory=list)

    def add(self, lps: Sequence[SampledToken], text_of: TokenText, offset: int) -> None:
        for lp in lps:
            token = text_of(lp.token_id)
            self.tokens.append(token)
            self.token_logprobs.append(lp.logprob)
            self.top_logprobs.append({text_of(t): v for t, v in lp.top_logprobs})
            self.text_offset.append(offset)
            offset += len(token)

    def json(self) -> dict:
        return dataclasses.asdict(self)


def chat_logprobs(lps: Sequence[SampledToken], text_of: TokenText) -> list[dict]:
    """Chat ``logprobs.content`` entries."""
    out = []
    for lp in lps:
        token = text_of(lp.token_id)
        out.append({"token": token, "logprob": lp.logprob,
                    "bytes": list(token.encode("utf-8")),
                    "top_logprobs": [{"token": (s := text_of(t)), "logprob": v,
                                      "bytes": list(s.encode("utf-8"))}
                                     for t, v in lp.top_logprobs]})
    return out


@dataclass
class ResponseWriter:
    """Builds the JSON of one request's response, streamed or whole.

    ``kind`` is "completions" or "chat"; ``logprobs`` whether the request asked for them.
    """

    kind: str
    request_id: str
    model: str
    text_of: TokenText
    logprobs: bool
    return_token_ids: bool
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    @property
    def id(self) -> str:
        return ("chatcmpl-" if self.kind == "chat" else "cmpl-") + self.request_id

    def _envelope(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    # -- streaming ---------------------------------------------------------------------
    def role_chunk(self) -> dict | None:
        """Chat's first chunk (the assistant role); None for completions."""
        if self.kind != "chat":
            return None
        return {**self._envelope("chat.completion.chunk"), "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
             "finish_reason": None}]}

    def chunk(self, c: OutputChunk, text_offset: int) -> dict | None:
        """The SSE chunk for ``c``, or None when it adds nothing the client would see (text
        held back for a stop string or an incomplete character, and no ids or logprobs
        asked for)."""
        if not (c.text or c.finish_reason or (self.return_token_ids and c.token_ids)
                or (self.logprobs and c.logprobs)):
            return None
        if self.kind == "chat":
            choice = {"index": 0, "delta": {"content": c.text} if c.text else {},
                      "logprobs": ({"content": chat_logprobs(c.logprobs, self.text_of)}
                                   if self.logprobs else None),
                      "finish_reason": c.finish_reason}
            obj = "chat.completion.chunk"
        else:
            lp = None
            if self.logprobs:
                acc = CompletionLogprobs()
                acc.add(c.logprobs, self.text_of, text_offset)
                lp = acc.json()
            choice = {"index": 0, "text": c.text, "logprobs": lp,
                      "finish_reason": c.finish_reason}
            obj = "text_completion"
        if self.return_token_ids:
            choice["token_ids"] = list(c.token_ids)
        return {**self._envelope(obj), "choices": [choice]}

    def usage_chunk(self, usage: Usage) -> dict:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._envelope(obj), "choices": [], "usage": usage_json(usage),
                "timing": timing_json(usage)}

    # -- whole --------------------------------------------------------------------------
    def whole(self, chunks: Sequence[OutputChunk]) -> dict:
        text = "".join(c.text for c in chunks)
        last = chunks[-1]
        lps = [lp for c in chunks for lp in c.logprobs]
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": ({"content": chat_logprobs(lps, self.text_of)}
                                   if self.logprobs else None),
                      "finish_reason": last.finish_reason}
            obj = "chat.completion"
        else:
            lp = None
            if self.logprobs:
                acc = CompletionLogprobs()
                acc.add(lps, self.text_of, 0)
                lp = acc.json()
            choice = {"index": 0, "text": text, "logprobs": lp,
                      "finish_reason": last.finish_reason}
            obj = "text_completion"
        if self.return_token_ids:
            choice["token_ids"] = [t for c in chunks for t in c.token_ids]
        body = {**self._envelope(obj), "choices": [choice]}
        if last.usage is not None:
            body["usage"] = usage_json(last.usage)
            body["timing"] = timing_json(last.usage)
        return body
