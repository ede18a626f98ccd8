"""The few places where a tensor-parallel forward differs from a single-device one.

The Llama block asks its ``Parallelism`` for the embedding, for each row-parallel
projection (o_proj, down_proj) and for the logits; everything else (norms, RoPE,
attention, column-parallel matmuls) is the same code on a shard as on the whole model.
``SingleDevice`` is tp=1 and runs exactly the ops the model ran before TP existed;
``TensorParallel`` adds the collectives: one all-reduce per row-parallel projection (two
per layer), one for the vocab-parallel embedding, and one gather of the LM head's
vocabulary shares to rank 0 (the other ranks get no logits: only rank 0 samples).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pdserve.engine.parallel.group import TPGroup
from pdserve.engine.parallel.shard import TPShard


class SingleDevice:
    """tp=1: the plain ops."""

    def embed(self, input_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, weight)

    def row_linear(self, x: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def logits(self, h: torch.Tensor, lm_head: torch.Tensor) -> torch.Tensor | None:
        return F.linear(h, lm_head).float()


class TensorParallel:
    """One rank of a Megatron-style split (``shard.py``) over ``group``."""

    def __init__(self, group: TPGroup, shard: TPShard, vocab_size: int):
        if group.size != shard.size or group.rank != shard.rank:
            raise ValueError(f"shard is rank {shard.rank}/{shard.size}, "
                             f"group is rank {group.rank}/{group.size}")
        self.group = group
        self.shard = shard
        self.vocab_size = vocab_size

    def embed(self, input_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # Each rank looks up the ids in its vocabulary share, zeroes the rest; the sum over
        # ranks is then the full lookup (every id is real on exactly one rank).
        local = input_ids - self.shard.vocab_start
        outside = (local < 0) | (local >= self.shard.vocab_rows)
        h = F.embedding(local.masked_fill(outside, 0), weight)
        h.masked_fill_(outside[:, None], 0.0)
        return self.group.all_reduce_(h)

    def row_linear(self, x: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
        # The input columns are split: each rank holds a partial sum. The bias is added
        # once, after the sum (every rank holds it whole).
        y = self.group.all_reduce_(F.linear(x, weight))
        return y if bias is None else y + bias

    def logits(self, h: torch.Tensor, lm_head: torch.Tensor) -> torch.Tensor | None:
        full = self.group.gather_to_first(F.linear(h, lm_head))
        return None if full is None else full[:, :self.vocab_size].float()


Parallelism = SingleDevice | TensorParallel
