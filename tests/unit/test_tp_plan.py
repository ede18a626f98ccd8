"""The KV transfer plan between TP degrees (kv_transfer/tp_plan.py), on its own.

Exhaustively over small head counts and every valid pair of degrees, then by hypothesis
over larger ones: each receiving rank gets exactly the KV heads its cache holds, each once,
from a sender rank that holds them, at the right offsets in both caches; a sender's heads
to one receiver form one transfer; with replication on the sending side the choice is
deterministic and spread over the replicas. Malformed plans are refused on construction.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve.engine.parallel.shard import HeadRange, kv_head_range
from pdserve.kv_transfer.tp_plan import HeadTransfer, TPTransferPlan


def valid_degrees(num_kv_heads: int, up_to: int) -> list[int]:
    return [t for t in range(1, up_to + 1) if num_kv_heads % t == 0 or t % num_kv_heads == 0]


def check_plan(plan: TPTransferPlan) -> None:
    """The plan's contract, recomputed here from the head ranges alone."""
    h, p, d = plan.num_kv_heads, plan.sender_tp, plan.receiver_tp
    for r in range(d):
        mine = kv_head_range(h, d, r)
        got: list[int] = []
        for t in plan.to_receiver(r):
            src = kv_head_range(h, p, t.sender)
            assert src.start <= t.heads.start < t.heads.stop <= src.stop
            assert t.sender_offset == t.heads.start - src.start
            assert t.receiver_offset == t.heads.start - mine.start
            got += range(t.heads.start, t.heads.stop)
        assert got == list(range(mine.start, mine.stop)), (r, got)
        senders = [t.sender for t in plan.to_receiver(r)]
        assert len(senders) == len(set(senders)), "one transfer per (sender, receiver)"
    assert sum(len(t.heads) for t in plan.transfers) == h * max(1, d // h)
    for s in range(p):
        assert all(t.sender == s for t in plan.from_sender(s))
    assert sorted(plan.transfers, key=lambda t: (t.sender, t.receiver)) == sorted(
        (t for s in range(p) for t in plan.from_sender(s)), key=lambda t: (t.sender, t.receiver))


@pytest.mark.parametrize("num_kv_heads", range(1, 13))
def test_every_small_case(num_kv_heads):
    degrees = valid_degrees(num_kv_heads, 16)
    for p in degrees:
        for d in degrees:
            plan = TPTransferPlan.build(num_kv_heads, p, d)
            check_plan(plan)
            assert plan == TPTransferPlan.build(num_kv_heads, p, d)  # deterministic
            if p <= num_kv_heads:
                # No replication on the sending side: a receiver hears from exactly the
                # sender ranks whose heads overlap its own.
                for r in range(d):
                    mine = kv_head_range(num_kv_heads, d, r)
                    overlap = [s for s in range(p)
                               if kv_head_range(num_kv_heads, p, s).start < mine.stop
                               and mine.start < kv_head_range(num_kv_heads, p, s).stop]
                    assert [t.sender for t in plan.to_receiver(r)] == overlap


@st.composite
def cases(draw):
    heads = draw(st.sampled_from([1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 40, 64]))
    degrees = valid_degrees(heads, 128)
    return heads, draw(st.sampled_from(degrees)), draw(st.sampled_from(degrees))


@settings(max_examples=300, deadline=None)
@given(cases())
def test_larger_cases(case):
    check_plan(TPTransferPlan.build(*case))


def test_same_degree_is_rank_to_rank_whole():
    plan = TPTransferPlan.build(8, 4, 4)
    assert plan.transfers == tuple(HeadTransfer(r, r, HeadRange(2 * r, 2 * r + 2), 0, 0)
                                   for r in range(4))


def test_decode_wider_reads_a_slice_of_one_prefill_rank():
    """vLLM's mapping for D tp > P tp: decode rank r reads from prefill rank r // ratio."""
    plan = TPTransferPlan.build(8, 2, 4)
    assert [(t.sender, t.heads.start, t.sender_offset) for t in plan.transfers] == [
        (0, 0, 0), (0, 2, 2), (1, 4, 0), (1, 6, 2)]


def test_prefill_wider_gathers_from_several_prefill_ranks():
    """P tp > D tp: decode rank r assembles its heads from prefill ranks r*ratio .. +ratio-1."""
    plan = TPTransferPlan.build(8, 4, 2)
    assert [(t.sender, t.receiver, t.receiver_offset) for t in plan.to_receiver(1)] == [
        (2, 1, 0), (3, 1, 2)]


def test_replicated_senders_are_spread_over_receivers():
    # 2 KV heads on 8 prefill ranks: head 0 on ranks 0-3, head 1 on ranks 4-7.
    plan = TPTransferPlan.build(2, 8, 4)  # decode: head 0 on ranks 0-1, head 1 on 2-3
    assert [(t.receiver, t.sender) for t in plan.transfers] == [(0, 0), (1, 1), (2, 6), (3, 7)]
    to_one = TPTransferPlan.build(2, 8, 1)
    assert [(t.sender, t.heads) for t in to_one.transfers] == [
        (0, HeadRange(0, 1)), (4, HeadRange(1, 2))]


def test_replicated_receivers_each_get_their_head():
    plan = TPTransferPlan.build(2, 1, 4)
    assert [(t.receiver, t.heads.start, t.sender_offset, t.receiver_offset)
            for t in plan.transfers] == [(0, 0, 0, 0), (1, 0, 0, 0), (2, 1, 1, 0), (3, 1, 1, 0)]


@pytest.mark.parametrize("heads, p, d", [(8, 3, 2), (8, 2, 3), (6, 4, 1), (4, 1, 6), (4, 0, 1)])
def test_degrees_that_cannot_split_the_heads(heads, p, d):
    with pytest.raises(ValueError, match="tensor parallel size"):
        TPTransferPlan.build(heads, p, d)


def _broken(plan: TPTransferPlan, transfers) -> None:
    with pytest.raises(ValueError):
        dataclasses.replace(plan, transfers=tuple(transfers))


def test_malformed_plans_are_refused():
    plan = TPTransferPlan.build(8, 4, 2)
    ts = list(plan.transfers)
    _broken(plan, ts[1:])  # a receiver misses heads
    _broken(plan, [ts[0], *ts])  # a head twice (and unsorted)
    _broken(plan, [dataclasses.replace(ts[0], sender=1), *ts[1:]])  # sender lacks the heads
    _broken(plan, [dataclasses.replace(ts[0], sender_offset=1), *ts[1:]])
    _broken(plan, [dataclasses.replace(ts[0], receiver_offset=1), *ts[1:]])
    _broken(plan, [ts[1], ts[0], *ts[2:]])  # out of order
    _broken(plan, [*ts, dataclasses.replace(ts[0], receiver=2)])  # no such receiver
    _broken(plan, [dataclasses.replace(ts[0], sender=9), *ts[1:]])
