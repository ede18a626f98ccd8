"""Which share of the model a tensor-parallel rank holds, and that it reads only that share.

In-process, no process group: ``TPShard`` is pure arithmetic and ``load_weights`` with a
shard is a function of the checkpoint; the ranks' shares put back together are the whole
model, and a rank never reads a sharded tensor whole.
"""

from __future__ import annotations

import pytest
import safetensors
import torch

from pdserve.engine.demo_tp_model import TP_DEMO_KV_HEADS, create_tp_demo_model
from pdserve.engine.model_config import ModelConfig
from pdserve.engine.parallel.shard import HeadRange, TPShard, even_range, kv_head_range
from pdserve.engine.weights import load_weights


@pytest.fixture(scope="module")
def tp_mistral(tmp_path_factory):
    return create_tp_demo_model("mistral", tmp_path_factory.mktemp("tp") / "mistral")


def test_shares_cover_the_model_once():
    config = ModelConfig.from_hf_config(_hf("llama", vocab=1001))
    for tp in (1, 2, 4, 8):
        shards = [TPShard.for_rank(config, tp, r) for r in range(tp)]
        assert [h for s in shards for h in range(s.q_heads.start, s.q_heads.stop)] == \
            list(range(config.num_heads))
        assert [i for s in shards for i in range(s.intermediate.start, s.intermediate.stop)] \
            == list(range(config.intermediate_size))
        assert sum(s.vocab_rows for s in shards) == config.vocab_size
        assert all(s.vocab_start == r * s.vocab_per_rank for r, s in enumerate(shards))
        kv = [(s.kv_heads.start, s.kv_heads.stop) for s in shards]
        if tp <= TP_DEMO_KV_HEADS:
            assert kv == [(r * 4 // tp, (r + 1) * 4 // tp) for r in range(tp)]
            assert {s.kv_replicas for s in shards} == {1}
        else:  # 8 ranks, 4 KV heads: each head on two neighbouring ranks
            assert kv == [(0, 1), (0, 1), (1, 2), (1, 2), (2, 3), (2, 3), (3, 4), (3, 4)]
            assert {s.kv_replicas for s in shards} == {2}
        local = shards[-1].local_config(config)
        assert (local.num_heads, local.num_kv_heads) == (8 // tp, max(1, 4 // tp))
        # A rank's query heads read only its own KV heads (GQA groups stay on one rank).
        group = config.num_heads // config.num_kv_heads
        for s in shards:
            assert {h // group for h in range(s.q_heads.start, s.q_heads.stop)} <= \
                set(range(s.kv_heads.start, s.kv_heads.stop))


def test_tp1_is_the_whole_model():
    config = ModelConfig.from_hf_config(_hf("qwen2", vocab=1001))
    shard = TPShard.for_rank(config)
    assert not shard.is_sharded
    assert shard.local_config(config) is config
    assert shard.kv_heads == HeadRange(0, config.num_kv_heads)


@pytest.mark.parametrize("tp, match", [(3, "tensor parallel size"), (16, "attention heads")])
def test_degrees_the_model_cannot_take(tp, match):
    config = ModelConfig.from_hf_config(_hf("llama", vocab=100))
    with pytest.raises(ValueError, match=match):
        TPShard.for_rank(config, tp, 0)


def test_small_helpers():
    assert [len(even_range(10, 4, i)) for i in range(4)] == [3, 3, 2, 2]
    assert kv_head_range(2, 4, 3) == HeadRange(1, 2)
    with pytest.raises(ValueError):
        kv_head_range(4, 2, 2)
    with pytest.raises(ValueError):
        HeadRange(2, 2)


@pytest.mark.parametrize("tp", [2, 4])
def test_rank_shares_rebuild_the_weights_and_are_read_sliced(tp, tp_mistral, monkeypatch):
    config = ModelConfig.from_pretrained(tp_mistral)
    full = load_weights(tp_mistral, config, torch.float32)
    whole_reads = _record_whole_reads(monkeypatch)
    shards = [TPShard.for_rank(config, tp, r) for r in range(tp)]
    parts = [load_weights(tp_mistral, config, torch.float32, shard=s) for s in shards]
    # Only the replicated tensors (norms; o_proj has no bias here) are read whole.
    assert whole_reads and all("norm" in n for n in whole_reads)

    d = config.head_dim
    q, kv = config.q_size // tp, config.kv_size // tp
    for i, lw in enumerate(full.layers):
        ranks = [p.layers[i] for p in parts]
        assert torch.equal(torch.cat([r.qkv[:q] for r in ranks]), lw.qkv[:config.q_size])
        assert torch.equal(torch.cat([r.qkv[q:q + kv] for r in ranks]),
                           lw.qkv[config.q_size:config.q_size + config.kv_size])
        assert torch.equal(torch.cat([r.o_proj for r in ranks], dim=1), lw.o_proj)
        m = [len(s.intermediate) for s in shards]
        assert torch.equal(torch.cat([r.gate_up[:m[k]] for k, r in enumerate(ranks)]),
                           lw.gate_up[:config.intermediate_size])
        assert torch.equal(torch.cat([r.down for r in ranks], dim=1), lw.down)
        assert all(torch.equal(r.input_norm, lw.input_norm) for r in ranks)
    assert ranks[0].qkv.shape[0] == (config.num_heads + 2 * config.num_kv_heads) * d // tp
    embed = torch.cat([p.embed for p in parts])
    assert torch.equal(embed[:config.vocab_size], full.embed)
    assert not embed[config.vocab_size:].any()  # the padding rows are zero

    # A rank holds 1/tp of every split tensor; only the norms are held tp times over.
    replicated = sum(t.nbytes for t in full.tensors() if t.dim() == 1)
    padding = (embed.shape[0] - config.vocab_size) * config.hidden_size * 4 * 2
    assert sum(p.nbytes for p in parts) == full.nbytes + (tp - 1) * replicated + padding


def test_replicated_kv_heads_are_read_by_every_holder(tiny_checkpoints):
    path = tiny_checkpoints["qwen2"]  # 2 KV heads, QKV bias, tied embeddings
    config = ModelConfig.from_pretrained(path)
    full = load_weights(path, config, torch.float32)
    parts = [load_weights(path, config, torch.float32, shard=TPShard.for_rank(config, 4, r))
             for r in range(4)]
    q, kv = config.q_size // 4, config.head_dim
    for r, p in enumerate(parts):
        head = r // 2
        k_rows = slice(config.q_size + head * kv, config.q_size + (head + 1) * kv)
        assert torch.equal(p.layers[0].qkv[q:q + kv], full.layers[0].qkv[k_rows])
        assert torch.equal(p.layers[0].qkv_bias[q:q + kv], full.layers[0].qkv_bias[k_rows])
        assert p.lm_head is p.embed  # tied: one tensor


def _record_whole_reads(monkeypatch) -> list[str]:
    """Names the loader reads with ``get_tensor`` (whole) from here on."""
    reads: list[str] = []
    real = safetensors.safe_open

    class Recording:
        def __init__(self, *a, **kw):
            self._fh = real(*a, **kw)

        def __enter__(self):
            self._fh.__enter__()
            return self

        def __exit__(self, *exc):
            return self._fh.__exit__(*exc)

        def get_tensor(self, name):
            reads.append(name)
            return self._fh.get_tensor(name)

        def __getattr__(self, attr):
            return getattr(self._fh, attr)

    monkeypatch.setattr(safetensors, "safe_open", Recording)
    return reads


def _hf(arch: str, vocab: int):
    from pdserve.engine.demo_tp_model import tp_demo_hf_config

    return tp_demo_hf_config(arch, vocab, {"bos_token_id": 0, "eos_token_id": 1,
                                           "pad_token_id": 2})


def test_a_tp_config_needs_its_group(tiny_checkpoints):
    from pdserve.engine.config import EngineConfig
    from pdserve.engine.loader import load_model

    with pytest.raises(ValueError, match="tensor_parallel_size"):
        EngineConfig(model="/m", tensor_parallel_size=0)
    with pytest.raises(ValueError, match="needs a joined group of 2 ranks, got none"):
        load_model(EngineConfig(model=str(tiny_checkpoints["llama"]), device="cpu",
                                tensor_parallel_size=2))
