"""Stacked sends (several layers in one call) and the CUDA IPC sender's batching, exercised
on the CPU: ``send_layers`` lands the same bytes as ``send_layer`` per layer with the same
checks; the CUDA IPC writer moves all stacked layers in one ``index_copy_`` over its row
index; its sender queues single layers and writes them in batches. (The copy stream and
completion event need CUDA: tests/gpu/test_cuda_ipc_transfer.py.)"""

from __future__ import annotations

import pytest
import torch

from pdserve.engine.kv_cache import KVCache, KVCacheSpec
from pdserve.kv_transfer.base import KVDestination, Transfer, TransferError, TransferState
from pdserve.kv_transfer.cuda_ipc import CudaIpcSender, _Context, _WideWriter, stacked_row_index
from pdserve.kv_transfer.registry import create_receiver, create_sender


def spec(num_blocks: int, layers: int = 4) -> KVCacheSpec:
    return KVCacheSpec(num_layers=layers, num_blocks=num_blocks, block_size=4, num_kv_heads=2,
                       head_dim=8, dtype=torch.bfloat16)


def source(s: KVCacheSpec, seed: int = 0) -> KVCache:
    g = torch.Generator().manual_seed(seed)
    return KVCache(s, buffer=torch.randn(s.shape, generator=g).to(s.dtype))


def test_stacked_row_index_matches_the_layer_kv_block_loop():
    blocks = torch.tensor([5, 0, 3])
    n = 7  # blocks in the cache
    want = [(layer * 2 + kv) * n + b for layer in (2, 3) for kv in (0, 1) for b in (5, 0, 3)]
    assert stacked_row_index(range(2, 4), n, blocks).tolist() == want


@pytest.mark.parametrize("backend", ["inprocess", "shm"])
def test_send_layers_lands_what_send_layer_per_layer_lands(backend):
    s = spec(10)
    src = source(spec(12), seed=3)
    src_ids, dst_ids = [4, 9, 1], [7, 2, 5]
    caches = []
    for stacked in (False, True):
        receiver, cache = create_receiver(backend, s, f"d-{stacked}")
        sender = create_sender(backend)
        try:
            receiver.expect("t", dst_ids)
            t = sender.begin(KVDestination("t", receiver.endpoint, tuple(dst_ids), 12), s,
                             checksum="full")
            idx = torch.tensor(src_ids)
            if stacked:
                sender.send_layers(t, 0, src.data[:2].index_select(2, idx))
                sender.send_layers(t, 2, src.data[2:].index_select(2, idx))
            else:
                for layer in range(s.num_layers):
                    sender.send_layer(t, layer, src.data[layer].index_select(1, idx))
            sender.finish(t)
            assert t.state is TransferState.DONE and t.layers_sent == s.num_layers
            assert t.bytes_sent == s.num_layers * 2 * 3 * s.block_bytes_per_layer
            caches.append((cache.data.clone(), t.digest()))
        finally:
            sender.close()
            receiver.close()
    (per_layer, d1), (stacked, d2) = caches
    assert torch.equal(per_layer, stacked)
    assert torch.equal(stacked[:, :, dst_ids], src.data[:, :, src_ids])
    assert d1 == d2  # the checksum sees the same layers either way


def test_send_layers_checks_like_send_layer():
    s = spec(10)
    receiver, _ = create_receiver("inprocess", s, "d")
    sender = create_sender("inprocess")
    try:
        def begin(tid):
            receiver.expect(tid, [1, 2])
            return sender.begin(KVDestination(tid, receiver.endpoint, (1, 2), 8), s)

        kv = torch.zeros(2, 2, 2, 4, 2, 8, dtype=torch.bfloat16)
        t = begin("a")
        sender.send_layers(t, 0, kv)
        with pytest.raises(TransferError, match="already sent"):
            sender.send_layers(t, 1, kv)  # layer 1 again
        assert t.state is TransferState.FAILED
        with pytest.raises(TransferError, match="out of range"):
            sender.send_layers(begin("b"), 3, kv)  # layers 3 and 4 of 4
        with pytest.raises(TransferError, match="layer payload is"):
            sender.send_layers(begin("c"), 0, kv[:, :, :1])  # one block, not two
        with pytest.raises(TransferError, match="stacked layer payload"):
            sender.send_layers(begin("d"), 0, kv[0])
    finally:
        sender.close()
        receiver.close()


def test_wide_writer_writes_every_stacked_layer_in_one_copy():
    s = spec(9)
    src = source(spec(9), seed=1)
    dst_ids = [8, 0, 4]
    per_layer = torch.zeros(s.shape, dtype=s.dtype)
    stacked = torch.zeros(s.shape, dtype=s.dtype)
    payload = src.data[:, :, [1, 2, 3]].contiguous()  # [L, 2, 3, P, H, D]
    w1, w2 = _WideWriter(per_layer), _WideWriter(stacked)
    idx = w1.index(dst_ids)
    for layer in range(s.num_layers):
        w1.write(layer, idx, payload[layer])
    assert w2.write_stacked(0, idx, payload) == 1
    assert torch.equal(per_layer, stacked)
    assert torch.equal(stacked[:, :, dst_ids], payload)
    untouched = [b for b in range(9) if b not in dst_ids]
    assert not stacked[:, :, untouched].any()
    # a head window cannot use whole rows: one write per layer, still exact
    heads = torch.zeros(s.shape, dtype=s.dtype)
    w3 = _WideWriter(heads)
    assert w3.write_stacked(1, idx, payload[1:3, :, :, :, :1], heads=(1, 1)) == 2
    assert torch.equal(heads[1:3, :, dst_ids, :, 1:], payload[1:3, :, :, :, :1])
    assert not heads[:, :, :, :, :1].any() and not heads[0].any() and not heads[3].any()


def _cpu_transfer(cache: torch.Tensor, dst_ids) -> Transfer:
    """A transfer whose context is a CUDA IPC context over a CPU cache: no copy stream
    (``torch.cuda.stream(None)`` does nothing) and CPU payloads (no stream waits)."""
    t = Transfer.__new__(Transfer)
    t.heads, t.bytes_sent = None, 0
    writer = _WideWriter(cache)
    t.context = _Context(writer, writer.index(dst_ids), None)
    return t


def test_cuda_ipc_sender_queues_single_layers_and_writes_them_in_batches():
    layers = 10
    s = spec(6, layers=layers)
    src = source(spec(6, layers=layers), seed=2)
    dst = torch.zeros(s.shape, dtype=s.dtype)
    dst_ids = [5, 1]
    t = _cpu_transfer(dst, dst_ids)
    sender = CudaIpcSender()
    flush = sender.FLUSH_LAYERS
    assert 1 < flush < layers
    payload = src.data[:, :, [0, 3]].contiguous()
    for layer in range(flush - 1):
        sender._write_layer(t, layer, payload[layer])
    # queued, nothing written yet
    assert len(t.context.queued) == flush - 1 and t.context.launches == 0 and not dst.any()
    sender._write_layer(t, flush - 1, payload[flush - 1])
    assert t.context.queued == [] and t.context.launches == flush
    assert torch.equal(dst[:flush, :, dst_ids], payload[:flush])
    # the rest stacked: the queue is flushed first, then one copy for all of them
    sender._write_layer(t, flush, payload[flush])
    sender._write_layers(t, flush + 1, payload[flush + 1:])
    assert t.context.launches == flush + 1 + 1
    assert torch.equal(dst[:, :, dst_ids], payload)
    assert t.bytes_sent == layers * 2 * len(dst_ids) * s.block_bytes_per_layer
    assert t.context.waits == 0  # CPU payloads: nothing to wait for
