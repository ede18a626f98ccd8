"""Stop conditions and streamed text through ``OutputProcessor``, on the demo tokenizer.

Requests and sampled tokens are built by hand, so each stop rule (max_tokens, context
length, EOS, stop token ids, stop strings) is checked in isolation, including stop
strings that straddle tokens and deltas.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve.engine.messages import SampledToken
from pdserve.engine.output_processor import OutputProcessor, RequestOutput
from pdserve.engine.request import FinishReason, Request, RequestStatus
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.tokenizer import Tokenizer

TEXT = "The weather this morning was grey and cool. Clouds came in from the west before sunrise"


@pytest.fixture(scope="module")
def tok(demo_model_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(demo_model_dir)


@pytest.fixture(scope="module")
def ids(tok) -> list[int]:
    out = tok.encode(TEXT, add_special_tokens=False)
    assert tok.decode(out) == TEXT
    assert len(out) > 10
    return out


@pytest.fixture(scope="module")
def eos(tok) -> int:
    (eos,) = tok.eos_token_ids
    return eos


def make_request(tok, params: SamplingParams, rid: str = "r", prompt: str = "Hello there") -> Request:
    req = Request(rid, tuple(tok.encode(prompt)), params)
    req.transition(RequestStatus.RUNNING)
    return req


def feed(proc: OutputProcessor, req: Request, tokens, logprob=None, top=()) -> list[RequestOutput]:
    """Process ``tokens`` one by one until the request finishes; return every output."""
    outs = []
    for t in tokens:
        outs.append(proc.process(req, SampledToken(t, logprob, top)))
        if outs[-1].finished:
            break
    return outs


def processor(tok, max_model_len: int = 4096) -> OutputProcessor:
    return OutputProcessor(tok, tok.eos_token_ids, max_model_len)


def run(tok, tokens, params: SamplingParams, max_model_len: int = 4096):
    proc = processor(tok, max_model_len)
    req = make_request(tok, params)
    proc.register(req)
    return req, feed(proc, req, tokens)


def joined(outs) -> str:
    return "".join(o.new_text for o in outs)


# -- length ------------------------------------------------------------------------------

@pytest.mark.parametrize("max_tokens", [1, 2, 5])
def test_max_tokens_finishes_with_length_exactly(tok, ids, max_tokens):
    req, outs = run(tok, ids, SamplingParams(max_tokens=max_tokens))
    assert len(outs) == max_tokens
    assert [o.finished for o in outs] == [False] * (max_tokens - 1) + [True]
    assert outs[-1].finish_reason is FinishReason.LENGTH
    assert all(o.finish_reason is None for o in outs[:-1])
    assert req.output_token_ids == ids[:max_tokens]
    assert req.status is RequestStatus.FINISHED_LENGTH and req.finish_reason is FinishReason.LENGTH
    assert [o.num_output_tokens for o in outs] == list(range(1, max_tokens + 1))
    assert all(o.new_token_ids == (t,) for o, t in zip(outs, ids, strict=False))
    assert joined(outs) == tok.decode(ids[:max_tokens])


def test_max_model_len_finishes_with_length(tok, ids):
    prompt_len = len(tok.encode("Hello there"))
    max_model_len = prompt_len + 3
    req, outs = run(tok, ids, SamplingParams(max_tokens=100), max_model_len=max_model_len)
    assert len(outs) == 3
    assert outs[-1].finish_reason is FinishReason.LENGTH
    assert req.num_tokens == max_model_len
    assert outs[-1].num_prompt_tokens == prompt_len


# -- eos and stop token ids ---------------------------------------------------------------

def test_eos_stops(tok, ids, eos):
    tokens = ids[:3] + [eos] + ids[3:]
    req, outs = run(tok, tokens, SamplingParams(max_tokens=50))
    assert len(outs) == 4
    assert outs[-1].finish_reason is FinishReason.STOP
    assert req.status is RequestStatus.FINISHED_STOPPED
    assert req.output_token_ids == ids[:3] + [eos]
    assert joined(outs) == tok.decode(ids[:3])


def test_ignore_eos_continues(tok, ids, eos):
    tokens = ids[:3] + [eos] + ids[3:]
    req, outs = run(tok, tokens, SamplingParams(max_tokens=6, ignore_eos=True))
    assert len(outs) == 6
    assert outs[-1].finish_reason is FinishReason.LENGTH
    assert req.output_token_ids == tokens[:6]


def test_processor_eos_ids_come_from_constructor(tok, ids):
    proc = OutputProcessor(tok, {ids[2]}, 4096)
    req = make_request(tok, SamplingParams(max_tokens=50))
    proc.register(req)
    outs = feed(proc, req, ids)
    assert len(outs) == 3 and outs[-1].finish_reason is FinishReason.STOP


def test_stop_token_id_is_kept_in_output(tok, ids):
    stop_tok = ids[4]
    req, outs = run(tok, ids, SamplingParams(max_tokens=50, stop_token_ids=(stop_tok,)))
    n = ids.index(stop_tok) + 1
    assert len(outs) == n
    assert outs[-1].finish_reason is FinishReason.STOP
    assert req.output_token_ids == ids[:n]
    assert req.output_token_ids[-1] == stop_tok
    assert joined(outs) == tok.decode(ids[:n])


def test_stop_token_id_wins_even_with_ignore_eos(tok, ids):
    params = SamplingParams(max_tokens=50, stop_token_ids=(ids[1],), ignore_eos=True)
    _, outs = run(tok, ids, params)
    assert len(outs) == 2 and outs[-1].finish_reason is FinishReason.STOP


def test_without_tokenizer_only_token_rules_apply(ids):
    proc = OutputProcessor(None, {ids[3]}, 4096)
    req = Request("r", (5, 6, 7), SamplingParams(max_tokens=10, stop=("weather",)))
    req.transition(RequestStatus.RUNNING)
    proc.register(req)
    outs = feed(proc, req, ids)
    assert len(outs) == 4 and outs[-1].finish_reason is FinishReason.STOP
    assert all(o.new_text == "" for o in outs)


# -- stop strings --------------------------------------------------------------------------

def _check_stop_string_run(tok, ids, stops, outs, req):
    """The reference: stop at the first token whose decoded text contains a stop string."""
    for k in range(1, len(ids) + 1):
        text = tok.decode(ids[:k])
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            assert len(outs) == k
            assert outs[-1].finish_reason is FinishReason.STOP
            assert req.output_token_ids == ids[:k]
            assert joined(outs) == text[: min(hits)]
            break
    else:
        assert outs[-1].finish_reason is FinishReason.LENGTH
        assert joined(outs) == tok.decode(ids)
    for o in outs:
        for s in stops:
            assert s not in o.new_text


@pytest.mark.parametrize("stop", [
    "weather",      # exactly one token (" weather" minus its space)
    " this morning",  # two whole tokens
    "ther thi",     # straddles two tokens
    "morning was grey",  # spans three tokens
    "e",            # one char, early
    "cool.",
    "sunrise",      # the very end
])
def test_stop_string_cuts_text(tok, ids, stop):
    assert stop in TEXT
    req, outs = run(tok, ids, SamplingParams(max_tokens=len(ids), stop=(stop,)))
    _check_stop_string_run(tok, ids, (stop,), outs, req)
    assert joined(outs) == TEXT[: TEXT.index(stop)]


def test_stop_string_never_in_any_delta_with_several_stops(tok, ids):
    stops = ("Clouds came", "grey and", "zzz")
    req, outs = run(tok, ids, SamplingParams(max_tokens=len(ids), stop=stops))
    assert joined(outs) == TEXT[: TEXT.index("grey and")]
    _check_stop_string_run(tok, ids, stops, outs, req)


def test_stop_string_straddling_deltas_is_not_leaked(tok, ids):
    # "morning was" spans " morning" and " was"; with a 40-char stop string held back,
    # " morn..." may not have been emitted before " was" arrives.
    stops = ("morning was", "x" * 40)
    _, outs = run(tok, ids, SamplingParams(max_tokens=len(ids), stop=stops))
    assert joined(outs) == "The weather this "
    assert "morning" not in joined(outs)


def test_near_miss_text_is_held_then_released(tok, ids):
    # "the west" never occurs; "the" and "the " prefixes do (in "weather this", "the west"...)
    stop = "the east"
    req, outs = run(tok, ids, SamplingParams(max_tokens=len(ids) + 5, stop=(stop,)))
    # Not finished yet (ran out of tokens): the end of the text may still be held back,
    # but everything before the last len(stop)-1 characters has been released.
    assert not outs[-1].finished
    emitted = joined(outs)
    assert TEXT.startswith(emitted)
    assert len(emitted) >= len(TEXT) - (len(stop) - 1)
    # Some step emitted nothing new even though its token had text: text was held back.
    assert any(o.new_text == "" for o in outs)


def test_held_back_text_flushed_on_length(tok, ids):
    stop = "weather this morning was grey and cool. Clouds came in from the east"
    params = SamplingParams(max_tokens=len(ids), stop=(stop,))
    req, outs = run(tok, ids, params)
    assert outs[-1].finish_reason is FinishReason.LENGTH
    assert joined(outs) == TEXT  # the held-back tail comes out with the final output
    # The held-back part is long, so the last delta carries a lot at once.
    assert len(outs[-1].new_text) >= len(stop) - 1 - len(tok.decode(ids[-1:]))


def test_held_back_text_flushed_on_eos(tok, ids, eos):
    stop = "morning is"
    tokens = ids[:4] + [eos]  # "The weather this morning" + EOS: "morning" looks like the stop
    req, outs = run(tok, tokens, SamplingParams(max_tokens=20, stop=(stop,)))
    assert outs[-1].finish_reason is FinishReason.STOP
    assert joined(outs) == "The weather this morning"


def test_stop_string_inside_prompt_does_not_stop(tok, ids):
    params = SamplingParams(max_tokens=3, stop=("Hello",))
    proc = processor(tok)
    req = make_request(tok, params, prompt="Hello Hello Hello")
    proc.register(req)
    outs = feed(proc, req, ids)
    assert outs[-1].finish_reason is FinishReason.LENGTH
    assert joined(outs) == tok.decode(ids[:3])


def test_multibyte_text_streams_whole(tok):
    text = "caf\u00e9 \u00fcber na\u00efve \U0001F600 done"
    tokens = tok.encode(text, add_special_tokens=False)
    req, outs = run(tok, tokens, SamplingParams(max_tokens=len(tokens), stop=("zz",)))
    assert joined(outs) == text
    assert all("\ufffd" not in o.new_text for o in outs)


WORDS = [" the", " weather", " cool", " this", " morning", " and", " grey", ".", " was", ",",
         " sea", " soup", " a", "e", " th"]


@settings(max_examples=60, deadline=None)
@given(words=st.lists(st.sampled_from(WORDS), min_size=1, max_size=25),
       stops=st.lists(st.text(alphabet="the wacorning.,", min_size=1, max_size=8),
                      min_size=1, max_size=3),
       max_extra=st.integers(0, 3))
def test_stop_strings_property(tok, words, stops, max_extra):
    text = "".join(words)
    tokens = tok.encode(text, add_special_tokens=False)
    params = SamplingParams(max_tokens=len(tokens) + max_extra, stop=tuple(stops))
    req, outs = run(tok, tokens, params)
    if not outs[-1].finished:  # ran out of tokens before any rule fired
        assert all(s not in tok.decode(tokens) for s in stops)
        assert tok.decode(tokens).startswith(joined(outs))
        return
    _check_stop_string_run(tok, tokens, stops, outs, req)


# -- logprobs and abort --------------------------------------------------------------------

def test_logprobs_recorded_only_when_requested(tok, ids):
    top = ((ids[0], -0.5), (7, -1.5))
    for logprobs in (None, 0, 2):
        proc = processor(tok)
        req = make_request(tok, SamplingParams(max_tokens=3, logprobs=logprobs))
        proc.register(req)
        outs = feed(proc, req, ids, logprob=-0.5, top=top)
        if logprobs is None:
            assert req.output_logprobs == []
            assert all(o.logprobs == () for o in outs)
        else:
            assert [s.token_id for s in req.output_logprobs] == ids[:3]
            assert all(len(o.logprobs) == 1 and o.logprobs[0].logprob == -0.5 for o in outs)
            assert [o.logprobs[0].token_id for o in outs] == ids[:3]


@pytest.mark.parametrize("status", [RequestStatus.WAITING, RequestStatus.RUNNING])
def test_abort(tok, ids, status):
    proc = processor(tok)
    req = Request("r", tuple(tok.encode("Hi")), SamplingParams(max_tokens=10, stop=("zz",)))
    if status is RequestStatus.RUNNING:
        req.transition(RequestStatus.RUNNING)
    proc.register(req)
    if status is RequestStatus.RUNNING:
        feed(proc, req, ids[:3])
    out = proc.abort(req)
    assert out.finished and out.finish_reason is FinishReason.ABORT
    assert out.new_token_ids == () and out.new_text == ""
    assert req.status is RequestStatus.FINISHED_ABORTED
    assert req.finish_reason is FinishReason.ABORT
    assert out.num_output_tokens == len(req.output_token_ids)
    # Aborting again is harmless and still reports ABORT.
    assert proc.abort(req).finish_reason is FinishReason.ABORT


def test_abort_after_finish_keeps_original_reason(tok, ids):
    req, outs = run(tok, ids, SamplingParams(max_tokens=1))
    assert outs[-1].finish_reason is FinishReason.LENGTH
    processor(tok).abort(req)
    assert req.finish_reason is FinishReason.LENGTH


def test_register_counts_existing_output_tokens_as_seen(tok, ids):
    proc = processor(tok)
    req = make_request(tok, SamplingParams(max_tokens=10))
    req.output_token_ids.extend(ids[:2])
    proc.register(req)
    outs = feed(proc, req, ids[2:5])
    assert joined(outs) == tok.decode(ids[:5])[len(tok.decode(ids[:2])):]
    assert outs[-1].num_output_tokens == 5


def test_num_cached_tokens_reported(tok, ids):
    proc = processor(tok)
    req = make_request(tok, SamplingParams(max_tokens=2))
    req.num_cached_tokens = 16
    proc.register(req)
    assert all(o.num_cached_tokens == 16 for o in feed(proc, req, ids))


def test_finished_text_includes_undecodable_tail(tok):
    cont = tok.encode("\u00e9", add_special_tokens=False)[-1]  # 0xA9, a continuation byte
    assert tok.decode([cont]) == "\ufffd"
    tokens = tok.encode("ok", add_special_tokens=False) + [cont] * 3
    req, outs = run(tok, tokens, SamplingParams(max_tokens=len(tokens)))
    assert outs[-1].finish_reason is FinishReason.LENGTH
    assert joined(outs) == tok.decode(tokens)
