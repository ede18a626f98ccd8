"""FlashInfer paged attention against the torch reference backend (needs CUDA + flashinfer).

Random paged caches with scattered blocks, GQA, bf16 and fp16, mixed prefill/decode
batches and pure decode batches: outputs agree to a relative error under 1e-2, no NaN.
"""

from __future__ import annotations

import importlib.util
import random

import pytest
import torch

from pdserve.engine.attention.base import AttentionMetadata
from pdserve.engine.attention.torch_ref import TorchAttention
from pdserve.engine.model_config import ModelConfig, RopeConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("flashinfer") is None,
                       reason="needs the flashinfer package (pip install .[gpu])"),
]


def config(heads=32, kv_heads=8, head_dim=128, window=None) -> ModelConfig:
    return ModelConfig("LlamaForCausalLM", 1000, heads * head_dim, 4 * heads * head_dim, 1, heads,
                       kv_heads, head_dim, 1e-5, 8192, RopeConfig(theta=10000.0),
                       sliding_windows=(window,))


def batch(q_lens, kv_lens, block_size, num_blocks, seed):
    rng = random.Random(seed)
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables, slots = [], []
    for q, kv in zip(q_lens, kv_lens, strict=True):
        n = -(-kv // block_size)
        table = [free.pop() for _ in range(n)]
        tables.append(tuple(table))
        slots += [table[p // block_size] * block_size + p % block_size for p in range(kv - q, kv)]
    return AttentionMetadata(tuple(q_lens), tuple(kv_lens), tuple(tables),
                             torch.tensor(slots, device="cuda"), block_size)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("q_lens, kv_lens", [
    ((1, 1, 1, 1), (17, 300, 1024, 5)),  # pure decode
    ((37, 1, 512, 1), (37, 90, 700, 1)),  # prefill, decode, chunked prefill with history
])
@pytest.mark.parametrize("window", [None, 64])
def test_flashinfer_matches_torch_reference(dtype, q_lens, kv_lens, window, prefill_backend):
    from pdserve.engine.attention.flashinfer_backend import FlashInferAttention

    cfg, bs, nb = config(window=window), 16, 512
    dev = torch.device("cuda")
    torch.manual_seed(0)
    meta = batch(q_lens, kv_lens, bs, nb, seed=1)
    t = sum(q_lens)
    cache = torch.randn(2, nb, bs, cfg.num_kv_heads, cfg.head_dim, dtype=dtype, device=dev)
    q = torch.randn(t, cfg.num_heads, cfg.head_dim, dtype=dtype, device=dev)
    k = torch.randn(t, cfg.num_kv_heads, cfg.head_dim, dtype=dtype, device=dev)
    v = torch.randn_like(k)
    outs = []
    for backend in (TorchAttention(cfg, dev, dtype), FlashInferAttention(cfg, dev, dtype,
                                                                  prefill_backend=prefill_backend)):
        kv = cache.clone()
        backend.plan(meta)
        outs.append(backend.forward(0, q, k, v, (kv[0], kv[1])).float())
    ref, fi = outs
    assert not torch.isnan(fi).any()
    rel = (fi - ref).norm() / ref.norm()
    assert rel < 1e-2, rel
