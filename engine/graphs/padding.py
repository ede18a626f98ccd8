"""Padding a decode batch of B rows up to a captured graph size (pure, no CUDA).

A padded row is a one-token sequence at position 0 whose only block is the runner's
scratch block: it writes its K/V into slot 0 of that block and attends to exactly that
one slot. So every row of the static batch has a well-formed page table (one page,
``last_page_len`` 1) and no padded row ever reads or writes a block the block manager
hands out. Padded rows are appended after the real ones and never sampled: their logits
are dropped before sampling.

(vLLM gives padded rows zero pages instead; one scratch page costs nothing measurable
and keeps every row's attention defined, whatever the kernel does with empty rows.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pdserve.engine.step_inputs import ModelInput

PAD_TOKEN = 0


def scratch_input(scratch_block: int) -> ModelInput:
    """The one padded row: token 0 at position 0 in the scratch block, not sampled."""
    return ModelInput((PAD_TOKEN,), 0, (scratch_block,), sample=False)


def pad_decode_inputs(inputs: Sequence[ModelInput], padded: int,
                      scratch_block: int) -> list[ModelInput]:
    """``inputs`` (decode rows, one token each) followed by ``padded - len(inputs)``
    scratch rows."""
    if len(inputs) > padded:
        raise ValueError(f"{len(inputs)} rows do not fit a graph of {padded}")
    if any(len(i.token_ids) != 1 for i in inputs):
        raise ValueError("only decode rows (one new token each) can be padded into a graph")
    if any(scratch_block in i.block_table for i in inputs):
        raise ValueError(f"a real row uses the scratch block {scratch_block}")
    return list(inputs) + [scratch_input(scratch_block)] * (padded - len(inputs))


def graph_eligible(inputs: Sequence[ModelInput], all_logits: bool,
                   layer_done: Callable[[int], None] | None) -> bool:
    """A step a decode graph can run: decode rows only, logits of sampled rows only, and
    no per-layer callback (a graph replays all layers at once; a prefill worker's
    layer-by-layer KV send needs the eager loop)."""
    return (bool(inputs) and not all_logits and layer_done is None
            and all(len(i.token_ids) == 1 for i in inputs))
