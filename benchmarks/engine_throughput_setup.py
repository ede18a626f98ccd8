"""What benchmarks/engine_throughput.py runs: the checkpoint (a random-weight Llama of a
given ``Shape``, created once and cached) and the cases (batches of token-id prompts).

``make_checkpoint`` writes the checkpoint atomically (a temp dir renamed into place), so
two runs racing on one ``--workdir`` both end up with a complete checkpoint. Prompts are
seeded per case and never contain the pad id 0 nor the first few (special) ids.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import tempfile
from pathlib import Path

import torch

from pdserve.cluster.cli.progress import note


def log(msg: str) -> None:
    note(f"[engine_throughput] {msg}")


# -- checkpoint ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Shape:
    hidden: int = 512
    layers: int = 8
    heads: int = 8
    kv_heads: int = 4
    intermediate: int = 1408
    vocab: int = 8192
    max_pos: int = 2048
    seed: int = 0

    @property
    def dirname(self) -> str:
        return (f"llama-h{self.hidden}-l{self.layers}-a{self.heads}-kv{self.kv_heads}"
                f"-i{self.intermediate}-v{self.vocab}-p{self.max_pos}-s{self.seed}")


QUICK_SHAPE = Shape(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=352, vocab=1024,
                    max_pos=512)


def make_checkpoint(workdir: Path, shape: Shape) -> Path:
    """Create (once) a random float32 Llama checkpoint; return its directory."""
    target = workdir / shape.dirname
    if (target / "config.json").is_file():
        log(f"using cached checkpoint {target}")
        return target
    from transformers import LlamaConfig, LlamaForCausalLM

    log(f"creating random checkpoint {target}")
    workdir.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, max_position_embeddings=shape.max_pos,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    torch.manual_seed(shape.seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=workdir))
    try:
        model.save_pretrained(tmp)
        try:
            os.replace(tmp, target)  # atomic; loses the race gracefully
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return target


def read_model_info(path: Path) -> dict:
    cfg = json.loads((path / "config.json").read_text())
    keys = ("architectures", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "intermediate_size", "vocab_size", "max_position_embeddings",
            "tie_word_embeddings", "torch_dtype", "dtype")
    return {k: cfg[k] for k in keys if k in cfg}


# -- cases -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    prompt_lens: tuple[int, ...]
    new_tokens: int

    @property
    def batch(self) -> int:
        return len(self.prompt_lens)

    @property
    def generated(self) -> int:
        return self.batch * self.new_tokens


def make_cases(quick: bool, seed: int, batch: int = 16, batch_new_tokens: int = 64,
               min_len: int = 16, max_len: int = 256) -> list[Case]:
    rng = random.Random(seed)
    if quick:
        b1 = Case("batch1", (32,), 16)
        lens = tuple(rng.randint(8, 48) for _ in range(4))
        return [b1, Case("batch4_mixed", lens, 8)]
    b1 = Case("batch1", (128,), 128)
    # Uniformly spread min_len..max_len, shuffled with the fixed seed (arrival order mixed).
    step = (max_len - min_len) / max(batch - 1, 1)
    lens = [round(min_len + i * step) for i in range(batch)]
    rng.shuffle(lens)
    return [b1, Case(f"batch{batch}_mixed", tuple(lens), batch_new_tokens)]


def make_prompts(case: Case, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    # Avoid id 0 (the pad id) and the first few ids (often special tokens).
    lo = min(4, vocab - 1)
    return [torch.randint(lo, vocab, (n,), generator=g).tolist() for n in case.prompt_lens]
