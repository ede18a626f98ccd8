"""Prompt construction of the load generator: prefix blocks from hash ids, trace text."""

from __future__ import annotations

import numpy as np

from pdserve.cluster.cli.replay.config import LoadGenConfig
from pdserve.cluster.cli.replay.prompts import WORDS, build_bench_request
from pdserve.workloads.trace import TraceRequest

CFG = LoadGenConfig(vocab_size=1024, seed=7)


def prompt(index: int, req: TraceRequest, cfg: LoadGenConfig = CFG):
    return build_bench_request(index, req, cfg, f"r{index}").prompt


def test_requests_sharing_a_first_hash_share_exactly_its_block():
    a = prompt(0, TraceRequest(0.0, 1200, 4, prefix_hashes=(5, 6, 7)))
    b = prompt(1, TraceRequest(0.0, 700, 4, prefix_hashes=(5, 8)))
    assert (len(a), len(b)) == (1200, 700)
    assert a[:512] == b[:512]
    # After the shared block the prompts differ (block 6 against block 8), position by
    # position almost everywhere, not just somewhere.
    diff = np.asarray(a[512:700]) != np.asarray(b[512:700])
    assert diff.mean() > 0.9
    assert all(3 <= t < 1024 for t in a + b)
    # The same hash ids in another request, at another index, give the same tokens.
    assert prompt(9, TraceRequest(0.0, 1200, 4, prefix_hashes=(5, 6, 7))) == a
    # The seed is part of every block: another seed shares nothing with this run.
    other = prompt(0, TraceRequest(0.0, 1200, 4, prefix_hashes=(5, 6, 7)),
                   LoadGenConfig(vocab_size=1024, seed=8))
    assert (np.asarray(other[:512]) != np.asarray(a[:512])).mean() > 0.9


def test_blocks_cover_what_they_can_and_the_rest_is_the_requests_own():
    full = prompt(0, TraceRequest(0.0, 1024, 4, prefix_hashes=(1, 2)))
    # Fewer ids than the prompt needs (input_length // block_size, or scaled lengths):
    # the blocks come first, the uncovered tail is drawn per request.
    short = prompt(3, TraceRequest(0.0, 1024, 4, prefix_hashes=(1,)))
    assert short[:512] == full[:512] and short[512:] != full[512:]
    # A prompt shorter than its blocks is cut; extra ids are ignored.
    assert prompt(4, TraceRequest(0.0, 100, 4, prefix_hashes=(1, 2, 9))) == full[:100]
    # Block size is the request's (scaled traces have smaller blocks).
    small = prompt(0, TraceRequest(0.0, 40, 4, prefix_hashes=(1, 2), prefix_block_size=20))
    assert small[:20] == prompt(1, TraceRequest(0.0, 20, 4, prefix_hashes=(1,),
                                                prefix_block_size=20))


def test_a_block_never_equals_the_random_prompt_of_the_request_with_its_index():
    block = prompt(0, TraceRequest(0.0, 64, 4, prefix_hashes=(3,)))
    unhashed = prompt(3, TraceRequest(0.0, 64, 4))
    assert (np.asarray(block) != np.asarray(unhashed)).mean() > 0.9


def test_text_mode_sends_the_trace_text_or_words_built_the_same_way():
    cfg = LoadGenConfig(prompt_mode="text", seed=7)
    real = TraceRequest(0.0, 3, 4, prompt_text="What is a KV cache?")
    assert prompt(0, real, cfg) == "What is a KV cache?"
    # Token mode ignores the text: random ids of the traced length.
    assert len(prompt(0, real)) == 3
    a = prompt(0, TraceRequest(0.0, 30, 4, prefix_hashes=(5,), prefix_block_size=20), cfg)
    b = prompt(1, TraceRequest(0.0, 30, 4, prefix_hashes=(5,), prefix_block_size=20), cfg)
    wa, wb = a.split(), b.split()
    assert len(wa) == 30 and set(wa) <= set(WORDS)
    assert wa[:20] == wb[:20] and wa[20:] != wb[20:]
