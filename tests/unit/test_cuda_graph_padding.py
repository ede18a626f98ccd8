"""Padding a decode batch to a captured graph size, and the static inputs and page table it
gives (pure functions, no GPU): padded rows touch only the scratch block and are never
sampled; real rows come out exactly as the eager path would build them."""

from __future__ import annotations

import pytest

from pdserve.engine.attention.flashinfer_backend import page_table
from pdserve.engine.graphs.padding import (
    PAD_TOKEN,
    graph_eligible,
    pad_decode_inputs,
    scratch_input,
)
from pdserve.engine.step_inputs import ModelInput, flatten_inputs

BS = 4
SCRATCH = 99


def decode_rows():
    # contexts of 1, 6 and 9 tokens after this step; the new token sits at position len-1
    return [ModelInput((11,), 0, (3,)), ModelInput((12,), 5, (7, 2)),
            ModelInput((13,), 8, (0, 5, 6))]


def test_padded_rows_follow_the_real_ones_and_use_only_the_scratch_block():
    rows = decode_rows()
    padded = pad_decode_inputs(rows, 8, SCRATCH)
    assert padded[:3] == rows
    assert padded[3:] == [scratch_input(SCRATCH)] * 5
    flat = flatten_inputs(padded, BS)
    real = flatten_inputs(rows, BS)
    # the real rows are what the eager path builds, untouched
    assert flat.ids[:3] == real.ids and flat.positions[:3] == real.positions
    assert flat.slots[:3] == real.slots == [3 * BS + 0, 2 * BS + 1, 6 * BS + 0]
    # padded rows: pad token at position 0 writing slot 0 of the scratch block
    assert flat.ids[3:] == [PAD_TOKEN] * 5 and flat.positions[3:] == [0] * 5
    assert flat.slots[3:] == [SCRATCH * BS] * 5
    # logits of padded rows are dropped: only real rows are sampled
    assert flat.sample_rows == [0, 1, 2]
    assert flat.query_lens == (1,) * 8 and flat.seq_lens == (1, 6, 9) + (1,) * 5


def test_page_table_of_a_padded_batch_gives_each_padded_row_one_scratch_page():
    flat = flatten_inputs(pad_decode_inputs(decode_rows(), 5, SCRATCH), BS)
    indptr, indices, last = page_table(flat.seq_lens, flat.block_tables, BS)
    assert indptr == [0, 1, 3, 6, 7, 8]
    assert indices == [3, 7, 2, 0, 5, 6, SCRATCH, SCRATCH]
    assert last == [1, 2, 1, 1, 1]
    assert all(1 <= x <= BS for x in last)


def test_page_table_uses_only_the_pages_a_sequence_fills():
    # 8 tokens in blocks of 4 fill exactly 2 pages: the third block of the table is unused
    indptr, indices, last = page_table((8, 4), ((1, 2, 3), (9,)), BS)
    assert (indptr, indices, last) == ([0, 2, 3], [1, 2, 9], [4, 4])


def test_a_batch_of_exactly_the_graph_size_gets_no_padding():
    rows = decode_rows()
    assert pad_decode_inputs(rows, 3, SCRATCH) == rows


@pytest.mark.parametrize("rows, padded, match", [
    (decode_rows(), 2, "do not fit"),
    ([ModelInput((1, 2), 0, (3,))], 4, "decode rows"),
    ([ModelInput((1,), 4, (3, SCRATCH))], 4, "scratch block"),
])
def test_padding_refuses_what_a_graph_cannot_run(rows, padded, match):
    with pytest.raises(ValueError, match=match):
        pad_decode_inputs(rows, padded, SCRATCH)


def test_graph_eligible_only_for_plain_decode_steps():
    rows = decode_rows()
    assert graph_eligible(rows, False, None)
    assert not graph_eligible([], False, None)
    assert not graph_eligible(rows, True, None)  # all_logits
    assert not graph_eligible(rows, False, lambda i: None)  # per-layer callback
    assert not graph_eligible(rows + [ModelInput((1, 2), 0, (4,))], False, None)
