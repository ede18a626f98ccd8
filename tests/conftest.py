"""Shared fixtures: tiny random checkpoints of each supported architecture, saved to disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ARCHS = ("llama", "qwen2", "mistral")
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"



def pytest_addoption(parser) -> None:
    # Here, not in tests/gpu/conftest.py: options must come from a conftest pytest loads
    # at start-up whatever paths it is given.
    parser.addoption("--flashinfer-prefill-backend", default="auto",
                     choices=("auto", "fa2", "fa3"),
                     help="EngineConfig.flashinfer_prefill_backend for the GPU tests "
                          "(benchmarks/gpu/run.sh passes fa2)")

def tiny_hf_config(arch: str):
    """Small configs that still exercise each family's quirks: llama3 RoPE scaling (llama),
    QKV bias (qwen2), sliding window + explicit head_dim (mistral), GQA everywhere."""
    import transformers

    common = dict(vocab_size=211, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if arch == "llama":
        return transformers.LlamaConfig(**common, tie_word_embeddings=False, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64, "rope_theta": 500000.0})
    if arch == "qwen2":
        return transformers.Qwen2Config(**common, tie_word_embeddings=True)
    if arch == "mistral":
        return transformers.MistralConfig(**common, head_dim=24, sliding_window=7,
                                          tie_word_embeddings=False)
    raise ValueError(arch)


def save_tiny_checkpoint(arch: str, path: Path, seed: int = 0, dtype=torch.float32,
                         **config_changes) -> Path:
    """``config_changes``: attributes set on the HF config (e.g. ``attention_bias=True``)."""
    import transformers

    torch.manual_seed(seed)
    config = tiny_hf_config(arch)
    for key, value in config_changes.items():
        setattr(config, key, value)
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", dtype=dtype)
    # Random init leaves norms at 1 and biases at 0; perturb them so those code paths matter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {arch: save_tiny_checkpoint(arch, root / arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory) -> Path:
    from pdserve.engine.demo_model import create_demo_model

    return create_demo_model(tmp_path_factory.mktemp("demo") / "demo-llama")
