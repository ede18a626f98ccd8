"""The request the load generator sends for each trace entry, whatever the protocol.

Prompts are seeded, so a run can be repeated exactly and do not depend on the order in
which requests happen to be built:

* **token ids** (``prompt_mode="tokens"``): ``prompt_len`` ids in ``[3, vocab_size)``.
  A request with ``prefix_hashes`` (Mooncake traces) starts with one block of
  ``prefix_block_size`` ids per hash id, each block drawn from a generator seeded by
  (load generator seed, hash id) alone, so requests that share leading hash ids share
  exactly those prompt tokens, which is what a prefix cache can reuse. The blocks are
  concatenated and cut to ``prompt_len``; whatever they do not cover, and every prompt
  without hashes, is drawn from a generator seeded by (seed, request index).
* **text** (``prompt_mode="text"``): the trace's own prompt text when it has one
  (ShareGPT), else random words built the same way (one word per token, blocks of words
  for hash ids). The server's tokenizer decides the real length: see the usage figures.

Block generators are seeded with their own spawn key, so a block never equals the
random prompt of the request whose index happens to equal its hash id.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from pdserve.cluster.cli.replay.config import FIRST_PROMPT_TOKEN_ID, LoadGenConfig
from pdserve.workloads.trace import TraceRequest

WORDS = ("the", "cache", "router", "prefill", "decode", "token", "batch", "worker", "model",
         "request", "stream", "latency", "memory", "layer", "queue", "block", "serve", "fast")
_BLOCK_SPAWN_KEY = (1,)


@dataclass(frozen=True)
class BenchRequest:
    """One request as every driver sends it: greedy, ``ignore_eos``, exactly
    ``max_tokens`` tokens, with the SLO targets when the run sends them."""

    request_id: str
    prompt: tuple[int, ...] | str
    max_tokens: int
    slo_ttft_s: float | None = None
    slo_tpot_s: float | None = None


@lru_cache(maxsize=4096)  # hash ids repeat across requests: that is the point of them
def prefix_block(seed: int, hash_id: int, size: int, low: int, high: int) -> np.ndarray:
    """The ``size`` values in ``[low, high)`` that hash id ``hash_id`` stands for."""
    seq = np.random.SeedSequence([seed, hash_id], spawn_key=_BLOCK_SPAWN_KEY)
    block = np.random.default_rng(seq).integers(low, high, size)
    block.flags.writeable = False  # shared by every caller through the cache
    return block


def prompt_values(index: int, req: TraceRequest, seed: int, low: int, high: int) -> np.ndarray:
    """``req.prompt_len`` values in ``[low, high)``: its prefix blocks, then its own."""
    size = req.prefix_block_size
    needed = req.prefix_hashes[:-(-req.prompt_len // size)]
    blocks = [prefix_block(seed, h, size, low, high) for h in needed]
    head = np.concatenate(blocks)[:req.prompt_len] if blocks else np.empty(0, dtype=np.int64)
    rest = req.prompt_len - len(head)
    if not rest:
        return head
    own = np.random.default_rng([seed, index]).integers(low, high, rest)
    return np.concatenate([head, own]) if len(head) else own


def build_bench_request(index: int, req: TraceRequest, cfg: LoadGenConfig,
                        request_id: str) -> BenchRequest:
    """The request for trace entry ``index``."""
    if cfg.prompt_mode == "text":
        prompt: tuple[int, ...] | str = req.prompt_text if req.prompt_text is not None else (
            " ".join(WORDS[i] for i in prompt_values(index, req, cfg.seed, 0, len(WORDS))))
    else:
        prompt = tuple(prompt_values(index, req, cfg.seed, FIRST_PROMPT_TOKEN_ID,
                                     cfg.vocab_size).tolist())
    return BenchRequest(request_id, prompt, req.output_len, cfg.slo_ttft_s, cfg.slo_tpot_s)
