"""The direct router <-> prefill-worker channel: its wire format, the worker's server and
the router's client against a real prefill worker in this process, and the keeper that
connects through the actor (a fake actor handle; the Ray path is in the integration tests)."""

from __future__ import annotations

import asyncio
import struct

import msgspec
import pytest

import pdserve.prefill_worker.channel_wire as wire
from pdserve.engine.messages import SampledToken
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kv_transfer.backend_config import KVTransferConfig
from pdserve.kv_transfer.messages import KVCacheSpecMsg, KVDestination, KVEndpoint
from pdserve.prefill_worker.build import build_prefill_host
from pdserve.prefill_worker.channel_server import ChannelServer
from pdserve.prefill_worker.messages import PrefillRequest, PrefillResult, PrefillTimes
from pdserve.router.prefill_channel import PrefillChannel
from pdserve.router.prefill_direct import DirectPath
from pdserve.router.worker_gone import WorkerGone
from tests.cluster_helpers import engine_config


def reader_of(data: bytes) -> asyncio.StreamReader:
    r = asyncio.StreamReader()
    r.feed_data(data)
    r.feed_eof()
    return r


def raw(obj) -> bytes:
    """A frame of any MessagePack value."""
    body = msgspec.msgpack.encode(obj)
    return struct.pack("!I", len(body)) + body


def read_call(data: bytes):
    async def go():
        return await wire.read_call(reader_of(data))
    return asyncio.run(go())


def destination(rid: str) -> KVDestination:
    spec = KVCacheSpecMsg(num_layers=2, num_blocks=8, block_size=16, num_kv_heads=2,
                          head_dim=8, dtype="float32")
    return KVDestination(rid, KVEndpoint("shm", "decode-0", "/pdserve-x", spec, "inc-1"),
                         (3, 4), 20)


CALLS = [
    wire.PrefillCall(1, PrefillRequest("r1", (5, 6, 7), SamplingParams(
        max_tokens=3, temperature=0.7, seed=2, stop=("x",), logprobs=2), destination("r1"))),
    wire.PrefillCall(2, PrefillRequest("r2", (9,), SamplingParams(), None,
                                       destination_follows=True)),
    wire.DestinationCall(3, destination("r2")),
    wire.AbortCall(4, "r1"),
]
REPLIES = [
    wire.Hello(wire.VERSION, "prefill-0", "inc"),
    wire.PrefillDone(1, PrefillResult("r1", SampledToken(7, -0.5, ((7, -0.5), (8, -1.5))),
                                      None, PrefillTimes(1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 2.5),
                                      num_cached_tokens=16)),
    wire.PrefillDone(2, PrefillResult("r2", None, None, PrefillTimes(1, 1, 1, 1, 1),
                                      error="too long")),
    wire.Ack(3), wire.Ack(4, True), wire.Failed(5, "ValueError", "bad"),
]


def test_every_message_survives_the_wire():
    async def go():
        for msg in CALLS:
            assert await wire.read_call(reader_of(wire.encode(msg))) == msg
        for msg in REPLIES:
            assert await wire.read_reply(reader_of(wire.encode(msg))) == msg
        assert await wire.read_call(reader_of(b"")) is None  # a clean end
    asyncio.run(go())


@pytest.mark.parametrize("data, why", [
    (b"\x00\x00", "inside a frame header"),
    (struct.pack("!I", 10) + b"abc", "inside a frame"),
    (struct.pack("!I", wire.MAX_FRAME_BYTES + 1), "exceeds"),
    (struct.pack("!I", 3) + b"\xc1\xc1\xc1", "not a valid message"),
    # a reply where a call belongs; a field of the wrong type
    (wire.encode(wire.Ack(1)), "not a valid message"),
    (raw({"type": "AbortCall", "call_id": 1, "request_id": 7}), "not a valid message"),
])
def test_what_is_not_a_frame_is_a_protocol_error(data, why):
    with pytest.raises(wire.ProtocolError, match=why):
        read_call(data)


def test_an_empty_prompt_is_refused_by_the_message_itself():
    frame = raw({"type": "PrefillCall", "call_id": 1, "request": {
        "request_id": "r", "prompt_token_ids": [], "params": {}, "destination": None}})
    with pytest.raises(wire.ProtocolError, match="must not be empty"):
        read_call(frame)


@pytest.fixture(scope="module")
def host(demo_model_dir):
    h = build_prefill_host("prefill-0", engine_config(demo_model_dir, num_kv_blocks=64),
                           KVTransferConfig(backend="inprocess"))
    yield h
    h.close()


async def served(host):
    server = ChannelServer(host)
    path = await server.start()
    return server, await PrefillChannel.connect(path, "prefill-0")


def test_prefill_over_the_channel_equals_a_direct_call(host):
    async def go():
        server, ch = await served(host)
        try:
            assert ch.incarnation == host.worker.incarnation
            params = SamplingParams(max_tokens=4, logprobs=2)
            over = await ch.prefill(PrefillRequest("a", tuple(range(5, 40)), params, None))
            direct = await host.prefill(PrefillRequest("b", tuple(range(5, 40)), params, None))
            # (the direct call hits the prefix cache the first one filled: equal to float
            # rounding, as recomputing the prompt in a different chunking is)
            assert over.ok and over.token.token_id == direct.token.token_id
            assert [t for t, _ in over.token.top_logprobs] == [
                t for t, _ in direct.token.top_logprobs]
            assert [lp for _, lp in over.token.top_logprobs] == pytest.approx(
                [lp for _, lp in direct.token.top_logprobs], abs=1e-5)
            assert await ch.abort("nobody") is False
            # The worker's own exception comes back as its type, and the channel lives on.
            dup = PrefillRequest("c", tuple(range(5, 900)), params, None)
            first = ch.prefill(dup)
            with pytest.raises(ValueError, match="already queued"):
                await ch.prefill(dup)
            assert (await first).ok and ch.alive
            # A prompt larger than the worker's whole KV cache (64 blocks of 16) is refused
            # at once, and the worker serves on.
            with pytest.raises(ValueError, match="does not fit the KV cache"):
                await ch.prefill(PrefillRequest("d", tuple(3 + i % 900 for i in range(1100)),
                                                params, None))
            assert (await ch.prefill(PrefillRequest("e", (5, 6), params, None))).ok
        finally:
            await ch.close()
            await server.close()
    asyncio.run(go())


def test_a_socket_of_another_worker_is_refused(host):
    async def go():
        server = ChannelServer(host)
        path = await server.start()
        try:
            with pytest.raises(wire.ProtocolError, match="not prefill-9"):
                await PrefillChannel.connect(path, "prefill-9")
        finally:
            await server.close()
    asyncio.run(go())


def test_a_dropped_connection_aborts_its_prefills_and_fails_its_calls(host):
    async def go():
        server, ch = await served(host)
        free = (await host.stats()).num_free_blocks
        # A prompt long enough to be in flight when the router goes away.
        pending = ch.prefill(PrefillRequest("long", tuple(3 + i % 900 for i in range(900)),
                                            SamplingParams(), None))
        await asyncio.sleep(0.01)
        await ch.close()  # the router's end goes away
        with pytest.raises(WorkerGone):
            await pending
        for _ in range(200):  # the worker aborts it and frees its blocks
            s = await host.stats()
            if s.num_waiting == s.num_running == 0 and s.num_free_blocks == free:
                break
            await asyncio.sleep(0.02)
        assert (s.num_waiting, s.num_running, s.num_free_blocks) == (0, 0, free)
        # And when the worker's end goes away, the router's calls fail as WorkerGone.
        ch2 = await PrefillChannel.connect(server.path, "prefill-0")
        await server.close()
        with pytest.raises(WorkerGone):
            for _ in range(100):
                await ch2.abort("x")
                await asyncio.sleep(0.01)
        assert not ch2.alive
    asyncio.run(go())


class FakeActor:
    """What ``DirectPath`` uses of a prefill worker's Ray actor handle."""

    def __init__(self, server: ChannelServer | None):
        self.server = server
        self.asked: list[str] = []
        outer = self

        class Method:
            def remote(self, node_id):
                outer.asked.append(node_id)
                return outer._address(node_id)

        self.channel_address = Method()

    async def _address(self, node_id):
        return None if self.server is None else await self.server.start()


def test_the_keeper_connects_in_the_background_and_reconnects(host):
    async def go():
        server = ChannelServer(host)
        actor = FakeActor(server)
        path = DirectPath("prefill-0", actor, lambda: "node-a", retry_s=0.0)
        assert path.channel() is None  # never waits: Ray until the channel is up
        for _ in range(100):
            if (ch := path.channel()) is not None:
                break
            await asyncio.sleep(0.01)
        assert ch is not None and actor.asked == ["node-a"] and path.connects == 1
        # The worker restarts: a new server (process) on a new socket.
        await server.close()
        actor.server = ChannelServer(host)
        for _ in range(200):
            ch2 = path.channel()
            if ch2 is not None and ch2 is not ch:
                break
            await asyncio.sleep(0.01)
        assert ch2 is not None and ch2 is not ch and path.connects == 2
        assert (await ch2.prefill(PrefillRequest("k", (5, 6, 7), SamplingParams(), None))).ok
        await path.close()
        await actor.server.close()
    asyncio.run(go())


def test_a_worker_on_another_node_stays_on_ray():
    async def go():
        path = DirectPath("prefill-0", FakeActor(None), lambda: "node-a", retry_s=0.0)
        path.channel()
        for _ in range(100):
            if path.disabled:
                break
            await asyncio.sleep(0.01)
        assert "another node" in path.disabled and path.channel() is None
    asyncio.run(go())
