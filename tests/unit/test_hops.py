"""The router's hop breakdown of the time to first token (router/hops.py)."""

from __future__ import annotations

import pytest

from pdserve.prefill_worker.messages import PrefillTimes
from pdserve.router.hops import HOP_NAMES, AttemptStamps, first_token_hops


def stamps(**over) -> AttemptStamps:
    s = AttemptStamps(started=1.0, reserve_sent=1.1, reserved_at=1.2, reserved=1.3,
                      prefill_sent=1.4, prefill=PrefillTimes(1.5, 1.6, 1.7, 2.7, 2.8, 2.9),
                      prefill_returned=3.0)
    for k, v in over.items():
        setattr(s, k, v)
    return s


def test_every_hop_in_path_order_summing_to_the_router_time():
    t = first_token_hops(0.5, 0.8, stamps(), 3.2)
    assert [name for name, _ in t.hops] == [n for n in HOP_NAMES
                                            if n not in ("destination_wait", "local_prefill")]
    assert t.concurrent == ()
    assert t.received == 0.5
    assert sum(d for _, d in t.hops) == pytest.approx(3.2 - 0.5)
    assert dict(t.hops)["prefill_compute"] == pytest.approx(1.0)
    assert dict(t.hops)["reserve_call"] == pytest.approx(0.1)


def test_a_step_that_did_not_happen_leaves_no_gap():
    # no decode reservation (the first token is the last): route runs up to the dispatch
    t = first_token_hops(0.5, 0.8, stamps(reserve_sent=None, reserved_at=None, reserved=None),
                         3.2)
    hops = dict(t.hops)
    assert "reserve_call" not in hops and "reserve_reply" not in hops and "route" not in hops
    assert hops["dispatch"] == pytest.approx(1.4 - 1.0)
    assert sum(hops.values()) == pytest.approx(3.2 - 0.5)


def test_worker_stamps_from_another_clock_are_dropped():
    # a worker on another host: its clock has another origin
    far = PrefillTimes(101.5, 101.6, 101.7, 102.7, 102.8, 102.9)
    t = first_token_hops(0.5, 0.8, stamps(prefill=far, reserved_at=77.0), 3.2)
    hops = dict(t.hops)
    assert not any(name.startswith("prefill_c") for name in hops)  # call, compute
    assert "reserve_call" not in hops
    assert hops["prefill_reply"] == pytest.approx(3.0 - 1.4)  # the whole call
    assert sum(hops.values()) == pytest.approx(3.2 - 0.5)


def test_an_overlapped_reservation_runs_beside_the_path():
    # prompt sent at 1.1, reservation 1.15 -> 1.3, destination sent at 1.3, at the worker 2.0
    s = stamps(prefill_sent=1.1, reserve_sent=1.15, reserved_at=1.2, reserved=1.3,
               destination_sent=1.3,
               prefill=PrefillTimes(1.5, 1.6, 1.7, 2.7, 2.8, 2.9, destination=2.0))
    t = first_token_hops(0.5, 0.8, s, 3.2)
    hops = dict(t.hops)
    assert not {"route", "reserve_call", "reserve_reply", "destination_wait"} & set(hops)
    assert hops["dispatch"] == pytest.approx(0.1)
    assert sum(hops.values()) == pytest.approx(3.2 - 0.5)
    assert dict(t.concurrent) == pytest.approx(
        {"reserve_call": 0.05, "reserve_reply": 0.1, "destination_call": 0.7})


def test_a_destination_that_came_after_the_first_token_is_waited_for_on_the_path():
    s = stamps(prefill_sent=1.1, reserve_sent=1.15, reserved_at=1.2, reserved=1.3,
               destination_sent=1.3,
               prefill=PrefillTimes(1.5, 1.6, 1.7, 2.7, 2.8, 2.9, destination=2.75))
    hops = dict(first_token_hops(0.5, 0.8, s, 3.2).hops)
    assert hops["destination_wait"] == pytest.approx(0.05)
    assert hops["kv_transfer_wait"] == pytest.approx(0.05)
    assert sum(hops.values()) == pytest.approx(3.2 - 0.5)


def test_a_prompt_prefilled_on_its_decode_worker():
    # conditional disaggregation: the prefill_local call 1.1 -> 1.3, first token at 2.0
    s = AttemptStamps(started=1.0, reserve_sent=1.1, reserved=1.3, local_first=2.0)
    t = first_token_hops(0.5, 0.8, s, 2.1)
    assert [name for name, _ in t.hops] == ["validate", "admit", "route", "reserve_reply",
                                            "local_prefill", "to_stream"]
    assert dict(t.hops)["local_prefill"] == pytest.approx(0.7)
    assert sum(d for _, d in t.hops) == pytest.approx(2.1 - 0.5)
