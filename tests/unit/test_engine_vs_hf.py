"""The engine against Hugging Face transformers on tiny random checkpoints loaded from disk.

Logits of a prefill (every position) and of every decode step must agree to 1e-4 in
float32, with the sequence's KV blocks scattered through the cache; greedy generation
through the continuous-batching engine must equal ``generate()`` token for token.
"""

from __future__ import annotations

import random

import pytest
import torch
import transformers

from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.loader import build_runner, kv_cache_spec, load_model
from pdserve.engine.model_runner import ModelInput
from pdserve.engine.sampling_params import SamplingParams
from tests.conftest import ARCHS

ATOL = 1e-4
BLOCK = 4


def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", dtype=torch.float32, local_files_only=True).eval()


def scattered_runner(path, num_blocks=64):
    loaded = load_model(EngineConfig(model=str(path), device="cpu", block_size=BLOCK,
                                     num_kv_blocks=num_blocks))
    return loaded, build_runner(loaded, kv_cache_spec(loaded, num_blocks))


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_and_decode_logits_match_transformers(arch, tiny_checkpoints):
    path = tiny_checkpoints[arch]
    ref = hf_model(path)
    loaded, runner = scattered_runner(path)
    rng = random.Random(arch)
    prompt = [rng.randrange(loaded.model_config.vocab_size) for _ in range(19)]
    steps = 12
    # Scattered, non-monotonic block ids: the sequence's KV is all over the cache.
    table = rng.sample(range(64), (len(prompt) + steps) // BLOCK + 1)

    logits = runner.run([ModelInput(prompt, 0, table)], all_logits=True)
    with torch.no_grad():
        want = ref(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(logits, want, atol=ATOL, rtol=0)

    seq = list(prompt)
    for _ in range(steps):
        seq.append(int(logits[-1].argmax()))
        logits = runner.run([ModelInput([seq[-1]], len(seq) - 1, table)])
        with torch.no_grad():
            want = ref(torch.tensor([seq])).logits[0, -1:]
        torch.testing.assert_close(logits, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_prefill_and_mixed_batch_match_transformers(arch, tiny_checkpoints):
    """A prompt prefilled in chunks while another sequence decodes in the same steps."""
    path = tiny_checkpoints[arch]
    ref = hf_model(path)
    loaded, runner = scattered_runner(path)
    rng = random.Random(7)
    v = loaded.model_config.vocab_size
    a = [rng.randrange(v) for _ in range(23)]
    b = [rng.randrange(v) for _ in range(9)]
    blocks = rng.sample(range(64), 24)
    ta, tb = blocks[:12], blocks[12:]
    runner.run([ModelInput(b, 0, tb)])
    # a in chunks of 10, 10, 3 while b decodes; compare a's last-chunk logits and b's steps.
    for start, end in ((0, 10), (10, 20), (20, 23)):
        out = runner.run([ModelInput(a[start:end], start, ta), ModelInput([b[-1]], len(b) - 1, tb)])
        b.append(int(out[1].argmax()))
    with torch.no_grad():
        want_a = ref(torch.tensor([a])).logits[0, -1]
        want_b = ref(torch.tensor([b[:-1]])).logits[0, -1]
    torch.testing.assert_close(out[0], want_a, atol=ATOL, rtol=0)
    torch.testing.assert_close(out[1], want_b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_continuous_batching_greedy_equals_generate(arch, tiny_checkpoints):
    path = tiny_checkpoints[arch]
    ref = hf_model(path)
    engine = LLMEngine.from_config(EngineConfig(
        model=str(path), device="cpu", block_size=BLOCK, num_kv_blocks=96,
        max_num_batched_tokens=24, max_num_seqs=8))
    rng = random.Random(11)
    v = engine.loaded.model_config.vocab_size
    prompts = [[rng.randrange(v) for _ in range(n)] for n in (5, 17, 2, 30, 11, 8)]
    max_new = [9, 14, 20, 6, 12, 16]
    join_at = [0, 0, 2, 3, 7, 11]  # engine step at which each prompt arrives
    reqs, step = {}, 0
    while len(reqs) < len(prompts) or engine.has_unfinished_requests():
        for i, at in enumerate(join_at):
            if at == step:
                reqs[i] = engine.add_request(prompts[i], SamplingParams(max_tokens=max_new[i]))
        engine.step()
        step += 1
    for i, p in enumerate(prompts):
        with torch.no_grad():
            want = ref.generate(torch.tensor([p]), max_new_tokens=max_new[i], do_sample=False,
                                min_new_tokens=max_new[i])[0, len(p):].tolist()
        assert list(reqs[i].output_token_ids) == want, f"prompt {i}"
    assert engine.blocks.stats().num_used_blocks == 0


def test_preemption_recomputes_and_still_matches(tiny_checkpoints):
    """A cache too small for every sequence at once forces preemption; output is unchanged."""
    path = tiny_checkpoints["llama"]
    rng = random.Random(3)
    prompts = [[rng.randrange(200) for _ in range(n)] for n in (10, 12, 9, 14)]
    params = SamplingParams(max_tokens=20)

    def run(num_blocks):
        engine = LLMEngine.from_config(EngineConfig(model=str(path), device="cpu", block_size=BLOCK,
                                                    num_kv_blocks=num_blocks))
        return [c.token_ids for c in engine.generate(prompts, params)], engine

    roomy, _ = run(200)
    tight, engine = run(22)  # 4 sequences of up to 34 tokens need 36 blocks
    assert tight == roomy
    assert engine.blocks.stats().num_used_blocks == 0
