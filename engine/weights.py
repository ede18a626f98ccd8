"""Loading a Llama-family checkpoint's tensors from a local Hugging Face directory.

Lifecycle: ``load_weights`` finds ``model.safetensors`` or the sharded form
(``model.safetensors.index.json`` + shards), reads every tensor the model needs,
converts it to the engine's dtype and device, and fuses the projections the engine
runs as one matmul (q/k/v, gate/up). Missing or corrupt files and missing tensors
raise errors that name the file or tensor, so a user can tell what is wrong.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from pdserve.engine.model_config import ModelConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass
class LayerWeights:
    """One decoder layer, with q/k/v and gate/up already fused."""

    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o_proj: torch.Tensor
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor


@dataclass
class ModelWeights:
    embed: torch.Tensor
    layers: list[LayerWeights]
    norm: torch.Tensor
    lm_head: torch.Tensor


def checkpoint_files(model_dir: str | os.PathLike) -> dict[str, Path]:
    """Map every tensor name to the safetensors file holding it."""
    root = Path(model_dir)
    index = root / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"broken safetensors index {index}: {exc}") from exc
        files = {name: root / fname for name, fname in weight_map.items()}
        for f in set(files.values()):
            if not f.is_file():
                raise FileNotFoundError(f"checkpoint shard listed in {index} is missing: {f}")
        return files
    single = root / SINGLE_FILE
    if single.is_file():
        from safetensors import safe_open

        with _open(single, safe_open) as fh:
            return {name: single for name in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    if any(root.glob("*.bin")) or any(root.glob("*.pt")):
        raise ValueError(
            f"{root} holds PyTorch pickle weights; pdserve loads safetensors only "
            "(convert with transformers: model.save_pretrained(dir, safe_serialization=True))"
        )
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in model directory {root}")


def _open(path: Path, safe_open):
    try:
        return safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors raises SafetensorError / OSError on bad headers
        raise ValueError(f"cannot read safetensors file {path}: {exc}") from exc


def _read_tensors(files: dict[str, Path], names: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    for path, wanted in by_file.items():
        with _open(path, safe_open) as fh:
            for name in wanted:
                try:
                    yield name, fh.get_tensor(name)
                except Exception as exc:
                    raise ValueError(f"cannot read tensor {name!r} from {path}: {exc}") from exc


def load_weights(
    model_dir: str | os.PathLike,
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> ModelWeights:
    """Read, convert and fuse the checkpoint's tensors for ``config``."""
    files = checkpoint_files(model_dir)
    p = "model.layers.{}."
    required = {"model.embed_tokens.weight", "model.norm.weight"}
    optional: set[str] = set()
    for i in range(config.num_layers):
        pre = p.format(i)
        required |= {
            pre + "input_layernorm.weight", pre + "post_attention_layernorm.weight",
            pre + "self_attn.q_proj.weight", pre + "self_attn.k_proj.weight",
            pre + "self_attn.v_proj.weight", pre + "self_attn.o_proj.weight",
            pre + "mlp.gate_proj.weight", pre + "mlp.up_proj.weight", pre + "mlp.down_proj.weight",
        }
        optional |= {pre + f"self_attn.{n}_proj.bias" for n in "qkvo"}
    if not config.tie_word_embeddings:
        # Some tied checkpoints still say tie=False but omit lm_head; fall back below.
        optional.add("lm_head.weight")
    missing = sorted(n for n in required if n not in files)
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"checkpoint in {model_dir} is missing {len(missing)} tensors: {shown}")
    wanted = required | {n for n in optional if n in files}
    t = {name: tensor.to(device=device, dtype=dtype) for name, tensor in _read_tensors(files, wanted)}
    _check_shapes(t, config, model_dir)

    layers = []
    for i in range(config.num_layers):
        pre = p.format(i)
        a = pre + "self_attn."
        biases = [t.get(a + f"{n}_proj.bias") for n in "qkv"]
        if any(b is not None for b in biases) and any(b is None for b in biases):
            raise ValueError(f"layer {i} of {model_dir} has a bias on only some of q/k/v")
        layers.append(LayerWeights(
            input_norm=t[pre + "input_layernorm.weight"],
            qkv=torch.cat([t[a + "q_proj.weight"], t[a + "k_proj.weight"], t[a + "v_proj.weight"]]),
            qkv_bias=torch.cat(biases) if biases[0] is not None else None,
            o_proj=t[a + "o_proj.weight"],
            o_bias=t.get(a + "o_proj.bias"),
            post_norm=t[pre + "post_attention_layernorm.weight"],
            gate_up=torch.cat([t[pre + "mlp.gate_proj.weight"], t[pre + "mlp.up_proj.weight"]]),
            down=t[pre + "mlp.down_proj.weight"],
        ))
    embed = t["model.embed_tokens.weight"]
    return ModelWeights(
        embed=embed, layers=layers, norm=t["model.norm.weight"],
        lm_head=t.get("lm_head.weight", embed),
    )


def _check_shapes(t: dict[str, torch.Tensor], c: ModelConfig, model_dir) -> None:
    expect = {
        "model.embed_tokens.weight": (c.vocab_size, c.hidden_size),
        "model.layers.0.self_attn.q_proj.weight": (c.q_size, c.hidden_size),
        "model.layers.0.self_attn.k_proj.weight": (c.kv_size, c.hidden_size),
        "model.layers.0.mlp.gate_proj.weight": (c.intermediate_size, c.hidden_size),
    }
    for name, shape in expect.items():
        if name in t and tuple(t[name].shape) != shape:
            raise ValueError(
                f"tensor {name} in {model_dir} has shape {tuple(t[name].shape)}, "
                f"config.json implies {shape}"
            )
