"""Loading a Llama-family checkpoint's tensors from a local Hugging Face directory.

Lifecycle: ``load_weights`` finds ``model.safetensors`` or the sharded form
(``model.safetensors.index.json`` + shards), reads every tensor the model needs,
converts it to the engine's dtype and device, and fuses the projections the engine
runs as one matmul (q/k/v, gate/up). Missing or corrupt files and missing tensors
raise errors that name the file or tensor, so a user can tell what is wrong.

Given a ``TPShard`` of more than one rank, each tensor is read sliced
(``safe_open(...).get_slice(name)[rows]``): only that rank's rows or columns come off the
disk, so a rank's weight memory is about 1/tp of the model's plus the replicated norms
(``engine/parallel/shard.py`` says which share a rank holds). Every tensor's full shape is
checked against ``config.json`` from the file's header before anything is read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from pdserve.engine.model_config import ModelConfig
from pdserve.engine.parallel.shard import TPShard

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

    def tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor once (a tied LM head is the embedding)."""
        yield self.embed
        yield self.norm
        if self.lm_head is not self.embed:
            yield self.lm_head
        for lw in self.layers:
            yield from (t for t in (lw.input_norm, lw.qkv, lw.qkv_bias, lw.o_proj, lw.o_bias,
                                    lw.post_norm, lw.gate_up, lw.down) if t is not None)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())


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


def load_weights(
    model_dir: str | os.PathLike,
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    shard: TPShard | None = None,
) -> ModelWeights:
    """Read, convert and fuse the checkpoint's tensors for ``config``; with a ``shard`` of
    several ranks, only that rank's share of each, read sliced."""
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
    _check_shapes(files, wanted, _full_shapes(config), model_dir)
    cuts = _shard_cuts(config, shard) if shard is not None and shard.is_sharded else {}
    own = bool(cuts) and torch.device(device).type == "cpu"
    t = {name: tensor.to(device=device, dtype=dtype)
         for name, tensor in _read_tensors(files, wanted, cuts, own)}

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


@dataclass(frozen=True)
class _Slice:
    """Read indices ``[start, stop)`` of dimension ``dim``, zero-padded to ``size`` along it
    (the last ranks' vocabulary shares)."""

    dim: int
    start: int
    stop: int
    size: int


def _read_tensors(files: dict[str, Path], names: set[str], cuts: dict[str, _Slice],
                  own: bool) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    # safetensors may hand out views of its memory map. At tp=1 that is free (the whole
    # file is wanted); a rank must own copies instead, or one view would keep the file
    # mapped and every page touched reading a column slice (all of the tensor's rows)
    # resident in this process: a rank's RSS would not shrink with tp. (On a GPU the move
    # to the device is the copy.)
    for path, wanted in _by_file(files, names).items():
        with _open(path, safe_open) as fh:
            for name in wanted:
                cut = cuts.get(name)
                try:
                    if cut is None:
                        tensor = fh.get_tensor(name)
                    else:
                        index = (slice(None),) * cut.dim + (slice(cut.start, cut.stop),)
                        tensor = _pad(fh.get_slice(name)[index], cut)
                except Exception as exc:
                    raise ValueError(f"cannot read tensor {name!r} from {path}: {exc}") from exc
                yield name, tensor.clone() if own else tensor


def _pad(part: torch.Tensor, cut: _Slice) -> torch.Tensor:
    if part.shape[cut.dim] == cut.size:
        return part
    shape = list(part.shape)
    shape[cut.dim] = cut.size
    out = part.new_zeros(shape)
    out.narrow(cut.dim, 0, part.shape[cut.dim]).copy_(part)
    return out


def _by_file(files: dict[str, Path], names: set[str]) -> dict[Path, list[str]]:
    by_file: dict[Path, list[str]] = {}
    for name in sorted(names):
        by_file.setdefault(files[name], []).append(name)
    return by_file


def _check_shapes(files: dict[str, Path], names: set[str], expect: dict[str, tuple[int, ...]],
                  model_dir) -> None:
    """Every tensor's full shape, from the file headers, against ``config.json``."""
    from safetensors import safe_open

    wrong = []
    for path, wanted in _by_file(files, names).items():
        with _open(path, safe_open) as fh:
            for name in wanted:
                try:
                    shape = tuple(fh.get_slice(name).get_shape())
                except Exception as exc:
                    raise ValueError(f"cannot read tensor {name!r} from {path}: {exc}") from exc
                if name in expect and shape != expect[name]:
                    wrong.append(f"tensor {name} has shape {shape}, config.json implies "
                                 f"{expect[name]}")
    if wrong:
        raise ValueError(f"checkpoint in {model_dir} disagrees with its config.json: "
                         + "; ".join(sorted(wrong)[:5]) + (" ..." if len(wrong) > 5 else ""))


def _full_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    h, q, kv, m = c.hidden_size, c.q_size, c.kv_size, c.intermediate_size
    shapes = {"model.embed_tokens.weight": (c.vocab_size, h), "lm_head.weight": (c.vocab_size, h),
              "model.norm.weight": (h,)}
    for i in range(c.num_layers):
        a, p = f"model.layers.{i}.self_attn.", f"model.layers.{i}."
        shapes |= {
            a + "q_proj.weight": (q, h), a + "k_proj.weight": (kv, h), a + "v_proj.weight": (kv, h),
            a + "o_proj.weight": (h, q), a + "q_proj.bias": (q,), a + "k_proj.bias": (kv,),
            a + "v_proj.bias": (kv,), a + "o_proj.bias": (h,),
            p + "mlp.gate_proj.weight": (m, h), p + "mlp.up_proj.weight": (m, h),
            p + "mlp.down_proj.weight": (h, m), p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    return shapes


def _shard_cuts(c: ModelConfig, shard: TPShard) -> dict[str, _Slice]:
    """What rank ``shard.rank`` reads of each tensor; tensors not named are read whole
    (norms, the o_proj bias: added once after the all-reduce)."""
    d = c.head_dim
    q = _Slice(0, shard.q_heads.start * d, shard.q_heads.stop * d, len(shard.q_heads) * d)
    kv = _Slice(0, shard.kv_heads.start * d, shard.kv_heads.stop * d, len(shard.kv_heads) * d)
    mlp = _Slice(0, shard.intermediate.start, shard.intermediate.stop, len(shard.intermediate))
    v0 = shard.vocab_start
    vocab = _Slice(0, v0, v0 + shard.vocab_rows, shard.vocab_per_rank)
    cuts = {"model.embed_tokens.weight": vocab, "lm_head.weight": vocab}
    for i in range(c.num_layers):
        a, p = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
        cuts |= {
            a + "q_proj.weight": q, a + "q_proj.bias": q, a + "k_proj.weight": kv,
            a + "k_proj.bias": kv, a + "v_proj.weight": kv, a + "v_proj.bias": kv,
            a + "o_proj.weight": _Slice(1, q.start, q.stop, q.size),
            p + "gate_proj.weight": mlp, p + "up_proj.weight": mlp,
            p + "down_proj.weight": _Slice(1, mlp.start, mlp.stop, mlp.size),
        }
    return cuts
