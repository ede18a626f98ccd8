"""Tiny random-weight checkpoints with enough KV heads to split four ways, built offline.

The demo model (``demo_model.py``) has 2 KV heads, so tensor parallelism beyond 2 ranks
would only replicate them. These checkpoints have 4 KV heads (8 query heads) in the
three shapes the engine supports, each with its family's quirk: Llama with llama3 RoPE
scaling, Qwen2 with QKV bias and tied embeddings, Mistral with a sliding window and an
explicit ``head_dim``. Norm weights and biases are perturbed away from their 1/0 init so
those code paths matter. They are saved sharded (several safetensors files and an index),
as real checkpoints of the size TP is for are. The demo tokenizer comes with them, so
they serve text as well as token ids.

``create_tp_demo_model(arch, path)`` builds one (atomically, as ``create_demo_model``
does; an existing one is returned untouched); the same ``seed`` gives the same weights.
"""

from __future__ import annotations

import os
from pathlib import Path

from pdserve.engine.demo_model import (
    create_checkpoint,
    default_cache_dir,
    save_tokenizer,
    special_token_ids,
)

TP_DEMO_VERSION = "v1"
TP_DEMO_ARCHS = ("llama", "qwen2", "mistral")
TP_DEMO_KV_HEADS = 4
# Small enough that the three checkpoints build in about a second each; each is split in
# a few safetensors files to exercise the sharded-checkpoint path.
_MAX_SHARD_SIZE = "400KB"


def tp_demo_model_path(arch: str) -> Path:
    return default_cache_dir() / f"demo-{arch}-tp-{TP_DEMO_VERSION}"


def tp_demo_hf_config(arch: str, vocab_size: int, special_ids: dict[str, int]):
    """The ``transformers`` config of the ``arch`` TP demo checkpoint."""
    import transformers

    common = dict(vocab_size=vocab_size, hidden_size=128, intermediate_size=176,
                  num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=TP_DEMO_KV_HEADS, max_position_embeddings=1024,
                  rms_norm_eps=1e-5, **special_ids)
    if arch == "llama":
        return transformers.LlamaConfig(**common, tie_word_embeddings=False, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
            "rope_theta": 500000.0})
    if arch == "qwen2":
        return transformers.Qwen2Config(**common, tie_word_embeddings=True)
    if arch == "mistral":
        return transformers.MistralConfig(**common, head_dim=24, sliding_window=7,
                                          tie_word_embeddings=False)
    raise ValueError(f"arch must be one of {', '.join(TP_DEMO_ARCHS)}, got {arch!r}")


def _build(out_dir: Path, arch: str, seed: int) -> None:
    import torch
    import transformers

    tokenizer = save_tokenizer(out_dir)
    special_ids = special_token_ids(tokenizer)
    config = tp_demo_hf_config(arch, len(tokenizer), special_ids)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out_dir, max_shard_size=_MAX_SHARD_SIZE)
    transformers.GenerationConfig(**special_ids).save_pretrained(out_dir)
    (out_dir / "README.md").write_text(
        f"# pdserve tensor-parallel demo {arch} ({TP_DEMO_VERSION})\n\nRANDOM weights (seed "
        f"{seed}), {TP_DEMO_KV_HEADS} KV heads, for tests of tensor parallelism. Created by "
        "`pdserve.engine.demo_tp_model.create_tp_demo_model`.\n", encoding="utf-8")


def create_tp_demo_model(arch: str, path: str | os.PathLike | None = None, *, seed: int = 0,
                         overwrite: bool = False) -> Path:
    """Create the ``arch`` TP demo checkpoint at ``path`` (default ``tp_demo_model_path``)."""
    if arch not in TP_DEMO_ARCHS:
        raise ValueError(f"arch must be one of {', '.join(TP_DEMO_ARCHS)}, got {arch!r}")
    target = Path(path).expanduser() if path is not None else tp_demo_model_path(arch)
    return create_checkpoint(target, lambda out: _build(out, arch, seed), overwrite)
