"""When the router sends a prompt to prefill before its decode reservation."""

from __future__ import annotations

from pdserve.router.admission import Admission
from pdserve.router.policies import create_policy
from pdserve.router.policy import RoutingRequest
from pdserve.router.reliability import ReliabilityConfig


def admission() -> Admission:
    a = Admission(create_policy("least_loaded"), ["p0"], ["d0"], "reject", {},
                  ReliabilityConfig())
    load = a.decode_load["d0"]
    load.free_blocks, load.block_size, load.max_seqs = 100, 16, 4
    return a


REQ = RoutingRequest("r", num_prompt_tokens=160, max_tokens=8)  # 10 blocks


def test_room_for_twice_the_prompt_at_the_last_heartbeat():
    a = admission()
    assert a.decode_room_likely(REQ)
    a.decode_load["d0"].free_blocks = 19
    assert not a.decode_room_likely(REQ)


def test_no_stats_yet_means_no_room():
    a = Admission(create_policy("least_loaded"), ["p0"], ["d0"], "reject", {},
                  ReliabilityConfig())
    assert not a.decode_room_likely(REQ)


def test_a_refusal_since_the_heartbeat_or_every_seat_taken_means_reserve_first():
    a = admission()
    load = a.decode_load["d0"]
    load.refused = True
    assert not a.decode_room_likely(REQ)
    load.refused, load.in_flight = False, 4  # this router holds max_num_seqs requests there
    assert not a.decode_room_likely(REQ)
    load.in_flight = 3
    assert a.decode_room_likely(REQ)
    load.healthy = False
    assert not a.decode_room_likely(REQ)
