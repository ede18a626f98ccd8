"""OpenAI request bodies, and their mapping onto the ``GenerateRequest`` every front door shares.

Bodies are parsed by pydantic in strict mode: a field of the wrong JSON type is a 400
naming the field (``"5"`` is not a number, ``true`` is not an integer), unknown fields
are ignored as OpenAI does. Fields OpenAI defines but pdserve does not implement are
accepted at their neutral value and refused otherwise (``n`` > 1, ``echo``, penalties,
``logit_bias``, tools...), so a client never gets silently different sampling.
``to_generate_request`` then builds the protobuf request that ``Frontend.validate``
checks for both protocols: ranges, prompt length and the context limit are checked
there once, with the same messages.

Server extensions read from the body, as vLLM and SGLang accept them: ``top_k`` (-1 or
0 = off), ``min_tokens``, ``ignore_eos``, ``stop_token_ids``, ``add_special_tokens``,
``return_token_ids`` (each choice also carries its token ids) and ``request_id``; and
pdserve's own ``slo: {"ttft_ms", "tpot_ms"}`` (per-request targets, as gRPC's ``slo``).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from pdserve.protos import pdserve_pb2


class BadRequest(ValueError):
    """A 400 with OpenAI's ``param`` naming the offending field (``None`` if no one field)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = True  # OpenAI: the object's presence asks for usage
    continuous_usage_stats: bool = False


class SloBody(BaseModel):
    """pdserve extension: the request's latency targets (gRPC's ``SloTargets``)."""

    model_config = ConfigDict(strict=True, extra="ignore")
    ttft_ms: float | None = None
    tpot_ms: float | None = None


class _Common(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    user: str | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    # Extensions (vLLM / SGLang names).
    top_k: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    return_token_ids: bool = False
    request_id: str | None = None
    slo: SloBody | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        """(field, why) for every field set to something pdserve does not implement."""
        out = []
        if self.n != 1:
            out.append(("n", f"n={self.n} is not supported; send n=1 (one choice per request)"))
        if self.frequency_penalty or self.presence_penalty:
            field = "frequency_penalty" if self.frequency_penalty else "presence_penalty"
            out.append((field, "frequency and presence penalties are not supported"))
        if self.logit_bias:
            out.append(("logit_bias", "logit_bias is not supported"))
        return out


class CompletionRequest(_Common):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    add_special_tokens: bool = True

    def unsupported(self) -> list[tuple[str, str]]:
        out = super().unsupported()
        if self.echo:
            out.append(("echo", "echo is not supported"))
        if self.suffix:
            out.append(("suffix", "suffix is not supported"))
        if self.best_of not in (None, 1):
            out.append(("best_of", "best_of > 1 is not supported"))
        return out


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: str
    content: str | list[TextPart] | None = None

    def text(self, index: int) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise BadRequest(f"messages[{index}]: content part of type {part.type[:40]!r} "
                                 "is not supported (text only)", "messages")
            texts.append(part.text)
        return "".join(texts)


class ChatCompletionRequest(_Common):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        out = super().unsupported()
        if self.tools:
            out.append(("tools", "tool calling is not supported"))
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            out.append(("response_format", "structured output is not supported"))
        return out


def to_generate_request(body: CompletionRequest | ChatCompletionRequest,
                        request_id: str) -> pdserve_pb2.GenerateRequest:
    """The shared request for ``body``; raises ``BadRequest`` for what only this layer can
    see (unsupported fields, malformed prompt shapes, logprob flags)."""
    for field, why in body.unsupported():
        raise BadRequest(why, field)
    if body.stream_options is not None and not body.stream:
        raise BadRequest("stream_options is only allowed when stream is true", "stream_options")
    if body.seed is not None and body.seed < 0:
        raise BadRequest(f"seed must be >= 0, got {body.seed}", "seed")
    # Range checks the protobuf fields would otherwise fail with a bare ValueError; the
    # meaningful limits (max_tokens <= 4096...) are validation's.
    for name in ("max_tokens", "min_tokens", "top_logprobs", "max_completion_tokens",
                 "logprobs", "top_k"):
        value = getattr(body, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1 << 31:
            raise BadRequest(f"{name} is too large: {value}", name)
        if name != "top_k" and isinstance(value, int) and value < 0:
            raise BadRequest(f"{name} must be >= 0, got {value}", name)
    if body.seed is not None and body.seed >= 1 << 64:
        raise BadRequest(f"seed is too large: {body.seed}", "seed")
    if body.stop_token_ids and any(not 0 <= t < 1 << 32 for t in body.stop_token_ids):
        raise BadRequest("stop_token_ids must be in [0, 2^32)", "stop_token_ids")

    req = pdserve_pb2.GenerateRequest(request_id=request_id)
    sp = req.sampling
    if body.temperature is not None:
        sp.temperature = body.temperature
    if body.top_p is not None:
        sp.top_p = body.top_p
    if body.top_k is not None and body.top_k != -1:  # -1: vLLM/SGLang's "off"
        if body.top_k < 0:
            raise BadRequest(f"top_k must be -1, 0 (off) or positive, got {body.top_k}", "top_k")
        sp.top_k = body.top_k
    if body.seed is not None:
        sp.seed = body.seed
    if body.min_tokens:
        sp.min_tokens = body.min_tokens
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or ())
    req.stop.stop.extend(stop)
    if body.stop_token_ids:
        req.stop.stop_token_ids.extend(body.stop_token_ids)
    req.stop.ignore_eos = body.ignore_eos
    if body.slo is not None:  # ranges are validation's
        if body.slo.ttft_ms is not None:
            req.slo.ttft_ms = body.slo.ttft_ms
        if body.slo.tpot_ms is not None:
            req.slo.tpot_ms = body.slo.tpot_ms

    if isinstance(body, CompletionRequest):
        _completion_prompt(body, req)
        max_tokens = body.max_tokens
        if body.logprobs is not None:
            sp.logprobs = body.logprobs
    else:
        for i, m in enumerate(body.messages):
            req.chat.messages.add(role=m.role, content=m.text(i))
        max_tokens = (body.max_completion_tokens if body.max_completion_tokens is not None
                      else body.max_tokens)
        if body.top_logprobs is not None and not body.logprobs:
            raise BadRequest("top_logprobs needs logprobs set to true", "top_logprobs")
        if body.logprobs:
            sp.logprobs = body.top_logprobs or 0
    if max_tokens is not None:
        sp.max_tokens = max_tokens  # 0 and too large are answered by validation
    return req


def _completion_prompt(body: CompletionRequest, req: pdserve_pb2.GenerateRequest) -> None:
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise BadRequest(f"prompt holds {len(prompt)} prompts; send one per request",
                             "prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        req.text = prompt
        req.add_special_tokens = body.add_special_tokens
    else:
        if not prompt:
            raise BadRequest("prompt is empty", "prompt")
        if any(not 0 <= t < 1 << 32 for t in prompt):
            raise BadRequest("prompt token ids must be in [0, 2^32)", "prompt")
        req.token_ids.ids.extend(prompt)

