"""Tests for pdserve.engine.demo_model: files, loadability, determinism, atomic creation."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pdserve.engine import demo_model
from pdserve.engine.demo_model import (
    DEMO_MODEL_VERSION,
    create_demo_model,
    default_cache_dir,
    demo_model_path,
)

EXPECTED_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "README.md",
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_demo_model(tmp_path_factory.mktemp("demo") / "model", seed=0)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_files_exist(model_dir: Path) -> None:
    for name in EXPECTED_FILES:
        assert (model_dir / name).is_file(), name
    assert "random weights" in (model_dir / "README.md").read_text().lower()
    # No temporary build directories are left next to the checkpoint.
    assert sorted(p.name for p in model_dir.parent.iterdir()) == ["model"]


def test_config_and_forward(model_dir: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    assert config.architectures == ["LlamaForCausalLM"]
    assert config.model_type == "llama"
    assert (config.hidden_size, config.intermediate_size) == (256, 688)
    assert (config.num_hidden_layers, config.num_attention_heads) == (4, 8)
    assert config.num_key_value_heads == 2
    assert config.tie_word_embeddings is False

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    assert config.vocab_size == len(tok)
    assert 900 <= len(tok) <= 1024
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    gen = json.loads((model_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.eos_token_id

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    ids = torch.tensor([tok.encode("The weather is warm today.")])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok))
    assert torch.isfinite(logits).all()
    # HF default init (std 0.02) rather than something degenerate.
    std = model.model.embed_tokens.weight.std().item()
    assert 0.015 < std < 0.025


def test_same_seed_is_deterministic_and_seeds_differ(model_dir: Path, tmp_path: Path) -> None:
    same = create_demo_model(tmp_path / "same", seed=0)
    other = create_demo_model(tmp_path / "other", seed=1)
    a, b, c = _tensors(model_dir), _tensors(same), _tensors(other)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert (model_dir / "tokenizer.json").read_bytes() == (same / "tokenizer.json").read_bytes()


def test_existing_checkpoint_is_left_alone(model_dir: Path) -> None:
    weights = model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert create_demo_model(model_dir, seed=123) == model_dir
    assert weights.stat().st_mtime_ns == before


def test_overwrite_and_dtype(tmp_path: Path) -> None:
    target = tmp_path / "m"
    create_demo_model(target, seed=0)
    old = _tensors(target)
    create_demo_model(target, seed=1, overwrite=True, dtype="bfloat16")
    new = _tensors(target)
    assert all(t.dtype == torch.bfloat16 for t in new.values())
    key = "model.embed_tokens.weight"
    assert not torch.equal(old[key].to(torch.bfloat16), new[key])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_invalid_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dtype"):
        create_demo_model(tmp_path / "x", dtype="int8")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="occupied"):
        create_demo_model(occupied)
    assert (occupied / "notes.txt").read_text() == "keep me"


def test_concurrent_creator_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If another process finishes first, its checkpoint is kept and our temp dir removed."""
    target = tmp_path / "race"

    def fake_build(out_dir: Path, seed: int, dtype: str) -> None:
        (out_dir / "config.json").write_text(json.dumps({"builder": "loser"}))
        # The "other process" completes its rename while we are still building.
        target.mkdir()
        (target / "config.json").write_text(json.dumps({"builder": "winner"}))

    monkeypatch.setattr(demo_model, "_build_checkpoint", fake_build)
    assert create_demo_model(target) == target
    assert json.loads((target / "config.json").read_text()) == {"builder": "winner"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["race"]


def test_empty_target_directory_is_filled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_build(out_dir: Path, seed: int, dtype: str) -> None:
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(demo_model, "_build_checkpoint", fake_build)
    target = tmp_path / "empty"
    target.mkdir()
    assert create_demo_model(target) == target
    assert (target / "config.json").is_file()


def test_default_paths(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PDSERVE_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path
    assert demo_model_path() == tmp_path / f"demo-llama-{DEMO_MODEL_VERSION}"
    monkeypatch.delenv("PDSERVE_CACHE_DIR")
    assert default_cache_dir() == Path(os.path.expanduser("~")) / ".cache" / "pdserve"
