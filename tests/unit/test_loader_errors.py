"""Checkpoint loading: every broken checkpoint fails with an error naming the problem, and
the supported variants (sharded, half precision, tied embeddings) load and compute right."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from pdserve.engine.config import EngineConfig
from pdserve.engine.loader import build_runner, kv_cache_spec, load_model
from pdserve.engine.model_config import SUPPORTED_ARCHITECTURES, ModelConfig
from pdserve.engine.model_runner import ModelInput
from tests.conftest import save_tiny_checkpoint

BLOCK = 4
NUM_BLOCKS = 16


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _load(path: Path, **kw):
    return load_model(EngineConfig(model=str(path), device="cpu", block_size=BLOCK,
                                   num_kv_blocks=NUM_BLOCKS, **kw))


def _logits(path: Path, **kw) -> torch.Tensor:
    loaded = _load(path, **kw)
    runner = build_runner(loaded, kv_cache_spec(loaded, NUM_BLOCKS))
    rng = random.Random(5)
    prompt = [rng.randrange(loaded.model_config.vocab_size) for _ in range(13)]
    table = rng.sample(range(NUM_BLOCKS), 4)
    return runner.run([ModelInput(prompt, 0, table)], all_logits=True)


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (path / "config.json").write_text(json.dumps(cfg))


def _assert_names_supported(msg: str) -> None:
    for arch in SUPPORTED_ARCHITECTURES:
        assert arch in msg


# -- unsupported architectures -----------------------------------------------------------

@pytest.mark.parametrize("make_config", [
    lambda: transformers.GemmaConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=50, pad_token_id=0),
    lambda: transformers.Phi3Config(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                    intermediate_size=64, vocab_size=50, pad_token_id=0),
], ids=["gemma", "phi3"])
def test_llama_like_unsupported_architecture_is_named(make_config, tmp_path):
    cfg = make_config()
    cfg.architectures = [type(cfg).__name__.replace("Config", "ForCausalLM")]
    cfg.save_pretrained(tmp_path)
    arch = cfg.architectures[0]
    with pytest.raises(ValueError, match=arch) as info:
        ModelConfig.from_pretrained(tmp_path)
    _assert_names_supported(str(info.value))
    with pytest.raises(ValueError, match=arch):
        load_model(EngineConfig(model=str(tmp_path), device="cpu"))


@pytest.mark.parametrize("make_config", [
    lambda: transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50),
    lambda: transformers.GPTNeoXConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                       intermediate_size=64, vocab_size=50),
], ids=["gpt2", "gpt_neox"])
def test_non_llama_architecture_is_named(make_config, tmp_path):
    cfg = make_config()
    cfg.bos_token_id = cfg.eos_token_id = None  # GPT-2's 50256 is outside the tiny vocab
    cfg.architectures = [{"gpt2": "GPT2LMHeadModel",
                          "gpt_neox": "GPTNeoXForCausalLM"}[cfg.model_type]]
    cfg.save_pretrained(tmp_path)
    # Not an AttributeError on a Llama-only field: the architecture is checked first.
    with pytest.raises(ValueError, match=cfg.architectures[0]) as info:
        ModelConfig.from_pretrained(tmp_path)
    _assert_names_supported(str(info.value))
    with pytest.raises(ValueError, match=cfg.architectures[0]):
        load_model(EngineConfig(model=str(tmp_path), device="cpu"))


# -- missing / broken files ----------------------------------------------------------------

def test_missing_directory(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        ModelConfig.from_pretrained(missing)
    with pytest.raises(FileNotFoundError, match="nope"):
        load_model(EngineConfig(model=str(missing), device="cpu"))


def test_directory_without_config(tiny_checkpoints, tmp_path):
    d = _copy(tiny_checkpoints["llama"], tmp_path / "m")
    (d / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        _load(d)


def test_unparsable_config(tiny_checkpoints, tmp_path):
    d = _copy(tiny_checkpoints["llama"], tmp_path / "m")
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=str(d)):
        _load(d)


def test_config_without_weights(tiny_checkpoints, tmp_path):
    d = _copy(tiny_checkpoints["llama"], tmp_path / "m")
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        _load(d)


@pytest.mark.parametrize("keep", [0, 7, 100, "half"])
def test_truncated_safetensors(keep, tiny_checkpoints, tmp_path):
    d = _copy(tiny_checkpoints["llama"], tmp_path / "m")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2 if keep == "half" else keep])
    with pytest.raises(ValueError, match="model.safetensors"):
        _load(d)


def test_garbage_safetensors(tiny_checkpoints, tmp_path):
    d = _copy(tiny_checkpoints["llama"], tmp_path / "m")
    (d / "model.safetensors").write_bytes(b"\xff" * 4096)
    with pytest.raises(ValueError, match="model.safetensors"):
        _load(d)


def test_only_pytorch_bin(tiny_checkpoints, tmp_path):
    d = _copy(tiny_checkpoints["llama"], tmp_path / "m")
    (d / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2)}, d / "pytorch_model.bin")
    with pytest.raises(ValueError, match="safetensors") as info:
        _load(d)
    assert str(d) in str(info.value)


@pytest.fixture(scope="module")
def sharded_llama(tiny_checkpoints, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sharded") / "llama"
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tiny_checkpoints["llama"], dtype=torch.float32, local_files_only=True)
    model.save_pretrained(out, max_shard_size="20KB")
    return out


def test_sharded_fixture_is_really_sharded(sharded_llama):
    assert (sharded_llama / "model.safetensors.index.json").is_file()
    assert not (sharded_llama / "model.safetensors").exists()
    assert len(list(sharded_llama.glob("model-*-of-*.safetensors"))) > 2


def test_sharded_checkpoint_matches_single_file(sharded_llama, tiny_checkpoints):
    want = _logits(tiny_checkpoints["llama"])
    got = _logits(sharded_llama)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_sharded_index_names_missing_shard(sharded_llama, tmp_path):
    d = _copy(sharded_llama, tmp_path / "m")
    weight_map = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    victim = weight_map["model.layers.1.mlp.down_proj.weight"]
    (d / victim).unlink()
    with pytest.raises(FileNotFoundError, match=victim):
        _load(d)


def test_sharded_index_broken_json(sharded_llama, tmp_path):
    d = _copy(sharded_llama, tmp_path / "m")
    (d / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match="model.safetensors.index.json"):
        _load(d)


def test_sharded_truncated_shard(sharded_llama, tmp_path):
    d = _copy(sharded_llama, tmp_path / "m")
    weight_map = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    victim = weight_map["model.norm.weight"]
    data = (d / victim).read_bytes()
    (d / victim).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=victim):
        _load(d)


def test_sharded_index_missing_tensor(sharded_llama, tmp_path):
    d = _copy(sharded_llama, tmp_path / "m")
    index_path = d / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["model.layers.0.self_attn.k_proj.weight"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight"):
        _load(d)


def _rewrite_without(path: Path, drop: str) -> None:
    f = path / "model.safetensors"
    with safe_open(str(f), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys() if k != drop}  # noqa: SIM118
    assert len(tensors) > 0
    save_file(tensors, str(f), metadata={"format": "pt"})


@pytest.mark.parametrize("drop", ["model.layers.1.mlp.down_proj.weight", "model.norm.weight",
                                  "model.embed_tokens.weight"])
def test_checkpoint_missing_one_tensor(drop, tiny_checkpoints, tmp_path):
    d = _copy(tiny_checkpoints["llama"], tmp_path / "m")
    _rewrite_without(d, drop)
    with pytest.raises(ValueError, match=drop.replace(".", r"\.")) as info:
        _load(d)
    assert "missing" in str(info.value)


def test_tensor_shape_disagreeing_with_config(tiny_checkpoints, tmp_path):
    d = _copy(tiny_checkpoints["llama"], tmp_path / "m")
    _edit_config(d, intermediate_size=96)
    with pytest.raises(ValueError, match="gate_proj"):
        _load(d)


def test_untied_checkpoint_without_lm_head_falls_back_to_embedding(tiny_checkpoints, tmp_path):
    d = _copy(tiny_checkpoints["llama"], tmp_path / "m")
    _rewrite_without(d, "lm_head.weight")
    loaded = _load(d)
    assert loaded.model.w.lm_head is loaded.model.w.embed


# -- dtypes --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_checkpoint(dtype, tmp_path):
    name = str(dtype).removeprefix("torch.")
    path = save_tiny_checkpoint("llama", tmp_path / name, seed=1, dtype=dtype)
    assert ModelConfig.from_pretrained(path).torch_dtype == name

    auto = _load(path)  # "auto" on CPU computes in float32 whatever the checkpoint holds
    assert auto.dtype == torch.float32
    assert auto.model.w.embed.dtype == torch.float32

    half = _load(path, dtype=name)
    assert half.dtype == dtype
    assert half.model.w.embed.dtype == dtype
    assert half.model.w.layers[0].qkv.dtype == dtype

    ref = _logits(path)
    got = _logits(path, dtype=name)
    assert got.dtype == torch.float32  # logits always come back in float32
    assert torch.isfinite(got).all()
    diff = (got - ref).abs().max().item()
    assert diff < 0.05
    assert diff > 0  # really computed in reduced precision
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_float32_checkpoint_reports_float32(tiny_checkpoints):
    assert ModelConfig.from_pretrained(tiny_checkpoints["llama"]).torch_dtype == "float32"


# -- rope / tied embeddings ------------------------------------------------------------------

@pytest.mark.parametrize("style", ["rope_parameters", "rope_scaling"])
@pytest.mark.parametrize("rope_type", ["yarn", "dynamic"])
def test_unsupported_rope_scaling(style, rope_type, tiny_checkpoints, tmp_path):
    d = _copy(tiny_checkpoints["llama"], tmp_path / "m")
    params = {"factor": 4.0, "original_max_position_embeddings": 128}
    if style == "rope_parameters":
        _edit_config(d, rope_parameters={**params, "rope_type": rope_type, "rope_theta": 1e4})
    else:
        _edit_config(d, rope_parameters=None, rope_theta=1e4,
                     rope_scaling={**params, "type": rope_type})
    with pytest.raises(ValueError, match=rope_type) as info:
        _load(d)
    assert "rope" in str(info.value)


def test_llama3_rope_is_read(tiny_checkpoints):
    rope = ModelConfig.from_pretrained(tiny_checkpoints["llama"]).rope
    assert (rope.rope_type, rope.factor, rope.theta) == ("llama3", 8.0, 500000.0)
    assert rope.original_max_position_embeddings == 64


def test_tied_embeddings_share_the_embedding(tiny_checkpoints):
    path = tiny_checkpoints["qwen2"]
    with safe_open(str(path / "model.safetensors"), framework="pt") as fh:
        assert "lm_head.weight" not in set(fh.keys())
    loaded = _load(path)
    assert loaded.model_config.tie_word_embeddings
    assert loaded.model.w.lm_head is loaded.model.w.embed


def test_untied_embeddings_are_separate(tiny_checkpoints):
    loaded = _load(tiny_checkpoints["llama"])
    assert not loaded.model_config.tie_word_embeddings
    w = loaded.model.w
    assert w.lm_head is not w.embed
    assert not torch.equal(w.lm_head, w.embed)


# -- EngineConfig validation ---------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    ({"dtype": "float64"}, "dtype"),
    ({"dtype": "fp16"}, "dtype"),
    ({"device": "tpu"}, "device"),
    ({"device": "gpu"}, "device"),
    ({"block_size": 0}, "block_size"),
    ({"block_size": 257}, "block_size"),
    ({"num_kv_blocks": 0}, "num_kv_blocks"),
    ({"max_num_seqs": 0}, "max_num_seqs"),
    ({"max_num_batched_tokens": 0}, "max_num_batched_tokens"),
    ({"gpu_memory_utilization": 0.0}, "gpu_memory_utilization"),
    ({"max_model_len": 1}, "max_model_len"),
    ({"enable_chunked_prefill": False, "max_model_len": 512, "max_num_batched_tokens": 256},
     "chunked prefill"),
])
def test_engine_config_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EngineConfig(model="/some/model", **kwargs)


def test_engine_config_rejects_empty_model():
    with pytest.raises(ValueError, match="model"):
        EngineConfig(model="")


def test_engine_config_accepts_valid_values():
    cfg = EngineConfig(model="/m", dtype="bfloat16", device="cuda:1", block_size=256)
    assert cfg.resolve_dtype("float32", torch.device("cpu")) == torch.bfloat16
    auto = EngineConfig(model="/m")
    assert auto.resolve_dtype("bfloat16", torch.device("cpu")) == torch.float32


def test_max_model_len_above_model_limit(tiny_checkpoints):
    path = tiny_checkpoints["llama"]  # max_position_embeddings = 512
    with pytest.raises(ValueError, match="max_position_embeddings"):
        _load(path, max_model_len=513)
    assert _load(path, max_model_len=512).max_model_len == 512
