"""KV handoff between a prefill instance of tp=p and a decode instance of tp=d.

One process plays every rank: a "tp 1" cache of random K/V is cut into each prefill rank's
cache (its KV heads, ``kv_head_range``); every decode rank gets its own receiver over a real
backend (shared memory, TCP) and every prefill rank its own sender; each prefill rank sends
its planned head slices (``RankSends``) layer by layer. Afterwards each decode rank's
reserved blocks must equal its heads of the tp 1 cache's source blocks, and nothing else
in its cache may have changed. TCP receivers report DONE only once every sender's part has
arrived.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.kv_cache import KVCache, KVCacheSpec
from pdserve.engine.parallel.shard import kv_head_range
from pdserve.kv_transfer.base import HeadSlice, TransferError, TransferState
from pdserve.kv_transfer.messages import KVDestination
from pdserve.kv_transfer.registry import create_receiver, create_sender
from pdserve.kv_transfer.tp_destination import TPKVDestination
from pdserve.kv_transfer.tp_send import RankSends

LAYERS, BLOCKS, BLOCK, HEAD_DIM = 3, 12, 4, 8
SRC_BLOCKS = [7, 2, 9, 4]
DST_BLOCKS = [1, 10, 3, 6]
NUM_TOKENS = 14  # 4 blocks of 4


def _spec(heads: int, dtype=torch.float32) -> KVCacheSpec:
    return KVCacheSpec(LAYERS, BLOCKS, BLOCK, heads, HEAD_DIM, dtype)


def _full(num_kv_heads: int, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(num_kv_heads)
    return torch.randn(_spec(num_kv_heads).shape, generator=g).to(dtype)


def _decode_instance(backend: str, num_kv_heads: int, d: int, dtype, tid: str):
    receivers = []
    for r in range(d):
        heads = len(kv_head_range(num_kv_heads, d, r))
        receiver, _ = create_receiver(backend, _spec(heads, dtype), f"dec-{tid}-{r}")
        receiver.expect(tid, DST_BLOCKS)
        receivers.append(receiver)
    dest = TPKVDestination(tid, tuple(x.endpoint for x in receivers), DST_BLOCKS, NUM_TOKENS,
                           num_kv_heads)
    return receivers, dest


def _prefill_caches(full: torch.Tensor, num_kv_heads: int, p: int) -> list[KVCache]:
    out = []
    for r in range(p):
        h = kv_head_range(num_kv_heads, p, r)
        data = full[:, :, :, :, h.start:h.stop].contiguous()
        out.append(KVCache(_spec(len(h), full.dtype), "cpu", buffer=data))
    return out


def _send_rank(sender, dest, rank: int, p: int, cache: KVCache) -> RankSends:
    sends = RankSends.begin(sender, dest, rank, p, cache.spec)
    idx = torch.tensor(SRC_BLOCKS)
    for layer in range(LAYERS):
        sends.send_layer(layer, cache.data[layer].index_select(1, idx))
    sends.finish(timeout=10)
    return sends


CASES = [(4, 1, 2), (4, 2, 1), (4, 2, 2), (4, 4, 2),
         (2, 4, 2),  # prefill replicates each KV head on two ranks
         (2, 1, 4)]  # decode does


@pytest.mark.parametrize("backend", ["shm", "tcp"])
@pytest.mark.parametrize("num_kv_heads, p, d", CASES)
def test_decode_ranks_hold_their_heads_of_the_tp1_cache(backend, num_kv_heads, p, d):
    dtype = torch.bfloat16 if d == 2 else torch.float32  # 2-byte and 4-byte elements
    tid = f"t-{num_kv_heads}-{p}-{d}"
    full = _full(num_kv_heads, dtype)
    receivers, dest = _decode_instance(backend, num_kv_heads, d, dtype, tid)
    senders = [create_sender(backend) for _ in range(p)]
    try:
        written = set()
        for rank, cache in enumerate(_prefill_caches(full, num_kv_heads, p)):
            written |= set(_send_rank(senders[rank], dest, rank, p, cache).receivers)
        assert written == set(range(d))
        for r, receiver in enumerate(receivers):
            if backend == "tcp":  # the receiver sees the frames itself
                assert receiver.wait(tid, timeout=10) is TransferState.DONE
            h = kv_head_range(num_kv_heads, d, r)
            got = receiver.cache.data
            want = full[:, :, SRC_BLOCKS, :, h.start:h.stop]
            assert torch.equal(got[:, :, DST_BLOCKS], want)
            others = [b for b in range(BLOCKS) if b not in DST_BLOCKS]
            assert not got[:, :, others].any()  # nothing written outside the reservation
    finally:
        for s in senders:
            s.close()
        for receiver in receivers:
            receiver.close()


def test_tcp_transfer_is_done_only_when_every_senders_part_arrived():
    """Decode tp 1 (4 heads) fed by prefill tp 2: after the first rank's DONE the transfer
    still waits; the second's completes it. A sender's DONE with a layer missing fails it."""
    full = _full(4, torch.float32)
    receivers, dest = _decode_instance("tcp", 4, 1, torch.float32, "parts")
    receiver = receivers[0]
    caches = _prefill_caches(full, 4, 2)
    senders = [create_sender("tcp") for _ in range(2)]
    try:
        _send_rank(senders[0], dest, 0, 2, caches[0])
        assert not receiver.state("parts").terminal  # rank 1's heads are missing
        _send_rank(senders[1], dest, 1, 2, caches[1])
        assert receiver.wait("parts", timeout=10) is TransferState.DONE

        receiver.expect("short", DST_BLOCKS)
        short = RankSends.begin(senders[0], TPKVDestination(
            "short", dest.endpoints, DST_BLOCKS, NUM_TOKENS, 4), 0, 2, caches[0].spec)
        transfer = short.parts[0][1]
        idx = torch.tensor(SRC_BLOCKS)
        senders[0].send_layer(transfer, 0, caches[0].data[0].index_select(1, idx)[:, :, :, 0:2])
        # finish() refuses to claim a transfer with layers missing; a peer that claims
        # anyway (its DONE naming its heads) fails it at the receiver.
        transfer.layers_sent = LAYERS
        transfer._sent = set(range(LAYERS))
        senders[0].finish(transfer, timeout=10)
        assert receiver.wait("short", timeout=10) is TransferState.FAILED
    finally:
        for s in senders:
            s.close()
        receiver.close()


def test_head_slices_are_checked_before_anything_is_written():
    receiver, _ = create_receiver("shm", _spec(2), "dec-check")
    sender = create_sender("shm")
    try:
        receiver.expect("x", DST_BLOCKS)
        dest = KVDestination("x", receiver.endpoint, DST_BLOCKS, NUM_TOKENS)
        with pytest.raises(TransferError, match="num_kv_heads 4 != 2"):  # whole caches agree
            sender.begin(dest, _spec(4))
        with pytest.raises(TransferError, match="exceeds the receiver"):
            sender.begin(dest, _spec(4), heads=HeadSlice(0, 1, 2))
        with pytest.raises(TransferError, match="exceeds the sender"):
            sender.begin(dest, _spec(4), heads=HeadSlice(3, 0, 2))
        with pytest.raises(TransferError, match="checksums"):
            sender.begin(dest, _spec(4), checksum="full", heads=HeadSlice(0, 0, 1))
        transfer = sender.begin(dest, _spec(4), heads=HeadSlice(2, 1, 1))
        kv = _full(4, torch.float32)[0].index_select(1, torch.tensor(SRC_BLOCKS))
        with pytest.raises(TransferError, match="expected"):  # a payload of all 4 heads
            sender.send_layer(transfer, 0, kv)
        assert transfer.state is TransferState.FAILED
        assert not receiver.cache.data.any()
    finally:
        sender.close()
        receiver.close()


def test_destination_must_match_the_decode_degree():
    receivers = [create_receiver("shm", _spec(2), f"dec-deg-{r}")[0] for r in range(2)]
    try:
        eps = tuple(x.endpoint for x in receivers)
        TPKVDestination("ok", eps, DST_BLOCKS, NUM_TOKENS, 4)
        with pytest.raises(ValueError, match="holds 4 of 4"):  # one rank would hold all 4
            TPKVDestination("bad", eps[:1], DST_BLOCKS, NUM_TOKENS, 4)
        with pytest.raises(ValueError, match="holds 1 of 2"):
            TPKVDestination("bad", eps, DST_BLOCKS, NUM_TOKENS, 2)
    finally:
        for receiver in receivers:
            receiver.close()
