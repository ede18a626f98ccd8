"""Edge validation: turn a wire ``GenerateRequest`` into a trusted ``ValidatedRequest``.

Contract:

* ``validate_request(req, tokenizer, limits)`` either returns a ``ValidatedRequest`` or
  raises ``RequestValidationError`` (a ``ValueError``) whose message is safe to show to
  the client and names the offending field. Any other exception is a bug (the property
  test in ``tests/unit/test_validation.py`` holds it to that), except errors raised by
  the tokenizer itself while encoding, which are server faults, not client ones.
* A ``ValidatedRequest`` satisfies, whatever the input was: the request id matches
  ``[A-Za-z0-9._:-]{1,max_request_id_len}``; the prompt is non-empty and every id is in
  ``[0, vocab_size)``; ``len(prompt) + params.max_tokens <= max_model_len``; every
  sampling value is finite and in range (see ``SamplingParams`` below for defaults);
  stop strings / ids respect the count and length limits; SLO targets are positive and
  finite. Downstream code (scheduler, workers) may rely on this and not re-check.
* Defaults for unset fields (mirrors the comments in ``protos/pdserve.proto``):
  temperature 1.0 (sampling, as in the OpenAI API and vLLM; send 0 for greedy),
  top_p 1.0, top_k 0 (disabled), no seed, no logprobs, min_tokens 0,
  max_tokens ``min(default_max_tokens, max_model_len - prompt_len)``,
  add_special_tokens True, request id ``uuid4().hex``.
* Temperatures in ``(0, 1e-5)`` are snapped to 0 (greedy): dividing logits by such a
  value overflows float32 to inf and the softmax turns into NaN.
* Cheap scalar checks run before tokenization, so a malformed request never pays for
  (or makes the server pay for) tokenizing a large prompt; repeated fields are
  count-checked before their elements are copied or scanned.
* Error messages echo at most ``MAX_ECHO_CHARS`` characters of any client-chosen string:
  the message travels as the ``grpc-message`` trailer, and one longer than the client's
  metadata limit (16 KiB by default) replaces INVALID_ARGUMENT with a transport error.
* ``parse_request(data)`` is the wire-level half: bytes that are not a
  ``GenerateRequest`` (corrupt wire format, string fields that are not valid UTF-8, as
  proto3 requires) raise ``RequestValidationError`` too, so they can be answered with
  INVALID_ARGUMENT instead of the UNKNOWN status gRPC gives a failing deserializer.

Pure Python plus the generated protobuf module: no gRPC server, no Ray, no torch.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Mapping, Sequence
from typing import Protocol

from google.protobuf.message import DecodeError

from pdserve.engine.sampling_params import MAX_LOGPROBS, SamplingParams
from pdserve.protos import pdserve_pb2
from pdserve.router.request_types import (
    REQUEST_ID_RE,
    RequestValidationError,
    SloTargets,
    ValidatedRequest,
    ValidationLimits,
)

try:  # chat templates are Jinja; their ``raise_exception`` raises TemplateError.
    from jinja2 import TemplateError as _JinjaTemplateError

    _TEMPLATE_ERRORS: tuple[type[Exception], ...] = (ValueError, _JinjaTemplateError)
except ImportError:  # pragma: no cover - jinja2 ships with transformers
    _TEMPLATE_ERRORS = (ValueError,)

# Defaults for unset sampling fields; see the module docstring.
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0
DEFAULT_TOP_K = 0
# Upper bound on temperature: beyond this the distribution is uniform noise anyway.
MAX_TEMPERATURE = 100.0
# Below this a temperature is treated as greedy (vLLM uses the same epsilon).
GREEDY_TEMPERATURE_EPS = 1e-5
# torch.Generator.manual_seed takes a signed 64-bit value.
MAX_SEED = 2**63 - 1
CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})
# Longest client-chosen string (or exception text) quoted back in an error message.
MAX_ECHO_CHARS = 200



class PromptTokenizer(Protocol):
    """What validation needs from a tokenizer (``pdserve.engine.tokenizer.Tokenizer`` fits)."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
    ) -> list[int]: ...


def _clip(value: object) -> str:
    """``str(value)`` shortened to about ``MAX_ECHO_CHARS`` characters for an error message."""
    text = str(value)
    if len(text) <= MAX_ECHO_CHARS:
        return text
    return f"{text[:MAX_ECHO_CHARS]}... ({len(text)} characters)"


def _quote(text: str) -> str:
    """``repr(text)`` of a client string, shortened like ``_clip``."""
    if len(text) <= MAX_ECHO_CHARS:
        return repr(text)
    return f"{text[:MAX_ECHO_CHARS]!r}... ({len(text)} characters)"


def parse_request(data: bytes) -> pdserve_pb2.GenerateRequest:
    """Parse a serialized ``GenerateRequest``; raises ``RequestValidationError`` if it is not one.

    For use as the gRPC request deserializer (see ``pdserve.router.service``).
    """
    try:
        return pdserve_pb2.GenerateRequest.FromString(data)
    except DecodeError as exc:
        # upb's message names the message type and the problem ("String field had bad
        # UTF-8", "Wire format was corrupt"): nothing internal, and useful to the client.
        raise RequestValidationError(f"malformed GenerateRequest: {_clip(exc)}") from exc


def validate_request(
    req: pdserve_pb2.GenerateRequest,
    tokenizer: PromptTokenizer | None,
    limits: ValidationLimits,
) -> ValidatedRequest:
    """Validate ``req`` and resolve defaults; raises ``RequestValidationError``.

    ``tokenizer`` may be ``None`` for models served with token-id prompts only; text and
    chat prompts are then rejected.
    """
    request_id = _request_id(req.request_id, limits)
    sampling = _sampling(req.sampling, limits)
    requested_max_tokens = _requested_max_tokens(req.sampling, limits)
    stop, stop_token_ids, ignore_eos = _stop(req.stop, limits)
    slo = _slo(req.slo)

    prompt_ids, prompt_text = _prompt(req, tokenizer, limits)
    max_tokens = _fit_max_tokens(requested_max_tokens, len(prompt_ids), limits)
    min_tokens = int(req.sampling.min_tokens) if req.sampling.HasField("min_tokens") else 0
    if min_tokens > max_tokens:
        raise RequestValidationError(
            f"min_tokens ({min_tokens}) must not exceed max_tokens ({max_tokens})")

    try:
        params = SamplingParams(
            max_tokens=max_tokens,
            min_tokens=min_tokens,
            stop=stop,
            stop_token_ids=stop_token_ids,
            ignore_eos=ignore_eos,
            **sampling,
        )
    except ValueError as exc:  # defence in depth: the checks above should cover it
        raise RequestValidationError(f"invalid sampling parameters: {exc}") from exc
    return ValidatedRequest(
        request_id=request_id,
        prompt_token_ids=prompt_ids,
        params=params,
        slo=slo,
        prompt_text=prompt_text,
    )


def _request_id(request_id: str, limits: ValidationLimits) -> str:
    if request_id == "":
        return uuid.uuid4().hex
    if len(request_id) > limits.max_request_id_len:
        raise RequestValidationError(
            f"request_id is {len(request_id)} characters long; "
            f"the limit is {limits.max_request_id_len}"
        )
    if not REQUEST_ID_RE.fullmatch(request_id):
        # Ids end up in logs and metric labels, hence the conservative charset.
        raise RequestValidationError(
            "request_id may only contain letters, digits and '.', '_', ':', '-'"
        )
    return request_id


def _sampling(sp: pdserve_pb2.SamplingParams, limits: ValidationLimits) -> dict[str, object]:
    """Everything in SamplingParams except max_tokens (which needs the prompt length)."""
    temperature = DEFAULT_TEMPERATURE
    if sp.HasField("temperature"):
        temperature = float(sp.temperature)
        if not math.isfinite(temperature):
            raise RequestValidationError(f"temperature must be finite, got {temperature}")
        if temperature < 0:
            raise RequestValidationError(f"temperature must be >= 0, got {temperature}")
        if temperature > MAX_TEMPERATURE:
            raise RequestValidationError(
                f"temperature must be <= {MAX_TEMPERATURE:g}, got {temperature}"
            )
        if temperature < GREEDY_TEMPERATURE_EPS:
            temperature = 0.0

    top_p = DEFAULT_TOP_P
    if sp.HasField("top_p"):
        top_p = float(sp.top_p)
        # NaN fails this comparison too.
        if not (0.0 < top_p <= 1.0):
            raise RequestValidationError(f"top_p must be in (0, 1], got {top_p}")

    top_k = DEFAULT_TOP_K
    if sp.HasField("top_k"):
        top_k = int(sp.top_k)
        if top_k < 0:
            raise RequestValidationError(f"top_k must be >= 0 (0 disables it), got {top_k}")
        if top_k > limits.vocab_size:
            raise RequestValidationError(
                f"top_k must be <= the vocabulary size {limits.vocab_size}, got {top_k}"
            )

    seed: int | None = None
    if sp.HasField("seed"):
        seed = int(sp.seed)
        if seed > MAX_SEED:
            raise RequestValidationError(f"seed must be <= {MAX_SEED} (2^63 - 1), got {seed}")

    logprobs: int | None = None
    if sp.HasField("logprobs"):
        logprobs = int(sp.logprobs)
        if logprobs > MAX_LOGPROBS:
            raise RequestValidationError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {logprobs}")

    return {
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "seed": seed,
        "logprobs": logprobs,
    }


def _stop(
    sc: pdserve_pb2.StopConditions, limits: ValidationLimits
) -> tuple[tuple[str, ...], tuple[int, ...], bool]:
    # Counts first: a 16 MiB message holds millions of empty strings or ids.
    if len(sc.stop) > limits.max_stop_strings:
        raise RequestValidationError(
            f"stop has {len(sc.stop)} strings; at most {limits.max_stop_strings} are allowed"
        )
    if len(sc.stop_token_ids) > limits.max_stop_token_ids:
        raise RequestValidationError(
            f"stop_token_ids has {len(sc.stop_token_ids)} ids; "
            f"at most {limits.max_stop_token_ids} are allowed"
        )
    stop = tuple(sc.stop)
    for i, s in enumerate(stop):
        if s == "":
            raise RequestValidationError(f"stop string at position {i} is empty")
        if len(s) > limits.max_stop_string_len:
            raise RequestValidationError(
                f"stop string at position {i} is {len(s)} characters long; "
                f"the limit is {limits.max_stop_string_len}"
            )

    stop_token_ids = tuple(int(t) for t in sc.stop_token_ids)
    for i, t in enumerate(stop_token_ids):
        if t >= limits.vocab_size:
            raise RequestValidationError(
                f"stop_token_ids: token id {t} at position {i} is outside the vocabulary "
                f"[0, {limits.vocab_size})"
            )
    return stop, stop_token_ids, bool(sc.ignore_eos)


def _slo(slo: pdserve_pb2.SloTargets) -> SloTargets:
    seconds: dict[str, float | None] = {"ttft_s": None, "tpot_s": None}
    for field, key in (("ttft_ms", "ttft_s"), ("tpot_ms", "tpot_s")):
        if not slo.HasField(field):
            continue
        ms = float(getattr(slo, field))
        s = ms / 1000.0
        # Checked on the converted value: a subnormal ms count rounds to 0 s.
        if not (math.isfinite(ms) and s > 0):
            raise RequestValidationError(
                f"slo.{field} must be a positive, finite number of milliseconds, got {ms}"
            )
        seconds[key] = s
    return SloTargets(**seconds)


def _prompt(
    req: pdserve_pb2.GenerateRequest,
    tokenizer: PromptTokenizer | None,
    limits: ValidationLimits,
) -> tuple[tuple[int, ...], str | None]:
    kind = req.WhichOneof("prompt")
    prompt_text: str | None = None
    if kind is None:
        raise RequestValidationError("prompt is empty: set one of text, token_ids or chat")

    if kind == "token_ids":
        if len(req.token_ids.ids) >= limits.max_model_len:  # before copying millions of ids
            raise _no_room(len(req.token_ids.ids), limits)
        ids = tuple(int(t) for t in req.token_ids.ids)
        if not ids:
            raise RequestValidationError("prompt is empty")
    elif kind == "text":
        text = req.text
        if text == "":
            raise RequestValidationError("prompt is empty")
        if len(text) > limits.max_prompt_chars:
            raise RequestValidationError(
                f"prompt text has {len(text)} characters; the limit is {limits.max_prompt_chars}"
            )
        if tokenizer is None:
            raise RequestValidationError(
                "this model serves token ids only; send the prompt as token_ids"
            )
        add_special = req.add_special_tokens if req.HasField("add_special_tokens") else True
        ids = tuple(int(t) for t in tokenizer.encode(text, add_special_tokens=add_special))
        if not ids:
            raise RequestValidationError("prompt is empty after tokenization")
        prompt_text = text
    else:  # chat
        ids = _chat_prompt(req.chat, tokenizer, limits)

    for i, t in enumerate(ids):
        if not (0 <= t < limits.vocab_size):
            raise RequestValidationError(
                f"token id {t} at position {i} is outside the vocabulary [0, {limits.vocab_size})"
            )
    if len(ids) >= limits.max_model_len:
        raise _no_room(len(ids), limits)
    return ids, prompt_text


def _no_room(prompt_len: int, limits: ValidationLimits) -> RequestValidationError:
    return RequestValidationError(
        f"prompt has {prompt_len} tokens; the model's context is {limits.max_model_len} "
        "tokens, which leaves no room to generate"
    )


def _chat_prompt(
    chat: pdserve_pb2.ChatPrompt,
    tokenizer: PromptTokenizer | None,
    limits: ValidationLimits,
) -> tuple[int, ...]:
    messages = chat.messages
    if len(messages) == 0:
        raise RequestValidationError("prompt is empty: chat has no messages")
    if len(messages) > limits.max_chat_messages:
        raise RequestValidationError(
            f"chat has {len(messages)} messages; the limit is {limits.max_chat_messages}"
        )
    total_chars = 0
    for i, m in enumerate(messages):
        if m.role not in CHAT_ROLES:
            raise RequestValidationError(
                f"chat message {i} has role {_quote(m.role)}; expected one of "
                f"{', '.join(sorted(CHAT_ROLES))}"
            )
        total_chars += len(m.content)
    if total_chars > limits.max_prompt_chars:
        raise RequestValidationError(
            f"chat messages have {total_chars} characters in total; "
            f"the limit is {limits.max_prompt_chars}"
        )
    if tokenizer is None:
        raise RequestValidationError(
            "this model serves token ids only; send the prompt as token_ids"
        )
    try:
        rendered = tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages]
        )
    except _TEMPLATE_ERRORS as exc:
        # No template, or the template itself rejected the conversation (e.g. roles
        # that do not alternate); both are the client's to fix.
        raise RequestValidationError(f"chat prompt rejected: {_clip(exc)}") from exc
    ids = tuple(int(t) for t in rendered)
    if not ids:
        raise RequestValidationError("prompt is empty after applying the chat template")
    return ids


def _requested_max_tokens(sp: pdserve_pb2.SamplingParams, limits: ValidationLimits) -> int | None:
    """The client's max_tokens after the range check, or ``None`` when unset."""
    if not sp.HasField("max_tokens"):
        return None
    max_tokens = int(sp.max_tokens)
    if not (1 <= max_tokens <= limits.max_tokens_limit):
        raise RequestValidationError(
            f"max_tokens must be in [1, {limits.max_tokens_limit}], got {max_tokens}"
        )
    return max_tokens


def _fit_max_tokens(requested: int | None, prompt_len: int, limits: ValidationLimits) -> int:
    """Resolve the default and check that prompt + output fits in the context."""
    room = limits.max_model_len - prompt_len  # >= 1: _prompt checked the prompt length
    if requested is None:
        return min(limits.default_max_tokens, room)
    if requested > room:
        raise RequestValidationError(
            f"prompt has {prompt_len} tokens and max_tokens is {requested}, which exceeds "
            f"the model's context of {limits.max_model_len} tokens; "
            f"lower max_tokens to at most {room}"
        )
    return requested
