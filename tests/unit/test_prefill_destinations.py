"""A prompt sent before its decode reservation: the destination follows it.

Whenever the destination lands (before the prompt's step, in the middle of it, after it),
the decode worker receives the same KV and decodes the same greedy tokens as the
single-process engine, and every block is freed afterwards. A destination that never
comes fails the request after the transfer timeout instead of holding its blocks; an
abort frees a parked request; a first token that finishes the request needs no KV.
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from pdserve.decode_worker.messages import ReserveRequest, StartDecode
from pdserve.decode_worker.worker import DecodeWorker
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kv_transfer.registry import create_receiver, create_sender
from pdserve.prefill_worker.destinations import DestinationMailbox
from pdserve.prefill_worker.host import PrefillHost
from pdserve.prefill_worker.messages import PrefillRequest
from pdserve.prefill_worker.worker import PrefillWorker
from tests.cluster_helpers import engine_config
from tests.unit.test_kv_integrity import drain

MAX_TOKENS = 6


@pytest.fixture(scope="module")
def cfg(demo_model_dir):
    return engine_config(demo_model_dir, num_kv_blocks=64)


@pytest.fixture()
def pair(cfg):
    prefill = PrefillWorker.from_config("prefill-0", cfg, create_sender("inprocess"),
                                        kv_checksum="full")
    decode = DecodeWorker.from_config("decode-0", cfg, lambda s: create_receiver(
        "inprocess", s, "decode-0"))
    yield prefill, decode
    prefill.sender.close()
    decode.receiver.close()


def prompt(seed: int) -> tuple[int, ...]:
    rng = random.Random(seed)
    return tuple(rng.randrange(3, 900) for _ in range(40))


def want(cfg, p) -> tuple[int, ...]:
    engine = LLMEngine.from_config(cfg)
    return engine.generate([list(p)], [SamplingParams(max_tokens=MAX_TOKENS)])[0].token_ids


def send(prefill: PrefillWorker, rid: str, p, params=None) -> None:
    prefill.add(PrefillRequest(rid, p, params or SamplingParams(max_tokens=MAX_TOKENS), None,
                               destination_follows=True))


def decode_rest(decode: DecodeWorker, rid: str, p, dest, result) -> tuple[int, ...]:
    assert result.ok, result.error
    decode.start(StartDecode(rid, p, SamplingParams(max_tokens=MAX_TOKENS), result.token,
                             dest.endpoint.incarnation, result.kv_digest, "prefill-0"))
    return (result.token.token_id, *drain(decode, rid))


def idle(prefill: PrefillWorker, decode: DecodeWorker) -> bool:
    return (prefill.blocks.stats().num_used_blocks == 0 and not prefill.has_work()
            and decode.blocks.stats().num_used_blocks == 0 and len(prefill.destinations) == 0)


def test_destination_before_the_step_ships_layer_by_layer(cfg, pair):
    prefill, decode = pair
    p = prompt(1)
    send(prefill, "a", p)
    dest = decode.reserve(ReserveRequest("a", len(p))).destination
    prefill.destinations.put(dest)
    [result] = prefill.step()
    assert result.times.destination is not None
    assert result.times.destination <= result.times.scheduled  # waited for nothing
    assert decode_rest(decode, "a", p, dest, result) == want(cfg, p)
    assert idle(prefill, decode)


@pytest.mark.parametrize("at_layer", [0, 2])
def test_destination_in_the_middle_of_the_step_catches_up_on_earlier_layers(
        cfg, pair, monkeypatch, at_layer):
    prefill, decode = pair
    p = prompt(2)
    send(prefill, "b", p)
    dest = decode.reserve(ReserveRequest("b", len(p))).destination
    make_hook = prefill._layer_hook

    def hook_that_delivers(sending, late, tables):
        inner = make_hook(sending, late, tables)

        def layer_done(layer):
            if layer == at_layer:  # lands while layer ``at_layer`` was computing
                prefill.destinations.put(dest)
            inner(layer)

        return layer_done

    monkeypatch.setattr(prefill, "_layer_hook", hook_that_delivers)
    [result] = prefill.step()
    assert result.times.scheduled < result.times.destination < result.times.sampled
    assert decode_rest(decode, "b", p, dest, result) == want(cfg, p)  # checksum verified
    assert idle(prefill, decode)


def test_destination_after_the_step_parks_the_prompt_then_ships_it(cfg, pair):
    prefill, decode = pair
    p = prompt(3)
    send(prefill, "c", p)
    assert prefill.step() == []  # computed and sampled, waiting for its destination
    assert prefill.stats().num_running == 1 and prefill.blocks.stats().num_used_blocks > 0
    assert not prefill.has_work()  # nothing to do until the destination comes
    dest = decode.reserve(ReserveRequest("c", len(p))).destination
    prefill.destinations.put(dest)
    assert prefill.has_work()
    [result] = prefill.step()
    assert result.times.destination > result.times.sampled
    assert decode_rest(decode, "c", p, dest, result) == want(cfg, p)
    assert idle(prefill, decode)


def test_a_destination_that_never_comes_fails_the_request_and_frees_its_blocks(pair):
    prefill, decode = pair
    prefill.transfer_timeout_s = 0.05
    send(prefill, "d", prompt(4))
    assert prefill.step() == []
    time.sleep(0.1)
    assert prefill.has_work()
    [result] = prefill.step()
    assert not result.ok and "no KV destination" in result.error
    assert idle(prefill, decode)


def test_abort_frees_a_parked_prompt_and_a_destination_for_it(pair):
    prefill, decode = pair
    p = prompt(5)
    send(prefill, "e", p)
    prefill.step()
    dest = decode.reserve(ReserveRequest("e", len(p))).destination
    prefill.destinations.put(dest)  # too late: the router gave up in the meantime
    assert prefill.abort("e")
    decode.release("e")
    assert idle(prefill, decode) and prefill.step() == []


def test_a_first_token_that_finishes_the_request_needs_no_destination(cfg, pair):
    prefill, decode = pair
    p = prompt(6)
    first = want(cfg, p)[0]
    send(prefill, "f", p, SamplingParams(max_tokens=MAX_TOKENS, stop_token_ids=(first,)))
    [result] = prefill.step()
    assert result.ok and result.finish_reason == "stop" and result.kv_digest is None
    assert idle(prefill, decode)


def test_mailbox_drops_what_nobody_claims():
    box = DestinationMailbox()
    assert box.take("x") is None and box.expire(0.0) == 0


def test_unclaimed_destinations_expire_in_housekeeping(pair):
    prefill, decode = pair
    prefill.transfer_timeout_s = 0.05
    dest = decode.reserve(ReserveRequest("gone", 10)).destination
    prefill.destinations.put(dest)  # its prompt was aborted before it came
    time.sleep(0.1)
    prefill.housekeeping()
    assert len(prefill.destinations) == 0


def test_abort_ends_the_prefill_call_waiting_on_it(cfg):
    """The host's ``prefill`` call of an aborted request returns (cancelled) instead of
    waiting for a result that will never come (under Ray it would never end)."""
    host = PrefillHost(PrefillWorker.from_config("prefill-0", cfg, create_sender("inprocess")))

    async def scenario():
        call = asyncio.ensure_future(host.prefill(PrefillRequest(
            "g", prompt(7), SamplingParams(max_tokens=MAX_TOKENS), None,
            destination_follows=True)))
        for _ in range(200):  # until it is computed and parked
            if host.worker._parked:
                break
            await asyncio.sleep(0.01)
        assert await host.abort("g")
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(call, 5)

    try:
        asyncio.run(scenario())
        assert host.worker.blocks.stats().num_used_blocks == 0
    finally:
        host.close()
