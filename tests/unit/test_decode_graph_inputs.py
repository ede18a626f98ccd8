"""DecodeGraphs' static-buffer path run eagerly on the CPU (``run_eager``: pad, fill the
static inputs, plan for the padded size, run the forward over the static buffers), with
the torch reference attention standing in for FlashInfer's graph wrappers. Capture and
replay need CUDA (tests/gpu/test_decode_cuda_graphs.py); this checks what they would run:
the real rows' logits equal the unpadded eager step's, and padded rows write nothing but
the scratch block."""

from __future__ import annotations

import random

import pytest
import torch

from pdserve.engine.attention.torch_ref import TorchAttention
from pdserve.engine.config import EngineConfig
from pdserve.engine.graphs.decode_graphs import DecodeGraphs
from pdserve.engine.loader import build_runner, load_model
from pdserve.engine.model_runner import ModelInput

BLOCKS, BS = 48, 16


class GraphPlanningTorchAttention(TorchAttention):
    """The torch reference, planning a padded batch as an ordinary one."""

    supports_cuda_graphs = True

    def init_cuda_graphs(self, sizes, max_pages_per_seq):
        self.graph_sizes = tuple(sizes)

    def plan_for_graph(self, meta):
        assert len(meta.seq_lens) in self.graph_sizes
        self.planned_sizes.append(len(meta.seq_lens))
        self.plan(meta)


@pytest.fixture
def runner_and_graphs(tiny_checkpoints):
    loaded = load_model(EngineConfig(model=str(tiny_checkpoints["llama"]), device="cpu",
                                     num_kv_blocks=BLOCKS), load_tokenizer=False)
    runner = build_runner(loaded)
    attn = GraphPlanningTorchAttention(loaded.rank_config, runner.device, loaded.dtype)
    attn.planned_sizes = []
    runner.attn = attn
    runner.kv_cache.data.normal_(generator=torch.Generator().manual_seed(0))
    graphs = DecodeGraphs(loaded.model, runner.kv_cache, attn, runner.device, (1, 2, 4, 8),
                          scratch_block=BLOCKS - 1, max_pages_per_seq=BLOCKS - 1)
    return runner, graphs


def decode_batch(rng, batch):
    free = rng.sample(range(BLOCKS - 1), BLOCKS - 1)
    out = []
    for _ in range(batch):
        ctx = rng.randint(1, 60)
        out.append(ModelInput((rng.randrange(3, 200),), ctx - 1,
                              tuple(free.pop() for _ in range(-(-ctx // BS)))))
    return out


@pytest.mark.parametrize("batch", [1, 3, 5, 8])
def test_padded_static_step_matches_the_eager_step_and_stays_out_of_real_blocks(
        runner_and_graphs, batch):
    runner, graphs = runner_and_graphs
    inputs = decode_batch(random.Random(batch), batch)
    eager = runner.run(inputs)  # writes the real rows' K/V
    before = runner.kv_cache.data.clone()
    padded = graphs.run_eager(inputs)
    assert runner.attn.planned_sizes == [graphs.padded_size(batch)]
    assert padded.shape == eager.shape
    torch.testing.assert_close(padded, eager, rtol=1e-5, atol=1e-5)
    # The real rows rewrote their own slots with the same K/V (up to matmul rounding);
    # the padded rows wrote only the scratch block.
    diff = (runner.kv_cache.data - before).abs()
    real_blocks = sorted({i.block_table[i.start // BS] for i in inputs})
    others = [b for b in range(BLOCKS - 1) if b not in real_blocks]
    assert not diff[:, :, others].any()
    assert float(diff[:, :, real_blocks].max()) < 1e-5
    if graphs.padded_size(batch) > batch:
        scratch = runner.kv_cache.data[:, :, BLOCKS - 1]
        assert not torch.equal(scratch[:, :, 0], before[:, :, BLOCKS - 1, 0])  # slot 0 written
        assert torch.equal(scratch[:, :, 1:], before[:, :, BLOCKS - 1, 1:])  # nothing else


def test_static_inputs_hold_the_padded_batch(runner_and_graphs):
    _, graphs = runner_and_graphs
    inputs = decode_batch(random.Random(7), 3)
    graphs.run_eager(inputs)
    ids, pos, slots = graphs._inputs[:, :4].tolist()
    assert ids == [i.token_ids[0] for i in inputs] + [0]
    assert pos == [i.start for i in inputs] + [0]
    assert slots == [i.block_table[i.start // BS] * BS + i.start % BS for i in inputs] + \
        [(BLOCKS - 1) * BS]
    with pytest.raises(ValueError, match="exceeds the largest graph"):
        graphs.run_eager(decode_batch(random.Random(8), 9))
