"""The scenario every rank of a tensor-parallel test runs (CPU/gloo and GPU/NCCL tests).

On each checkpoint: a's prompt prefilled alone (logits at every position), then a and b
prefilled in one batch and ten steps of a mixed batch: both decode while c is prefilled in
two chunks alongside and then decodes too, every sequence's KV scattered over
non-contiguous blocks. Rank 0 samples greedily and shares the tokens (as it will share each
step's inputs when serving). Returned: rank 0's logits of every step, the tokens, the
rank's KV head range and the K/V of a's blocks in layer 0.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pdserve.engine.config import EngineConfig
from pdserve.engine.loader import build_runner, kv_cache_spec, load_model
from pdserve.engine.model_runner import ModelInput
from pdserve.engine.parallel.group import TPGroup

BLOCK = 4
NUM_BLOCKS = 64
DECODE_STEPS = 10


def scenario(group: TPGroup | None, paths: list[str], device: str = "cpu",
             **engine: Any) -> dict[str, dict]:
    """What one rank sees of the scenario on each checkpoint (logits only on rank 0).
    ``device``: tp 1's (a rank uses its group's); ``engine``: more ``EngineConfig`` fields."""
    torch.set_num_threads(1)  # several ranks share two cores
    device = group.config.device if group is not None else device
    return {p: _one_checkpoint(group, p, device, engine) for p in paths}


def _one_checkpoint(group: TPGroup | None, path: str, device: str, engine: dict) -> dict:
    tp = 1 if group is None else group.size
    loaded = load_model(EngineConfig(model=path, device=device, block_size=BLOCK,
                                     num_kv_blocks=NUM_BLOCKS, tensor_parallel_size=tp,
                                     **engine),
                        load_tokenizer=False, group=group)
    runner = build_runner(loaded, kv_cache_spec(loaded, NUM_BLOCKS))
    rng = random.Random(Path(path).name)
    vocab = loaded.model_config.vocab_size
    seqs = {name: [rng.randrange(vocab) for _ in range(n)] for name, n in
            (("a", 19), ("b", 6), ("c", 11))}
    blocks = rng.sample(range(NUM_BLOCKS), 40)
    tables = {"a": blocks[:10], "b": blocks[10:18], "c": blocks[18:30]}
    prompt_len = {k: len(v) for k, v in seqs.items()}
    # First a's prompt alone (into blocks of its own), logits at every position.
    logits = runner.run([ModelInput(seqs["a"], 0, blocks[30:])], all_logits=True)
    steps: list[np.ndarray] = [] if logits is None else [logits.cpu().numpy()]

    def step(inputs, names):
        logits = runner.run(inputs)
        if logits is not None:
            steps.append(logits.cpu().numpy())
        new = _share(group, None if logits is None else logits.argmax(-1), len(names))
        for name, tok in zip(names, new, strict=True):
            seqs[name].append(tok)

    def decode(name):
        return ModelInput([seqs[name][-1]], len(seqs[name]) - 1, tables[name])

    step([ModelInput(seqs["a"], 0, tables["a"]), ModelInput(seqs["b"], 0, tables["b"])],
         ["a", "b"])
    for i in range(DECODE_STEPS):
        batch, names = [decode("a"), decode("b")], ["a", "b"]
        if i == 0:
            batch.append(ModelInput(seqs["c"][:6], 0, tables["c"], sample=False))
        elif i == 1:
            batch.append(ModelInput(seqs["c"][6:], 6, tables["c"]))
            names.append("c")
        else:
            batch.append(decode("c"))
            names.append("c")
        step(batch, names)
    k_cache, v_cache = runner.kv_cache.layer(0)
    a_blocks = torch.tensor(tables["a"], device=k_cache.device)
    return {
        "steps": steps,
        "generated": {k: v[prompt_len[k]:] for k, v in seqs.items()},
        "prompts": {k: v[:prompt_len[k]] for k, v in seqs.items()},
        "kv_heads": (loaded.kv_head_range.start, loaded.kv_head_range.stop),
        "cache_heads": runner.kv_cache.spec.num_kv_heads,
        "kv_a": np.stack([k_cache[a_blocks].float().cpu().numpy(),
                          v_cache[a_blocks].float().cpu().numpy()]),
        "got_logits": bool(steps),
    }


def _share(group: TPGroup | None, tokens: torch.Tensor | None, n: int) -> list[int]:
    """Rank 0's sampled tokens, on every rank."""
    if group is None:
        return tokens.tolist()
    # NCCL broadcasts device tensors only; gloo takes either.
    buf = tokens.clone() if tokens is not None else torch.zeros(
        n, dtype=torch.int64, device=group.config.device)
    torch.distributed.broadcast(buf, src=0)
    return buf.tolist()
