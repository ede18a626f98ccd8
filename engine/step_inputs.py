"""One step's inputs, and their flat form: what every runner path (eager, CUDA graph) builds.

``flatten_inputs`` is pure (lists of ints, no device): the eager path turns its lists into
tensors, the graph path copies them into its static buffers, and tests check both against
the same function.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelInput:
    """``token_ids`` are the new tokens of one sequence at positions ``start ..``."""

    token_ids: Sequence[int]
    start: int
    block_table: Sequence[int]
    sample: bool = True


@dataclass(frozen=True)
class FlatBatch:
    """The step's tokens in order: ids, positions and cache slots per token; which token
    rows are sampled; and the per-sequence layout attention plans from."""

    ids: list[int]
    positions: list[int]
    slots: list[int]
    sample_rows: list[int]
    query_lens: tuple[int, ...]
    seq_lens: tuple[int, ...]
    block_tables: tuple[tuple[int, ...], ...]


def flatten_inputs(inputs: Sequence[ModelInput], block_size: int) -> FlatBatch:
    """Token ``x`` of a sequence goes to slot ``table[x // block_size] * block_size +
    x % block_size``; a sampled input's row is its last token."""
    p = block_size
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    sample_rows: list[int] = []
    for inp in inputs:
        table = inp.block_table
        ids.extend(inp.token_ids)
        pos = range(inp.start, inp.start + len(inp.token_ids))
        positions.extend(pos)
        slots.extend(table[x // p] * p + x % p for x in pos)
        if inp.sample:
            sample_rows.append(len(ids) - 1)
    return FlatBatch(ids, positions, slots, sample_rows,
                     query_lens=tuple(len(i.token_ids) for i in inputs),
                     seq_lens=tuple(i.start + len(i.token_ids) for i in inputs),
                     block_tables=tuple(tuple(i.block_table) for i in inputs))
