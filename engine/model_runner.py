"""Runs one scheduled step of the model on the paged KV cache.

The runner owns the device-side pieces (model, KV cache, attention backend). Given
the step's chunks (which tokens of which sequence, from which position, in which
blocks) it builds the flat input ids, positions and slot mapping, plans attention once,
runs the model, and returns logits for the rows that need sampling. It knows nothing
about requests' sampling or stopping, so the prefill worker, the decode worker and the
single-process engine all use it unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pdserve.engine.attention.base import AttentionBackend, AttentionMetadata
from pdserve.engine.kv_cache import KVCache
from pdserve.engine.models.llama import LlamaForCausalLM


@dataclass(frozen=True)
class ModelInput:
    """``token_ids`` are the new tokens of one sequence at positions ``start ..``."""

    token_ids: Sequence[int]
    start: int
    block_table: Sequence[int]
    sample: bool = True


class ModelRunner:
    # A failure outside any step that leaves the runner unusable (a tensor-parallel rank
    # lost while the instance idled): health checks read it; the next step raises it.
    error: BaseException | None = None

    def __init__(self, model: LlamaForCausalLM, kv_cache: KVCache, attn: AttentionBackend,
                 device: torch.device):
        self.model = model
        self.kv_cache = kv_cache
        self.attn = attn
        self.device = device
        self.block_size = kv_cache.spec.block_size

    def run(self, inputs: Sequence[ModelInput], all_logits: bool = False,
            layer_done: Callable[[int], None] | None = None, extra: bytes = b"",
            reply: int = 0) -> torch.Tensor | None:
        """Logits [rows, vocab] in float32: one row per input with ``sample`` set (its last
        token), or one per token of every input if ``all_logits``. A tensor-parallel rank
        other than 0 runs the same step (every rank must, with the same inputs) and gets None.
        ``extra``/``reply``: what the other ranks of a tensor-parallel instance get with the
        step and owe after it (``executor.DrivingRunner``); nothing to do with one rank."""
        if not inputs:
            raise ValueError("empty step")
        p = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        for inp in inputs:
            n = len(inp.token_ids)
            table = inp.block_table
            ids.extend(inp.token_ids)
            pos = range(inp.start, inp.start + n)
            positions.extend(pos)
            slots.extend(table[x // p] * p + x % p for x in pos)
            if inp.sample:
                sample_rows.append(len(ids) - 1)
        meta = AttentionMetadata(
            query_lens=tuple(len(i.token_ids) for i in inputs),
            seq_lens=tuple(i.start + len(i.token_ids) for i in inputs),
            block_tables=tuple(tuple(i.block_table) for i in inputs),
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device),
            block_size=p,
        )
        self.attn.plan(meta)
        logits_idx = None if all_logits else torch.tensor(sample_rows, dtype=torch.long,
                                                             device=self.device)
        return self.model.forward(
            torch.tensor(ids, dtype=torch.long, device=self.device),
            torch.tensor(positions, dtype=torch.long, device=self.device),
            self.kv_cache, self.attn, logits_idx, layer_done,
        )

    # -- the worker layer's exchanges with the other ranks (trivial with one rank) ------
    @property
    def num_ranks(self) -> int:
        return 1

    def agree(self, values: Sequence[int]) -> list[int]:
        """The element-wise MIN of every rank's answer to the last step's ``reply``."""
        return list(values)

    def control(self, extra: bytes, reply: int = 0) -> None:
        """Hand ``extra`` to the other ranks without running the model; with ``reply`` > 0
        every rank owes that many integers, collected by ``agree`` after this rank's part."""

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's ``data`` in rank order (once, before any step)."""
        return [data]

    def close(self) -> None:
        """Release what the runner holds beyond memory (a tensor-parallel rank 0's
        followers); nothing here."""
