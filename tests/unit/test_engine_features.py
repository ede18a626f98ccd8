"""LLMEngine features on the demo model: text in/out, stop strings, seeded sampling,
prefix caching, abort, request validation and logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.loader import load_model
from pdserve.engine.request import FinishReason
from pdserve.engine.sampling_params import SamplingParams

PROMPT = "The weather this morning was grey and cool."
LONG_PROMPT = ("A serving system has two jobs that pull in opposite directions. It must answer "
               "the first token of every request quickly, and it must keep streaming the "
               "following tokens at a steady pace.")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The demo model's matmuls are tiny; intra-op threads only add contention here.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def loaded(demo_model_dir):
    return load_model(EngineConfig(model=str(demo_model_dir), device="cpu", num_kv_blocks=64))


def make_engine(loaded, **kw) -> LLMEngine:
    """A fresh engine (own KV cache, scheduler) on the shared loaded weights."""
    cfg = EngineConfig(model=loaded.config.model, device="cpu",
                       num_kv_blocks=kw.pop("num_kv_blocks", 64),
                       block_size=kw.pop("block_size", 16), **kw)
    fresh = type(loaded)(cfg, loaded.model_config, loaded.model, loaded.tokenizer,
                         loaded.device, loaded.dtype)
    return LLMEngine.from_config(cfg, loaded=fresh)


def run_all(engine: LLMEngine, max_steps: int = 500):
    outs = {}
    steps = 0
    while engine.has_unfinished_requests():
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
        steps += 1
        assert steps < max_steps
    return outs


# -- text in, text out ----------------------------------------------------------------------

def test_text_prompt_text_matches_decode(loaded):
    engine = make_engine(loaded)
    prompts = [LONG_PROMPT, "Hello there", "What time is it?"]
    outs = engine.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True))
    for prompt, c in zip(prompts, outs, strict=True):
        assert c.prompt_token_ids == tuple(engine.tokenizer.encode(prompt))
        assert len(c.token_ids) == 12 and c.finish_reason is FinishReason.LENGTH
        assert c.text == engine.tokenizer.decode(c.token_ids)
        assert c.text  # the demo model does produce some text
    assert engine.blocks.stats().num_used_blocks == 0


def test_text_and_token_prompts_agree(loaded):
    engine = make_engine(loaded)
    ids = engine.tokenizer.encode(PROMPT)
    a, b = engine.generate([PROMPT, ids], SamplingParams(max_tokens=6, ignore_eos=True))
    assert a.token_ids == b.token_ids and a.text == b.text


def test_stop_string_through_engine(loaded):
    engine = make_engine(loaded)
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    (full,) = engine.generate([LONG_PROMPT], params)
    text = full.text
    # A stop string taken from the middle of the greedy text, spanning at least 2 chars.
    stop = next(text[k:k + 3] for k in range(len(text) // 3, len(text) - 3)
                if text[k:k + 3].strip() and text.find(text[k:k + 3]) > 0)
    cut = text.find(stop)
    req = engine.add_request(LONG_PROMPT, SamplingParams(max_tokens=16, ignore_eos=True,
                                                         stop=(stop,)))
    outs = run_all(engine)[req.request_id]
    assert outs[-1].finish_reason is FinishReason.STOP
    streamed = "".join(o.new_text for o in outs)
    assert streamed == text[:cut]
    assert all(stop not in o.new_text for o in outs)
    # Generation stopped at the token that completed the stop string.
    n = len(req.output_token_ids)
    assert req.output_token_ids == list(full.token_ids[:n])
    assert stop in engine.tokenizer.decode(full.token_ids[:n])
    assert stop not in engine.tokenizer.decode(full.token_ids[:n - 1])


def test_stop_token_id_through_engine(loaded):
    engine = make_engine(loaded)
    (full,) = engine.generate([LONG_PROMPT], SamplingParams(max_tokens=10, ignore_eos=True))
    stop_tok = full.token_ids[4]
    (c,) = engine.generate([LONG_PROMPT], SamplingParams(max_tokens=10, ignore_eos=True,
                                                          stop_token_ids=(stop_tok,)))
    n = full.token_ids.index(stop_tok) + 1
    assert c.token_ids == full.token_ids[:n] and c.finish_reason is FinishReason.STOP


# -- seeded sampling --------------------------------------------------------------------------

def _seeded(seed, max_tokens=10):
    return SamplingParams(max_tokens=max_tokens, temperature=0.8, top_p=0.9, seed=seed,
                          ignore_eos=True)


def test_seeded_sampling_is_batch_independent(loaded):
    alone = make_engine(loaded).generate([PROMPT], _seeded(123))[0].token_ids
    again = make_engine(loaded).generate([PROMPT], _seeded(123))[0].token_ids
    assert alone == again

    engine = make_engine(loaded, max_num_batched_tokens=24)
    prompts = ["Hello", PROMPT, LONG_PROMPT, "What time is it?"]
    params = [_seeded(7, 4), _seeded(123), _seeded(99, 14), SamplingParams(max_tokens=8)]
    batched = engine.generate(prompts, params)
    assert batched[1].token_ids == alone

    other_seed = make_engine(loaded).generate([PROMPT], _seeded(124))[0].token_ids
    assert other_seed != alone


def test_seeded_sampling_survives_preemption(loaded):
    alone = make_engine(loaded).generate([PROMPT], _seeded(123, 24))[0].token_ids
    # 16-token blocks, 5 blocks: three ~35-token sequences cannot all fit at once.
    engine = make_engine(loaded, num_kv_blocks=5)
    preempted = []
    schedule = engine.scheduler.schedule

    def recording_schedule():
        out = schedule()
        preempted.extend(out.preempted)
        return out

    engine.scheduler.schedule = recording_schedule
    # The seeded request comes last, so it is the newest and the one preempted.
    prompts = ["Tomorrow the forecast says there will be fog", PROMPT + " Then", PROMPT]
    outs = engine.generate(prompts, [_seeded(5, 24), _seeded(6, 24), _seeded(123, 24)])
    assert outs[2].request_id in {r.request_id for r in preempted}
    assert outs[2].token_ids == alone
    assert engine.blocks.stats().num_used_blocks == 0


# -- prefix caching ---------------------------------------------------------------------------

@pytest.mark.parametrize("first_finished", [True, False])
def test_prefix_caching_hits_and_matches_uncached(loaded, first_finished):
    tok = loaded.tokenizer
    shared = tok.encode(LONG_PROMPT)
    assert len(shared) >= 2 * 16 + 1
    p1, p2 = shared + tok.encode(" One", add_special_tokens=False), \
        shared + tok.encode(" Two more", add_special_tokens=False)
    params = SamplingParams(max_tokens=8, ignore_eos=True)

    def run(prefix: bool):
        engine = make_engine(loaded, enable_prefix_caching=prefix)
        a = engine.add_request(p1, params)
        if first_finished:
            run_all(engine)
        else:
            engine.step()  # a's prompt is in the cache, a keeps decoding
        b = engine.add_request(p2, params)
        outs = run_all(engine)
        return engine, a, b, outs

    engine, a, b, outs = run(True)
    assert a.num_cached_tokens == 0
    expect = (len(shared) // 16) * 16
    assert b.num_cached_tokens == expect >= 32
    assert all(o.num_cached_tokens == expect for o in outs[b.request_id])
    assert engine.blocks.stats().prefix_hit_tokens >= expect

    _, a_ref, b_ref, _ = run(False)
    assert b_ref.num_cached_tokens == 0
    assert b.output_token_ids == b_ref.output_token_ids
    assert a.output_token_ids == a_ref.output_token_ids


# -- abort ------------------------------------------------------------------------------------

def test_abort_mid_generation(loaded):
    prompts = [PROMPT, LONG_PROMPT, "Hello there"]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    ref = [c.token_ids for c in make_engine(loaded).generate(prompts, params)]

    engine = make_engine(loaded)
    reqs = [engine.add_request(p, params) for p in prompts]
    for _ in range(4):
        engine.step()
    victim = reqs[1]
    assert victim.output_token_ids and not victim.is_finished
    out = engine.abort_request(victim.request_id)
    assert out is not None and out.finished and out.finish_reason is FinishReason.ABORT
    assert victim.finish_reason is FinishReason.ABORT
    assert not engine.blocks.has(victim.request_id)
    assert engine.abort_request(victim.request_id) is None  # already gone
    outs = run_all(engine)
    assert victim.request_id not in outs  # nothing more for the aborted request
    assert engine.blocks.stats().num_used_blocks == 0
    assert tuple(reqs[0].output_token_ids) == ref[0]
    assert tuple(reqs[2].output_token_ids) == ref[2]


def test_abort_waiting_and_all_requests_frees_everything(loaded):
    engine = make_engine(loaded, max_num_seqs=1)
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    r1 = engine.add_request(PROMPT, params)
    r2 = engine.add_request(LONG_PROMPT, params)
    engine.step()
    assert engine.blocks.stats().num_used_blocks > 0
    assert engine.abort_request(r2.request_id).finish_reason is FinishReason.ABORT  # waiting
    assert engine.abort_request(r1.request_id).finish_reason is FinishReason.ABORT  # running
    assert not engine.has_unfinished_requests()
    assert engine.blocks.stats().num_used_blocks == 0
    assert engine.step() == []
    # The ids are free again.
    engine.add_request(PROMPT, params, request_id=r1.request_id)


# -- validation -------------------------------------------------------------------------------

def test_add_request_validation(loaded):
    engine = make_engine(loaded, max_model_len=64)
    vocab = loaded.model_config.vocab_size
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([])
    with pytest.raises(ValueError, match="64"):
        engine.add_request([5] * 64)
    with pytest.raises(ValueError, match=str(vocab)):
        engine.add_request([5, vocab, 6])
    with pytest.raises(ValueError, match="-1"):
        engine.add_request([5, -1])
    engine.add_request([5] * 63, request_id="x")  # the longest allowed prompt
    with pytest.raises(ValueError, match="'x'"):
        engine.add_request([5, 6], request_id="x")
    assert engine.scheduler.num_unfinished == 1


def test_prompt_larger_than_cache_is_rejected(loaded):
    engine = make_engine(loaded, num_kv_blocks=2)  # 32 token slots
    with pytest.raises(ValueError, match="KV cache"):
        engine.add_request([5] * 32)
    engine.add_request([5] * 31)


def test_max_model_len_ends_generation(loaded):
    engine = make_engine(loaded, max_model_len=20)
    prompt = loaded.tokenizer.encode(PROMPT)
    (c,) = engine.generate([prompt], SamplingParams(max_tokens=100, ignore_eos=True))
    assert c.finish_reason is FinishReason.LENGTH
    assert len(prompt) + len(c.token_ids) == 20


# -- logprobs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [0, 3])
def test_logprobs(loaded, k):
    engine = make_engine(loaded)
    (c,) = engine.generate([PROMPT], SamplingParams(max_tokens=6, ignore_eos=True, logprobs=k))
    assert len(c.logprobs) == len(c.token_ids) == 6
    for tok, lp in zip(c.token_ids, c.logprobs, strict=True):
        assert lp.token_id == tok
        assert lp.logprob is not None and lp.logprob <= 0 and math.isfinite(lp.logprob)
        assert len(lp.top_logprobs) == k
        vals = [v for _, v in lp.top_logprobs]
        assert vals == sorted(vals, reverse=True) and all(v <= 0 for v in vals)
        if k:  # greedy: the sampled token is the most likely one
            assert lp.top_logprobs[0][0] == tok
            assert lp.top_logprobs[0][1] == pytest.approx(lp.logprob, abs=1e-6)


def test_no_logprobs_unless_requested(loaded):
    engine = make_engine(loaded)
    (c,) = engine.generate([PROMPT], SamplingParams(max_tokens=3))
    assert c.logprobs == ()


def test_request_outgrowing_the_cache_finishes_or_is_rejected(loaded):
    engine = make_engine(loaded, num_kv_blocks=2)  # 32 token slots
    try:
        req = engine.add_request([5] * 20, SamplingParams(max_tokens=20, ignore_eos=True))
    except ValueError:
        return  # rejecting it up front is fine too
    for _ in range(100):
        if not engine.has_unfinished_requests():
            break
        engine.step()
    assert req.is_finished
    assert engine.blocks.stats().num_used_blocks == 0
