"""Edge validation of GenerateRequest (router/validation.py) and the status mapping
(router/status.py). No model: a byte-level fake tokenizer stands in."""

from __future__ import annotations

import asyncio
import math
import re

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdserve.engine.sampling_params import MAX_LOGPROBS, SamplingParams
from pdserve.protos import pdserve_pb2 as pb
from pdserve.router import status
from pdserve.router.request_types import (
    RequestValidationError,
    SloTargets,
    ValidatedRequest,
    ValidationLimits,
)
from pdserve.router.validation import MAX_ECHO_CHARS, MAX_SEED, parse_request, validate_request

BOS = 1
OFFSET = 3  # byte b -> token b + 3, so ids 0..2 are "special"
VOCAB = 260


class FakeTokenizer:
    """encode = UTF-8 bytes + 3 (plus BOS when add_special_tokens); optional chat template."""

    def __init__(self, chat_template: bool = True, strict_alternation: bool = False) -> None:
        self.vocab_size = VOCAB
        self.has_chat_template = chat_template
        self.strict_alternation = strict_alternation
        self.encode_calls = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.encode_calls += 1
        ids = [b + OFFSET for b in text.encode("utf-8")]
        return [BOS, *ids] if add_special_tokens else ids

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> list[int]:
        if not self.has_chat_template:
            raise ValueError("this tokenizer has no chat template; send a plain prompt instead")
        if self.strict_alternation:
            from jinja2 import TemplateError

            roles = [m["role"] for m in messages if m["role"] != "system"]
            if any(a == b for a, b in zip(roles, roles[1:], strict=False)):
                raise TemplateError("Conversation roles must alternate user/assistant")
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        if add_generation_prompt:
            text += "<assistant>"
        return [BOS, *self.encode(text, add_special_tokens=False)]


LIMITS = ValidationLimits(
    vocab_size=VOCAB, max_model_len=64, max_tokens_limit=32, default_max_tokens=16
)


def ids_request(ids=(5, 6, 7), **kwargs) -> pb.GenerateRequest:
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=list(ids)), **kwargs)


def validate(req, tokenizer=None, limits=LIMITS) -> ValidatedRequest:
    return validate_request(req, FakeTokenizer() if tokenizer is None else tokenizer, limits)


def rejects(req, match: str, tokenizer=None, limits=LIMITS) -> RequestValidationError:
    with pytest.raises(RequestValidationError, match=match) as info:
        validate(req, tokenizer, limits)
    return info.value


# ---------------------------------------------------------------- defaults / happy paths


def test_defaults():
    v = validate(ids_request())
    assert v.prompt_token_ids == (5, 6, 7)
    assert v.prompt_text is None
    assert re.fullmatch(r"[0-9a-f]{32}", v.request_id)
    assert v.params == SamplingParams(max_tokens=16, temperature=1.0, top_k=0, top_p=1.0)
    assert v.params.seed is None and v.params.logprobs is None
    assert v.slo == SloTargets()


def test_generated_request_ids_are_unique():
    assert validate(ids_request()).request_id != validate(ids_request()).request_id


def test_all_fields_mapped():
    req = ids_request(
        request_id="client-1.a_b:c",
        sampling=pb.SamplingParams(
            temperature=0.5,
            top_p=0.25,
            top_k=40,
            seed=MAX_SEED,
            max_tokens=10,
            logprobs=MAX_LOGPROBS,
        ),
        stop=pb.StopConditions(stop=["\n", "END"], stop_token_ids=[2, 259], ignore_eos=True),
        slo=pb.SloTargets(ttft_ms=250.0, tpot_ms=20.0),
    )
    v = validate(req)
    assert v.request_id == "client-1.a_b:c"
    assert v.params == SamplingParams(
        max_tokens=10,
        temperature=0.5,
        top_k=40,
        top_p=0.25,
        seed=MAX_SEED,
        stop=("\n", "END"),
        stop_token_ids=(2, 259),
        ignore_eos=True,
        logprobs=MAX_LOGPROBS,
    )
    assert v.slo == SloTargets(ttft_s=0.25, tpot_s=0.02)


def test_explicit_zeros_are_not_defaults():
    v = validate(ids_request(sampling=pb.SamplingParams(temperature=0.0, logprobs=0, top_k=0)))
    assert v.params.temperature == 0.0 and v.params.greedy
    assert v.params.logprobs == 0


def test_text_prompt_uses_tokenizer():
    v = validate(pb.GenerateRequest(text="hé"))
    assert v.prompt_token_ids == (BOS, ord("h") + OFFSET, 0xC3 + OFFSET, 0xA9 + OFFSET)
    assert v.prompt_text == "hé"
    # NUL characters are legal text.
    assert validate(pb.GenerateRequest(text="a\x00b")).prompt_text == "a\x00b"


def test_add_special_tokens_false():
    v = validate(pb.GenerateRequest(text="hi", add_special_tokens=False))
    assert v.prompt_token_ids == (ord("h") + OFFSET, ord("i") + OFFSET)


def test_chat_prompt():
    req = pb.GenerateRequest(
        chat=pb.ChatPrompt(
            messages=[
                pb.ChatMessage(role="system", content="be brief"),
                pb.ChatMessage(role="user", content="hi"),
            ]
        )
    )
    tok = FakeTokenizer()
    v = validate(req, tok)
    assert v.prompt_token_ids == tuple(
        tok.apply_chat_template(
            [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
        )
    )
    assert v.prompt_text is None


def test_max_tokens_default_clamped_to_context():
    v = validate(ids_request(ids=[5] * 60))  # room = 64 - 60 = 4 < default 16
    assert v.params.max_tokens == 4


def test_max_tokens_exactly_fills_context():
    v = validate(ids_request(ids=[5] * 54, sampling=pb.SamplingParams(max_tokens=10)))
    assert len(v.prompt_token_ids) + v.params.max_tokens == LIMITS.max_model_len


def test_tiny_temperature_is_greedy():
    v = validate(ids_request(sampling=pb.SamplingParams(temperature=1e-30)))
    assert v.params.temperature == 0.0


# ---------------------------------------------------------------- one test per rule


def test_missing_prompt():
    rejects(pb.GenerateRequest(), "prompt is empty")


@pytest.mark.parametrize(
    "req",
    [
        pb.GenerateRequest(text=""),
        pb.GenerateRequest(token_ids=pb.TokenIds()),
        pb.GenerateRequest(chat=pb.ChatPrompt()),
    ],
    ids=["text", "token_ids", "chat"],
)
def test_empty_prompt(req):
    assert req.WhichOneof("prompt") is not None
    rejects(req, "prompt is empty")


def test_text_empty_after_tokenization():
    rejects(
        pb.GenerateRequest(text="x", add_special_tokens=False),
        "empty after tokenization",
        tokenizer=_NullTokenizer(),
    )


class _NullTokenizer(FakeTokenizer):
    def encode(self, text, add_special_tokens=True):
        return []


def test_prompt_text_too_long():
    limits = ValidationLimits(vocab_size=VOCAB, max_model_len=64, max_prompt_chars=10)
    tok = FakeTokenizer()
    rejects(pb.GenerateRequest(text="x" * 11), "prompt text has 11 characters", tok, limits)
    assert tok.encode_calls == 0  # rejected before paying for tokenization
    validate(pb.GenerateRequest(text="x" * 10, add_special_tokens=False), tok, limits)


def test_chat_too_long():
    limits = ValidationLimits(vocab_size=VOCAB, max_model_len=64, max_prompt_chars=10)
    msgs = [pb.ChatMessage(role="user", content="x" * 6)] * 2
    rejects(pb.GenerateRequest(chat=pb.ChatPrompt(messages=msgs)), "12 characters", None, limits)


@pytest.mark.parametrize(
    "req",
    [
        pb.GenerateRequest(text="hi"),
        pb.GenerateRequest(chat=pb.ChatPrompt(messages=[pb.ChatMessage(role="user", content="x")])),
    ],
    ids=["text", "chat"],
)
def test_text_and_chat_need_tokenizer(req):
    with pytest.raises(RequestValidationError, match="this model serves token ids only"):
        validate_request(req, None, LIMITS)


def test_token_ids_work_without_tokenizer():
    assert validate_request(ids_request(), None, LIMITS).prompt_token_ids == (5, 6, 7)


def test_chat_without_template():
    req = pb.GenerateRequest(chat=pb.ChatPrompt(messages=[pb.ChatMessage(role="user")]))
    rejects(req, "no chat template", FakeTokenizer(chat_template=False))


def test_chat_template_error_is_validation_error():
    pytest.importorskip("jinja2")
    msgs = [pb.ChatMessage(role="user", content="a"), pb.ChatMessage(role="user", content="b")]
    rejects(
        pb.GenerateRequest(chat=pb.ChatPrompt(messages=msgs)),
        "roles must alternate",
        FakeTokenizer(strict_alternation=True),
    )


@pytest.mark.parametrize("role", ["", "User", "robot", "developer"])
def test_chat_bad_role(role):
    msgs = [pb.ChatMessage(role="user", content="a"), pb.ChatMessage(role=role, content="b")]
    rejects(pb.GenerateRequest(chat=pb.ChatPrompt(messages=msgs)), "chat message 1 has role")


def test_long_role_is_quoted_shortened():
    # The message travels as a gRPC trailer; the client drops trailers over 16 KiB.
    msgs = [pb.ChatMessage(role="r" * 100_000, content="b")]
    err = rejects(pb.GenerateRequest(chat=pb.ChatPrompt(messages=msgs)), "chat message 0 has role")
    assert len(str(err)) < 2 * MAX_ECHO_CHARS + 200
    assert "(100000 characters)" in str(err)


def test_long_template_error_is_shortened():
    class Verbose(FakeTokenizer):
        def apply_chat_template(self, messages, add_generation_prompt=True):
            raise ValueError("bad conversation: " + messages[0]["content"])

    msgs = [pb.ChatMessage(role="user", content="x" * 50_000)]
    err = rejects(pb.GenerateRequest(chat=pb.ChatPrompt(messages=msgs)), "chat prompt rejected",
                  Verbose())
    assert len(str(err)) < 2 * MAX_ECHO_CHARS + 200


def test_chat_too_many_messages():
    limits = ValidationLimits(vocab_size=VOCAB, max_model_len=4096, max_chat_messages=3)
    msgs = [pb.ChatMessage(role="user", content="a")] * 4
    rejects(pb.GenerateRequest(chat=pb.ChatPrompt(messages=msgs)), "4 messages", None, limits)


def test_token_id_outside_vocab():
    err = rejects(ids_request(ids=[5, VOCAB - 1, VOCAB]), "outside the vocabulary")
    assert str(err) == f"token id {VOCAB} at position 2 is outside the vocabulary [0, {VOCAB})"


def test_tokenizer_ids_outside_model_vocab():
    # A tokenizer with more tokens than the model's embedding is caught too.
    limits = ValidationLimits(vocab_size=50, max_model_len=64)
    rejects(pb.GenerateRequest(text="z"), "outside the vocabulary", None, limits)


def test_prompt_fills_context():
    err = rejects(ids_request(ids=[5] * 64), "prompt has 64 tokens; the model's context is 64")
    assert "no room" in str(err)
    validate(ids_request(ids=[5] * 63))  # one token of room is enough


@pytest.mark.parametrize("max_tokens", [0, 33, 2**32 - 1])
def test_max_tokens_range(max_tokens):
    rejects(
        ids_request(sampling=pb.SamplingParams(max_tokens=max_tokens)),
        re.escape("max_tokens must be in [1, 32]"),
    )


def test_max_tokens_exceeds_context():
    rejects(
        ids_request(ids=[5] * 60, sampling=pb.SamplingParams(max_tokens=5)),
        "prompt has 60 tokens and max_tokens is 5.*at most 4",
    )


def test_max_tokens_range_checked_before_tokenization():
    tok = FakeTokenizer()
    rejects(
        pb.GenerateRequest(text="hi", sampling=pb.SamplingParams(max_tokens=0)), "max_tokens", tok
    )
    assert tok.encode_calls == 0


@pytest.mark.parametrize(
    "value,match",
    [
        (-0.5, "temperature must be >= 0"),
        (math.nan, "temperature must be finite"),
        (math.inf, "temperature must be finite"),
        (-math.inf, "temperature must be finite"),
        (100.5, "temperature must be <= 100"),
    ],
)
def test_temperature(value, match):
    rejects(ids_request(sampling=pb.SamplingParams(temperature=value)), match)


def test_temperature_upper_bound_inclusive():
    assert (
        validate(ids_request(sampling=pb.SamplingParams(temperature=100.0))).params.temperature
        == 100.0
    )


@pytest.mark.parametrize("value", [0.0, -0.1, 1.5, math.nan, math.inf])
def test_top_p(value):
    rejects(
        ids_request(sampling=pb.SamplingParams(top_p=value)), re.escape("top_p must be in (0, 1]")
    )


@pytest.mark.parametrize(
    "value,match", [(-1, "top_k must be >= 0"), (VOCAB + 1, "top_k must be <=")]
)
def test_top_k(value, match):
    rejects(ids_request(sampling=pb.SamplingParams(top_k=value)), match)


def test_top_k_vocab_ok():
    assert validate(ids_request(sampling=pb.SamplingParams(top_k=VOCAB))).params.top_k == VOCAB


def test_seed_must_fit_int64():
    rejects(ids_request(sampling=pb.SamplingParams(seed=2**63)), "seed must be <=")
    rejects(ids_request(sampling=pb.SamplingParams(seed=2**64 - 1)), "seed must be <=")
    assert validate(ids_request(sampling=pb.SamplingParams(seed=0))).params.seed == 0


def test_logprobs_range():
    rejects(
        ids_request(sampling=pb.SamplingParams(logprobs=MAX_LOGPROBS + 1)),
        re.escape(f"logprobs must be in [0, {MAX_LOGPROBS}]"),
    )


def test_stop_strings():
    limits = ValidationLimits(
        vocab_size=VOCAB, max_model_len=64, max_stop_strings=2, max_stop_string_len=3
    )
    rejects(
        ids_request(stop=pb.StopConditions(stop=["a", "b", "c"])),
        "stop has 3 strings",
        None,
        limits,
    )
    rejects(
        ids_request(stop=pb.StopConditions(stop=["a", ""])), "position 1 is empty", None, limits
    )
    rejects(ids_request(stop=pb.StopConditions(stop=["abcd"])), "4 characters long", None, limits)
    assert validate(
        ids_request(stop=pb.StopConditions(stop=["abc"])), None, limits
    ).params.stop == ("abc",)


def test_huge_repeated_fields_are_rejected_on_their_count():
    # Counts are checked before the elements are looked at (a 16 MiB message holds
    # millions of them); so the out-of-vocabulary ids here are never reported.
    n = 1_000_000
    rejects(ids_request(ids=[VOCAB] * n), f"prompt has {n} tokens")
    rejects(ids_request(stop=pb.StopConditions(stop_token_ids=[VOCAB] * n)), f"has {n} ids")
    rejects(ids_request(stop=pb.StopConditions(stop=[""] * n)), f"stop has {n} strings")


def test_stop_token_ids():
    limits = ValidationLimits(vocab_size=VOCAB, max_model_len=64, max_stop_token_ids=2)
    rejects(ids_request(stop=pb.StopConditions(stop_token_ids=[1, 2, 3])), "3 ids", None, limits)
    err = rejects(
        ids_request(stop=pb.StopConditions(stop_token_ids=[1, VOCAB])),
        "stop_token_ids",
        None,
        limits,
    )
    assert f"token id {VOCAB} at position 1 is outside the vocabulary" in str(err)


@pytest.mark.parametrize("field", ["ttft_ms", "tpot_ms"])
@pytest.mark.parametrize("value", [0.0, -1.0, math.nan, math.inf, 5e-324])
def test_slo_targets(field, value):
    rejects(ids_request(slo=pb.SloTargets(**{field: value})), f"slo.{field} must be a positive")


@pytest.mark.parametrize(
    "request_id,match",
    [
        ("a" * 129, "129 characters long; the limit is 128"),
        ("has space", "request_id may only contain"),
        ("naïve", "request_id may only contain"),
        ("a/b", "request_id may only contain"),
        ("line\n", "request_id may only contain"),
    ],
)
def test_request_id(request_id, match):
    rejects(ids_request(request_id=request_id), match)


def test_request_id_max_length_ok():
    assert validate(ids_request(request_id="a" * 128)).request_id == "a" * 128


# ---------------------------------------------------------------- wire format


def test_parse_request_round_trip():
    req = ids_request(request_id="r1", sampling=pb.SamplingParams(max_tokens=3))
    assert parse_request(req.SerializeToString()) == req
    assert parse_request(b"") == pb.GenerateRequest()  # parses; validation rejects it


@pytest.mark.parametrize("data, match", [
    (b"\x12\x02\xc3\x28", "UTF-8"),  # text (field 2) that is not UTF-8
    (b"\x32\x03\x0a\x01\xff", "UTF-8"),  # a stop string that is not UTF-8
    (b"\x12\x7fabc", "malformed"),  # length past the end
    (b"\xff\xff\xff", "malformed"),
])
def test_parse_request_rejects_malformed_bytes(data, match):
    with pytest.raises(RequestValidationError, match=match) as info:
        parse_request(data)
    assert str(info.value).startswith("malformed GenerateRequest: ")


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=64))
def test_property_parse_request(data):
    try:
        assert isinstance(parse_request(data), pb.GenerateRequest)
    except RequestValidationError as exc:
        assert str(exc)


# ---------------------------------------------------------------- dataclasses


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(vocab_size=0, max_model_len=10),
        dict(vocab_size=10, max_model_len=1),
        dict(vocab_size=10, max_model_len=10, max_tokens_limit=0),
        dict(vocab_size=10, max_model_len=10, max_tokens_limit=8, default_max_tokens=9),
        dict(vocab_size=True, max_model_len=10),
        dict(vocab_size=10, max_model_len=10, max_stop_strings=-1),
        dict(vocab_size=10.0, max_model_len=10),
    ],
)
def test_limits_validated(kwargs):
    with pytest.raises(ValueError):
        ValidationLimits(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(ttft_s=0.0),
        dict(tpot_s=-1.0),
        dict(ttft_s=math.nan),
        dict(tpot_s=math.inf),
        dict(ttft_s="1"),
    ],
)
def test_slo_dataclass_validated(kwargs):
    with pytest.raises(ValueError):
        SloTargets(**kwargs)


def test_validated_request_checks_invariants():
    ok = dict(
        request_id="r",
        prompt_token_ids=(1,),
        params=SamplingParams(),
        slo=SloTargets(),
        prompt_text=None,
    )
    ValidatedRequest(**ok)
    for bad in (
        dict(request_id=""),
        dict(request_id="a b"),
        dict(prompt_token_ids=()),
        dict(prompt_token_ids=[1]),
        dict(prompt_token_ids=(-1,)),
        dict(params=None),
        dict(slo=None),
        dict(prompt_text=3),
    ):
        with pytest.raises(ValueError):
            ValidatedRequest(**{**ok, **bad})


# ---------------------------------------------------------------- property test

f32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
f64 = st.floats(allow_nan=True, allow_infinity=True)
uint32 = st.one_of(st.integers(0, 300), st.integers(0, 2**32 - 1))
uint64 = st.one_of(st.integers(0, 2**63 + 5), st.integers(0, 2**64 - 1))
int32 = st.integers(-(2**31), 2**31 - 1)
small_ids = st.integers(0, 49)  # inside every vocabulary the limits strategy draws but 1


@st.composite
def _field(draw, valid, anything, chaos: bool):
    """None (unset), a plausible value, or (when ``chaos``) anything the wire type allows.

    Fully random values almost never pass every rule at once; without the plausible-only
    mode few examples would reach (and check) the accepted path.
    """
    mode = draw(
        st.sampled_from(["unset", "valid", "valid", "any"] if chaos else ["unset", "valid"])
    )
    if mode == "unset":
        return None
    return draw(valid if mode == "valid" else anything)


@st.composite
def generate_requests(draw) -> pb.GenerateRequest:
    chaos = draw(st.booleans())
    req = pb.GenerateRequest(
        request_id=draw(
            _field(
                st.from_regex(r"[A-Za-z0-9._:-]{1,16}", fullmatch=True),
                st.one_of(
                    st.from_regex(r"[A-Za-z0-9._:-]{1,140}", fullmatch=True), st.text(max_size=20)
                ),
                chaos,
            )
        )
        or ""
    )
    # Without chaos the prompt is present and non-empty; it may still be too long.
    lo = 0 if chaos else 1
    kind = draw(
        st.sampled_from(["text", "ids", "chat", "none"] if chaos else ["text", "ids", "chat"])
    )
    if kind == "text":
        req.text = draw(st.text(min_size=lo, max_size=40))
    elif kind == "ids":
        req.token_ids.SetInParent()  # present even when the list is empty
        req.token_ids.ids.extend(
            draw(
                st.one_of(
                    st.lists(small_ids, min_size=lo, max_size=40), st.lists(uint32, max_size=80)
                )
                if chaos
                else st.lists(small_ids, min_size=1, max_size=40)
            )
        )
    elif kind == "chat":
        req.chat.SetInParent()
        roles = ["system", "user", "assistant", "tool"] + (["", "bot"] if chaos else [])
        for _ in range(draw(st.integers(lo, 5))):
            req.chat.messages.add(
                role=draw(st.sampled_from(roles)), content=draw(st.text(max_size=10))
            )
    if draw(st.booleans()):
        req.add_special_tokens = draw(st.booleans())

    fields = {
        "temperature": (st.floats(0, 2, width=32), f32),
        "top_p": (st.floats(0.0, 1.0, width=32, exclude_min=True), f32),
        "top_k": (st.integers(0, 1), int32),
        "seed": (st.integers(0, 2**63 - 1), uint64),
        "max_tokens": (st.integers(1, 16), uint32),
        "logprobs": (st.integers(0, MAX_LOGPROBS), uint32),
    }
    for name, (valid, anything) in fields.items():
        value = draw(_field(valid, anything, chaos))
        if value is not None:
            setattr(req.sampling, name, value)
    req.stop.stop.extend(
        draw(
            _field(
                st.lists(st.text(min_size=1, max_size=3), max_size=2),
                st.lists(st.text(max_size=10), max_size=5),
                chaos,
            )
        )
        or []
    )
    req.stop.stop_token_ids.extend(
        draw(_field(st.lists(small_ids, max_size=2), st.lists(uint32, max_size=5), chaos)) or []
    )
    req.stop.ignore_eos = draw(st.booleans())
    for name in ("ttft_ms", "tpot_ms"):
        value = draw(_field(st.floats(0.1, 1e4), f64, chaos))
        if value is not None:
            setattr(req.slo, name, value)
    return req


def _limit(generous: int, tight):
    # Mostly generous so that requests can pass; sometimes tight to exercise each limit.
    return st.one_of(st.just(generous), st.just(generous), tight)


limits_strategy = st.builds(
    ValidationLimits,
    vocab_size=st.sampled_from([1, 50, VOCAB, VOCAB, 1000]),
    max_model_len=st.one_of(st.integers(2, 10), st.integers(40, 100)),
    max_tokens_limit=st.integers(16, 64),
    default_max_tokens=st.integers(1, 16),
    max_prompt_chars=_limit(1000, st.integers(1, 20)),
    max_stop_strings=_limit(4, st.integers(0, 3)),
    max_stop_string_len=_limit(8, st.integers(1, 3)),
    max_stop_token_ids=_limit(4, st.integers(0, 3)),
    max_request_id_len=_limit(140, st.integers(1, 20)),
    max_chat_messages=_limit(8, st.integers(1, 4)),
)


def check_invariants(v: ValidatedRequest, req: pb.GenerateRequest, limits: ValidationLimits):
    if req.request_id:
        assert v.request_id == req.request_id
        assert re.fullmatch(r"[A-Za-z0-9._:-]+", v.request_id)
        assert len(v.request_id) <= limits.max_request_id_len
    else:
        assert re.fullmatch(r"[0-9a-f]{32}", v.request_id)
    assert isinstance(v.prompt_token_ids, tuple) and len(v.prompt_token_ids) >= 1
    assert all(0 <= t < limits.vocab_size for t in v.prompt_token_ids)
    p = v.params
    assert p.max_tokens >= 1 and p.max_tokens <= limits.max_tokens_limit
    assert len(v.prompt_token_ids) + p.max_tokens <= limits.max_model_len
    assert math.isfinite(p.temperature) and 0.0 <= p.temperature <= 100.0
    assert 0.0 < p.top_p <= 1.0
    assert 0 <= p.top_k <= limits.vocab_size
    assert p.seed is None or 0 <= p.seed <= 2**63 - 1
    assert p.logprobs is None or 0 <= p.logprobs <= MAX_LOGPROBS
    assert len(p.stop) <= limits.max_stop_strings
    assert all(0 < len(s) <= limits.max_stop_string_len for s in p.stop)
    assert len(p.stop_token_ids) <= limits.max_stop_token_ids
    assert all(0 <= t < limits.vocab_size for t in p.stop_token_ids)
    for value in (v.slo.ttft_s, v.slo.tpot_s):
        assert value is None or (math.isfinite(value) and value > 0)
    assert (v.prompt_text is not None) == (req.WhichOneof("prompt") == "text")


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    req=generate_requests(),
    limits=limits_strategy,
    tokenizer_kind=st.sampled_from(["chat", "chat", "plain", "none"]),
)
def test_property_valid_or_validation_error(req, limits, tokenizer_kind):
    tokenizer = (
        None if tokenizer_kind == "none" else FakeTokenizer(chat_template=tokenizer_kind == "chat")
    )
    # Survive the wire first, as a real request would.
    req = pb.GenerateRequest.FromString(req.SerializeToString())
    try:
        v = validate_request(req, tokenizer, limits)
    except RequestValidationError as exc:
        assert str(exc)  # always a message for the client
        return
    check_invariants(v, req, limits)


@settings(max_examples=200, deadline=None)
@given(
    ids=st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=63),
    max_tokens=st.one_of(st.none(), st.integers(1, 32)),
)
def test_property_valid_requests_accepted(ids, max_tokens):
    sampling = pb.SamplingParams()
    if max_tokens is not None:
        sampling.max_tokens = max_tokens
    req = ids_request(ids=ids, sampling=sampling)
    if max_tokens is not None and len(ids) + max_tokens > LIMITS.max_model_len:
        rejects(req, "exceeds the model's context")
        return
    v = validate(req)
    assert v.prompt_token_ids == tuple(ids)
    expected = max_tokens if max_tokens is not None else min(16, LIMITS.max_model_len - len(ids))
    assert v.params.max_tokens == expected


# ---------------------------------------------------------------- status mapping


class FakeContext:
    """Records what a grpc.aio.ServicerContext would have been asked to do."""

    class Aborted(Exception):
        pass

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def set_trailing_metadata(self, metadata) -> None:
        self.calls.append(("set_trailing_metadata", tuple(metadata)))

    async def abort(self, code, details=""):
        self.calls.append(("abort", code, details))
        raise self.Aborted()


@pytest.mark.parametrize(
    "err,code,retryable",
    [
        (status.InvalidArgument("bad"), grpc.StatusCode.INVALID_ARGUMENT, False),
        (status.Overloaded(), grpc.StatusCode.RESOURCE_EXHAUSTED, True),
        (status.NoWorkerAvailable(), grpc.StatusCode.UNAVAILABLE, True),
        (status.TransferFailed("peer gone"), grpc.StatusCode.UNAVAILABLE, True),
        (status.DeadlineExceeded(), grpc.StatusCode.DEADLINE_EXCEEDED, False),
        (status.Cancelled(), grpc.StatusCode.CANCELLED, False),
        (status.Internal(), grpc.StatusCode.INTERNAL, False),
    ],
)
def test_status_codes(err, code, retryable):
    assert isinstance(err, status.ServingError)
    assert err.code == code and err.retryable is retryable
    assert err.message and str(err) == err.message


def test_transfer_failed_message():
    assert status.TransferFailed("peer gone").message == "KV transfer failed: peer gone"


def test_abort_with_plain_error():
    ctx = FakeContext()
    with pytest.raises(FakeContext.Aborted):
        asyncio.run(status.abort_with(ctx, status.NoWorkerAvailable("no decode worker")))
    assert ctx.calls == [("abort", grpc.StatusCode.UNAVAILABLE, "no decode worker")]


def test_abort_with_retry_after():
    ctx = FakeContext()
    with pytest.raises(FakeContext.Aborted):
        asyncio.run(status.abort_with(ctx, status.Overloaded("queue full", retry_after_s=1.2345)))
    assert ctx.calls == [
        ("set_trailing_metadata", (("retry-after-ms", "1235"),)),  # rounded up
        ("abort", grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full"),
    ]


def test_abort_with_non_raising_context_still_raises():
    class LaxContext(FakeContext):
        async def abort(self, code, details=""):
            self.calls.append(("abort", code, details))

    with pytest.raises(RuntimeError):
        asyncio.run(status.abort_with(LaxContext(), status.Cancelled()))


@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf, True])
def test_overloaded_retry_after_validated(value):
    with pytest.raises(ValueError):
        status.Overloaded(retry_after_s=value)


def test_as_serving_error():
    err = status.NoWorkerAvailable()
    assert status.as_serving_error(err) is err
    inv = status.as_serving_error(RequestValidationError("prompt is empty"))
    assert isinstance(inv, status.InvalidArgument) and inv.message == "prompt is empty"
    assert isinstance(status.as_serving_error(asyncio.CancelledError()), status.Cancelled)
    assert isinstance(status.as_serving_error(asyncio.TimeoutError()), status.DeadlineExceeded)
    internal = status.as_serving_error(ValueError("secret internals"))
    assert isinstance(internal, status.Internal) and "secret" not in internal.message


def test_abort_with_real_grpc_server():
    """End to end over a loopback grpc.aio server: code, details and retry-after-ms arrive."""
    from pdserve.protos import pdserve_pb2_grpc

    class Servicer(pdserve_pb2_grpc.GenerationServicer):
        async def Generate(self, request, context):
            try:
                validate_request(request, None, LIMITS)
            except RequestValidationError as exc:
                await status.abort_with(context, status.as_serving_error(exc))
            await status.abort_with(context, status.Overloaded("queue full", retry_after_s=0.25))
            yield pb.GenerateResponse()  # unreachable; makes this an async generator

    async def scenario():
        server = grpc.aio.server()
        pdserve_pb2_grpc.add_GenerationServicer_to_server(Servicer(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pdserve_pb2_grpc.GenerationStub(channel)
                results = []
                for req in (pb.GenerateRequest(), ids_request()):
                    call = stub.Generate(req, timeout=10)
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        async for _ in call:
                            pass
                    results.append(info.value)
                return results
        finally:
            await server.stop(None)

    invalid, overloaded = asyncio.run(scenario())
    assert invalid.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert invalid.details().startswith("prompt is empty")
    assert overloaded.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert overloaded.details() == "queue full"
    assert ("retry-after-ms", "250") in tuple(overloaded.trailing_metadata())
