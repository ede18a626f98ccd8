"""GPU-test fixtures: a tiny random bf16 Llama that FlashInfer can run (head_dim 64), and
the FlashInfer prefill kernel family the tests use (``--flashinfer-prefill-backend``:
auto, fa2 or fa3; ``benchmarks/gpu/run.sh`` passes fa2, whose modules it carries)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def save_gpu_checkpoint(path: Path, seed: int = 0) -> Path:
    """2 layers, 4 query / 2 KV heads of 64, llama3 RoPE scaling, bf16, no EOS id."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
        pad_token_id=None, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 256,
            "rope_theta": 500000.0})
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def prefill_backend(request) -> str:
    return request.config.getoption("--flashinfer-prefill-backend")


@pytest.fixture(scope="session")
def gpu_checkpoint(tmp_path_factory) -> Path:
    return save_gpu_checkpoint(tmp_path_factory.mktemp("gpu-ckpt") / "tiny-llama-bf16")


WINDOW = 32


def save_gpu_window_checkpoint(path: Path, seed: int = 0) -> Path:
    """A Qwen2 of the same size whose first layer attends within a sliding window of
    ``WINDOW`` tokens and whose second attends to everything: two attention wrappers (and
    graph wrappers) per step."""
    import transformers

    config = transformers.Qwen2Config(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
        pad_token_id=None, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
        layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def gpu_window_checkpoint(tmp_path_factory) -> Path:
    return save_gpu_window_checkpoint(tmp_path_factory.mktemp("gpu-ckpt") / "tiny-qwen2-window")
