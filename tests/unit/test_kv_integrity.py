"""KV integrity: no write lands in another life of a decode cache, and decode verifies
what it reads.

A decode worker that restarts keeps its address (shm segment name, in-process key, TCP
port) but gets a new cache with a new incarnation. A prefill worker holding a destination
reserved on the old one must fail that transfer cleanly (nothing written, its blocks
freed, the new cache untouched), and a fresh reservation must work. Separately, the
per-request KV checksum catches bytes that changed between the prefill's write and the
decode's admission.
"""

from __future__ import annotations

import random
import time

import pytest
import torch

from pdserve.decode_worker.messages import ReservationLost, ReserveRequest, StartDecode
from pdserve.decode_worker.worker import DecodeWorker
from pdserve.engine.kv_cache import KVCache, KVCacheSpec
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.metrics import WorkerMetrics
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kv_transfer.base import KVDestination, StaleDestination, send_kv_blocks
from pdserve.kv_transfer.checksum import KVChecksum, KVDigest, checksum_blocks
from pdserve.kv_transfer.registry import create_receiver, create_sender
from pdserve.prefill_worker.messages import PrefillRequest
from pdserve.prefill_worker.worker import PrefillWorker
from tests.cluster_helpers import engine_config

CPU_BACKENDS = ("inprocess", "shm", "tcp")
MAX_TOKENS = 8


def spec(num_blocks: int = 16) -> KVCacheSpec:
    return KVCacheSpec(num_layers=3, num_blocks=num_blocks, block_size=4, num_kv_heads=2,
                       head_dim=8, dtype=torch.bfloat16)


def random_cache(s: KVCacheSpec, seed: int) -> KVCache:
    g = torch.Generator().manual_seed(seed)
    return KVCache(s, buffer=torch.randn(s.shape, generator=g).to(s.dtype))


# -- the checksum ------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["full", "sample"])
def test_sender_digest_equals_receiver_recomputation_in_any_layer_order(mode):
    src = random_cache(spec(), 1)
    blocks = [3, 7, 1, 12]
    for order in ([0, 1, 2], [2, 0, 1]):
        acc = KVChecksum(mode, 3)
        for layer in order:
            acc.add(layer, src.data[layer].index_select(1, torch.tensor(blocks)))
        assert acc.digest() == checksum_blocks(src.data, blocks, mode)
    # the order of the blocks is part of what is checked
    assert checksum_blocks(src.data, blocks, mode) != checksum_blocks(src.data, blocks[::-1], mode)


def test_full_digest_sees_one_changed_value_and_sample_a_zeroed_block():
    src = random_cache(spec(), 2)
    blocks = [4, 5, 6]
    full, sample = (checksum_blocks(src.data, blocks, m) for m in ("full", "sample"))
    src.data[2, 1, 5, 3, 1, 7] += 1  # last layer, V, block 5, a late slot
    assert checksum_blocks(src.data, blocks, "full") != full
    src.data[:, :, 6] = 0  # a block that never arrived
    assert checksum_blocks(src.data, blocks, "sample") != sample


def test_digest_messages_validate():
    with pytest.raises(ValueError):
        KVDigest("off", 1)
    with pytest.raises(ValueError):
        KVDigest("full", -1)
    with pytest.raises(ValueError, match="never added"):
        KVChecksum("full", 2).digest()


# -- stale destinations, per backend ------------------------------------------------------

class Pair:
    """A prefill worker and a decode worker driven step by step on this thread."""

    def __init__(self, cfg, backend: str):
        self.cfg, self.backend = cfg, backend
        self.prefill = PrefillWorker.from_config("prefill-0", cfg, create_sender(backend))
        self.prefill.kv_checksum = "full"
        self.prefill.metrics = WorkerMetrics("demo", "prefill", "prefill-0")
        self.prefill.metrics.init_backend(backend)
        self.decodes: list[DecodeWorker] = []

    def start_decode(self, port: int = 0) -> DecodeWorker:
        """A decode worker; the same instance key each time, as Ray gives a restarted actor."""
        opts = {"port": port} if self.backend == "tcp" else {}
        worker = DecodeWorker.from_config("decode-0", self.cfg, lambda s: create_receiver(
            self.backend, s, "decode-0", instance_key="actor0", **opts))
        worker.metrics = WorkerMetrics("demo", "decode", "decode-0")
        worker.metrics.init_backend(self.backend)
        self.decodes.append(worker)
        return worker

    def prefill_into(self, rid: str, prompt, dest: KVDestination):
        self.prefill.add(PrefillRequest(rid, tuple(prompt), SamplingParams(max_tokens=MAX_TOKENS),
                                        dest))
        for _ in range(50):
            results = self.prefill.step()
            self.prefill.after_step()  # (as the step loop does)
            if results:
                return results[0]
        raise AssertionError("prefill produced no result")

    def generate(self, decode: DecodeWorker, rid: str, prompt) -> tuple[int, ...]:
        dest = decode.reserve(ReserveRequest(rid, len(prompt))).destination
        result = self.prefill_into(rid, prompt, dest)
        assert result.ok, result.error
        decode.start(StartDecode(rid, tuple(prompt), SamplingParams(max_tokens=MAX_TOKENS),
                                 result.token, dest.endpoint.incarnation, result.kv_digest,
                                 "prefill-0"))
        return (result.token.token_id, *drain(decode, rid))

    def close(self) -> None:
        self.prefill.sender.close()
        for d in self.decodes:
            d.receiver.close()


def drain(decode: DecodeWorker, rid: str) -> list[int]:
    tokens = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        batch = decode.step()
        if batch is None:  # TCP: the last frames may still be on their way
            time.sleep(0.001)
        for delta in batch.deltas if batch else ():
            if delta.request_id == rid:
                assert delta.error is None, delta.error
                tokens.extend(delta.token_ids)
                if delta.finish_reason is not None:
                    return tokens
    raise AssertionError("decode did not finish")


def failures(metrics: WorkerMetrics, backend: str, reason: str) -> float:
    return metrics.registry.get_sample_value("pdserve_kv_transfer_failures_total", {
        **metrics.labels, "backend": backend, "reason": reason})


@pytest.fixture(scope="module")
def engine_want(demo_model_dir):
    """Greedy tokens of the single-process engine for the prompts these tests send."""
    rng = random.Random(11)
    prompts = [[rng.randrange(3, 900) for _ in range(n)] for n in (37, 50, 23)]
    engine = LLMEngine.from_config(engine_config(demo_model_dir, num_kv_blocks=64))
    outs = engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS))
    return prompts, [o.token_ids for o in outs]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_write_to_a_restarted_decode_workers_old_destination_is_refused(
        demo_model_dir, engine_want, backend):
    prompts, want = engine_want
    pair = Pair(engine_config(demo_model_dir, num_kv_blocks=64), backend)
    try:
        old = pair.start_decode()
        # The prefill worker has met the old cache (attached its segment, connected).
        assert pair.generate(old, "warm", prompts[0]) == want[0]
        stale = old.reserve(ReserveRequest("r1", len(prompts[1]))).destination
        port = 0
        if backend == "tcp":  # a dead process's sockets close; the successor reuses the port
            port = int(old.receiver.endpoint.address.rsplit(":", 1)[1])
            old.receiver.close()
        # shm / in-process: the old worker is "killed": nothing of it is cleaned up.
        new = pair.start_decode(port)
        assert new.receiver.endpoint.address == old.receiver.endpoint.address
        assert new.receiver.endpoint.incarnation != stale.endpoint.incarnation
        before = new.receiver.cache.data.clone()

        result = pair.prefill_into("r1", prompts[1], stale)
        assert not result.ok and "incarnation" in result.error, result.error
        assert torch.equal(new.receiver.cache.data, before)  # not one byte written
        # both sides hold nothing for it
        assert pair.prefill.scheduler.num_unfinished == 0 and pair.prefill.blocks.usage == 0
        assert new.stats().num_reserved == 0 and new.stats().num_used_blocks == 0
        with pytest.raises(ReservationLost, match="restarted"):
            new.start(StartDecode("r1", tuple(prompts[1]), SamplingParams(max_tokens=MAX_TOKENS),
                                  result.token or _any_token(), stale.endpoint.incarnation))
        assert failures(pair.prefill.metrics, backend, "stale_incarnation") == 1
        # The new incarnation serves fresh reservations, output intact.
        assert pair.generate(new, "r2", prompts[2]) == want[2]
        assert new.stats().num_used_blocks == 0
    finally:
        pair.close()


def _any_token():
    from pdserve.engine.messages import SampledToken

    return SampledToken(5, None, ())


@pytest.mark.parametrize("backend", ["inprocess", "shm"])
def test_receiver_replaced_mid_transfer_fails_the_transfer(backend):
    s = spec()
    old, _ = create_receiver(backend, s, "decode-0", instance_key="actor0")
    sender = create_sender(backend)
    try:
        dest = KVDestination("t", old.endpoint, (2, 3), 8)
        old.expect("t", dest.block_ids)
        src = random_cache(s, 3)
        transfer = sender.begin(dest, s, "full")
        sender.send_layer(transfer, 0, src.data[0].index_select(1, torch.tensor([5, 6])))
        new, new_cache = create_receiver(backend, s, "decode-0", instance_key="actor0")
        before = new_cache.data.clone()
        for layer in (1, 2):
            sender.send_layer(transfer, layer, src.data[layer].index_select(1, torch.tensor([5, 6])))
        with pytest.raises(StaleDestination, match="after writing"):
            sender.finish(transfer)
        assert transfer.error_reason == "stale_incarnation"
        assert torch.equal(new_cache.data, before)
        # A destination of the new incarnation goes through on the same sender.
        new.expect("u", (2, 3))
        send_kv_blocks(sender, KVDestination("u", new.endpoint, (2, 3), 8), src, [5, 6])
        assert torch.equal(new_cache.data[:, :, [2, 3]], src.data[:, :, [5, 6]])
        new.close()
    finally:
        sender.close()
        old.close()


def test_tcp_connection_to_the_live_incarnation_survives_a_stale_destination():
    """A stale destination must not tear down the connection live transfers are using."""
    s = spec()
    old, _ = create_receiver("tcp", s, "decode-0")
    port = int(old.endpoint.address.rsplit(":", 1)[1])
    old.close()
    new, new_cache = create_receiver("tcp", s, "decode-0", port=port)
    sender = create_sender("tcp")
    try:
        src = random_cache(s, 4)
        new.expect("live", (1, 2))
        live = sender.begin(KVDestination("live", new.endpoint, (1, 2), 8), s)
        with pytest.raises(StaleDestination, match="at connect"):
            sender.begin(KVDestination("stale", old.endpoint, (3, 4), 8), s)
        for layer in range(s.num_layers):
            sender.send_layer(live, layer, src.data[layer].index_select(1, torch.tensor([7, 8])))
        sender.finish(live)
        assert new.wait("live", 5).value == "done"
        assert torch.equal(new_cache.data[:, :, [1, 2]], src.data[:, :, [7, 8]])
    finally:
        sender.close()
        new.close()


# -- the checksum, end to end on the workers ---------------------------------------------

def test_decode_refuses_blocks_that_changed_after_the_write(demo_model_dir, engine_want):
    prompts, want = engine_want
    pair = Pair(engine_config(demo_model_dir, num_kv_blocks=64), "shm")
    try:
        decode = pair.start_decode()
        dest = decode.reserve(ReserveRequest("r1", len(prompts[1]))).destination
        result = pair.prefill_into("r1", prompts[1], dest)
        assert result.ok and result.kv_digest.mode == "full"
        decode.receiver.cache.data[1, 0, dest.block_ids[-1]] += 1  # corrupt one block
        decode.start(StartDecode("r1", tuple(prompts[1]), SamplingParams(max_tokens=MAX_TOKENS),
                                 result.token, dest.endpoint.incarnation, result.kv_digest,
                                 "prefill-0"))
        batch = decode.step()
        (delta,) = [d for d in batch.deltas if d.request_id == "r1"]
        assert "checksum mismatch" in delta.error and "prefill-0 -> decode-0" in delta.error
        assert decode.stats().num_used_blocks == 0 and decode.stats().num_reserved == 0
        assert failures(decode.metrics, "shm", "checksum") == 1
        # the same request, written again, is admitted and decodes the engine's tokens
        assert pair.generate(decode, "r1b", prompts[1]) == want[1]
    finally:
        pair.close()


def test_router_retries_a_request_whose_kv_fails_the_checksum(demo_model_dir, engine_want):
    from pdserve.cluster.cli.client import Client, build_request
    from pdserve.cluster.launch.local import LocalCluster
    from tests.cluster_helpers import local_idle, wait_until

    prompts, want = engine_want
    with LocalCluster(engine_config(demo_model_dir, num_kv_blocks=64)) as c:
        sender = c.prefills[0].worker.sender
        real = sender._write_layer
        corrupt = {"left": 1}

        def corrupting(transfer, layer, kv):
            # after the checksum saw the payload: what lands differs from what was hashed
            if layer == 1 and corrupt["left"]:
                corrupt["left"] -= 1
                kv = kv.clone()
                kv.view(-1)[0] += 1
            real(transfer, layer, kv)

        sender._write_layer = corrupting
        with Client(c.address, timeout_s=60) as client:
            got = client.generate(build_request(prompts[0], max_tokens=MAX_TOKENS)).token_ids
        assert tuple(got) == want[0] and corrupt["left"] == 0
        assert c.server.orchestrator.retries == 1
        decode_metrics = c.decodes[0].worker.metrics
        assert failures(decode_metrics, "inprocess", "checksum") == 1
        assert wait_until(lambda: local_idle(c))


def test_shm_sender_notices_a_dead_segment_unlinked_without_retirement():
    """What happens under Ray: the SIGKILLed decode worker's resource tracker unlinks its
    segment before the restarted worker could retire it, so a sender's old mapping still
    reads LIVE. The sender must not trust it: fresh destinations land in the new cache."""
    from pdserve.kv_transfer.shm_segment import unlink_by_name

    s = spec()
    old, old_cache = create_receiver("shm", s, "decode-0", instance_key="actor0")
    sender = create_sender("shm")
    src = random_cache(s, 5)
    try:
        old.expect("a", (1, 2))
        send_kv_blocks(sender, KVDestination("a", old.endpoint, (1, 2), 8), src, [3, 4])
        stale = KVDestination("b", old.endpoint, (5, 6), 8)
        assert unlink_by_name(old.endpoint.address)  # the tracker, not the successor
        new, new_cache = create_receiver("shm", s, "decode-0", instance_key="actor0")
        new.expect("c", (1, 2))
        send_kv_blocks(sender, KVDestination("c", new.endpoint, (1, 2), 8), src, [7, 8],
                       checksum="full")
        assert torch.equal(new_cache.data[:, :, [1, 2]], src.data[:, :, [7, 8]])
        assert torch.equal(old_cache.data[:, :, [1, 2]], src.data[:, :, [3, 4]])  # untouched
        with pytest.raises(StaleDestination):
            sender.begin(stale, s)
        new.close()
    finally:
        sender.close()
        old.close()
