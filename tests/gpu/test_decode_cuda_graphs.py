"""Decode steps replayed from CUDA graphs (engine/graphs/) on the GPU.

* At every captured size, for a full batch and a padded one, with random context lengths
  over scattered blocks: replaying the graph gives logits identical (bit for bit) to
  running the same padded step eagerly through the same FlashInfer wrappers (the same
  kernels on the same shapes), and ``runner.run`` dispatches to the graph; the plain eager
  runner (``graphs_active = False``: other wrappers, unpadded shapes) agrees to bf16
  rounding. For a Llama and for a Qwen2 with one sliding-window and one full layer.
* Padded rows never write a real block: after a padded step, only the real rows' new
  slots and the scratch block differ in the KV cache.
* Capture reports its sizes, time and memory; the block manager never hands out the
  scratch block.
"""

from __future__ import annotations

import importlib.util
import random

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("flashinfer") is None,
                       reason="needs the flashinfer package"),
]

SIZES = (1, 2, 4, 8, 16)
BLOCKS = 1024
BS = 16


def _runner(ckpt, prefill_backend):
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.loader import build_runner, load_model

    loaded = load_model(EngineConfig(
        model=str(ckpt), device="cuda", dtype="bfloat16", block_size=BS, num_kv_blocks=BLOCKS,
        max_num_seqs=max(SIZES), max_model_len=1024, cuda_graph_sizes=SIZES,
        flashinfer_prefill_backend=prefill_backend), load_tokenizer=False)
    runner = build_runner(loaded)
    # Random KV everywhere, so attention reads real data from every block it is given.
    runner.kv_cache.data.normal_(generator=torch.Generator("cuda").manual_seed(0))
    return loaded, runner


def _decode_batch(rng: random.Random, batch: int, usable: int):
    from pdserve.engine.model_runner import ModelInput

    free = rng.sample(range(usable), usable)
    inputs = []
    for _ in range(batch):
        ctx = rng.randint(1, 900)  # tokens after this step, the new one at ctx - 1
        table = tuple(free.pop() for _ in range(-(-ctx // BS)))
        inputs.append(ModelInput((rng.randrange(3, 512),), ctx - 1, table))
    return inputs


@pytest.mark.parametrize("which", ["llama", "qwen2_window"])
def test_graph_replay_equals_the_same_step_run_eagerly(which, gpu_checkpoint,
                                                      gpu_window_checkpoint, prefill_backend):
    from pdserve.engine.graphs.padding import graph_eligible

    ckpt = gpu_checkpoint if which == "llama" else gpu_window_checkpoint
    loaded, runner = _runner(ckpt, prefill_backend)
    if which == "qwen2_window":  # one windowed layer, one full: two wrappers per size
        windows = loaded.model_config.sliding_windows
        assert None in windows and any(w is not None for w in windows), windows
    graphs = runner.graphs
    assert graphs is not None and graphs.sizes == SIZES
    assert graphs.stats.sizes == SIZES and graphs.stats.seconds > 0
    assert runner.usable_blocks == BLOCKS - 1 and graphs.scratch_block == BLOCKS - 1
    rng = random.Random(1)
    for size in SIZES:
        for batch in sorted({size, max(1, size - 1), size // 2 + 1}):
            inputs = _decode_batch(rng, batch, runner.usable_blocks)
            # the smallest captured size that holds the batch (size - 1 may be captured too)
            want = min(s for s in SIZES if s >= batch)
            assert graph_eligible(inputs, False, None) and graphs.padded_size(batch) == want
            eager_same_kernels = graphs.run_eager(inputs)
            replayed = graphs.run(inputs)
            via_runner = runner.run(inputs)
            assert replayed.shape == (batch, loaded.model_config.vocab_size)
            assert torch.equal(replayed, eager_same_kernels), (which, size, batch)
            assert torch.equal(via_runner, replayed)
            runner.graphs_active = False
            plain = runner.run(inputs)
            runner.graphs_active = True
            rel = float((plain - replayed).norm() / plain.norm())
            assert rel < 1e-2, (which, size, batch, rel)


def test_padded_rows_never_write_a_real_block(gpu_checkpoint, prefill_backend):
    _, runner = _runner(gpu_checkpoint, prefill_backend)
    graphs = runner.graphs
    rng = random.Random(2)
    for batch in (3, 5, 9):  # padded to 4, 8, 16
        inputs = _decode_batch(rng, batch, runner.usable_blocks)
        assert graphs.padded_size(batch) > batch
        before = runner.kv_cache.data.clone()
        runner.run(inputs)
        torch.cuda.synchronize()
        after = runner.kv_cache.data
        layers, _, blocks, bs = after.shape[:4]
        changed = (after != before).reshape(layers, 2, blocks * bs, -1).any(-1).any(1).any(0)
        changed_slots = set(torch.nonzero(changed).flatten().tolist())
        real = {i.block_table[i.start // BS] * BS + i.start % BS for i in inputs}
        scratch = set(range(graphs.scratch_block * BS, (graphs.scratch_block + 1) * BS))
        assert changed_slots - scratch == real, "a padded row wrote outside the scratch block"


def test_the_engine_never_hands_out_the_scratch_block(gpu_checkpoint, prefill_backend):
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.model_step import EngineParts

    parts = EngineParts.build(EngineConfig(
        model=str(gpu_checkpoint), device="cuda", dtype="bfloat16", num_kv_blocks=64,
        max_num_seqs=4, max_model_len=512, cuda_graph_sizes=(1, 2, 4),
        flashinfer_prefill_backend=prefill_backend), load_tokenizer=False)
    assert parts.runner.graphs is not None
    assert parts.blocks.num_blocks == 63 == parts.runner.usable_blocks
    eager = EngineParts.build(EngineConfig(
        model=str(gpu_checkpoint), device="cuda", dtype="bfloat16", num_kv_blocks=64,
        enforce_eager=True, flashinfer_prefill_backend=prefill_backend), load_tokenizer=False)
    assert eager.runner.graphs is None and eager.blocks.num_blocks == 64
