"""CUDA IPC backend: a spawned prefill process writes into a decode process's GPU cache.

Needs a CUDA GPU (skipped otherwise). The sender process rebuilds its source cache from a
seed, so nothing but the typed endpoint crosses the process boundary. Both ways of sending
land the same bytes: ``send_layer`` per layer (queued, then written after one stream wait
at ``finish`` or every ``FLUSH_LAYERS`` layers: one copy per layer) and one stacked
``send_layers`` (one stream wait, one copy for every layer).
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.multiprocessing as tmp

from pdserve.engine.kv_cache import KVCache, KVCacheSpec
from pdserve.kv_transfer.base import KVDestination, KVEndpoint, TransferState
from pdserve.kv_transfer.registry import create_receiver, create_sender

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

SPEC = KVCacheSpec(num_layers=4, num_blocks=64, block_size=16, num_kv_heads=2, head_dim=64,
                   dtype=torch.bfloat16)
SRC_SPEC = KVCacheSpec(4, 80, 16, 2, 64, torch.bfloat16)


def source(device: str, seed: int) -> KVCache:
    g = torch.Generator().manual_seed(seed)
    return KVCache(SRC_SPEC, buffer=torch.randn(SRC_SPEC.shape, generator=g)
                   .to(SRC_SPEC.dtype).to(device))


def _sender(endpoint: KVEndpoint, dst_ids, src_ids, seed: int, out, mode="per_layer") -> None:
    try:
        src = source("cuda", seed)
        sender = create_sender("cuda_ipc")
        dest = KVDestination("gpu", endpoint, tuple(dst_ids), len(dst_ids) * SPEC.block_size)
        t = sender.begin(dest, src.spec)
        idx = torch.tensor(src_ids, device="cuda")
        if mode == "stacked":
            sender.send_layers(t, 0, src.data.index_select(2, idx))
        else:
            for layer in range(SPEC.num_layers):
                sender.send_layer(t, layer, src.data[layer].index_select(1, idx))
        sender.finish(t, timeout=30)
        launches, waits = t.context.launches, t.context.waits
        sender.close()
        out.put(("ok", t.state.value, launches, waits))
    except BaseException as exc:
        out.put(("error", repr(exc)))


# (launches, stream waits) for SPEC's 4 layers, fewer than FLUSH_LAYERS: per layer, all
# queued until finish writes them after one wait; stacked, one copy.
LAUNCHES = {"per_layer": (SPEC.num_layers, 1), "stacked": (1, 1)}


@pytest.mark.parametrize("mode", ["per_layer", "stacked"])
def test_cuda_ipc_cross_process(mode):
    receiver, cache = create_receiver("cuda_ipc", SPEC, "decode-gpu", "cuda")
    try:
        rng = random.Random(0)
        src_ids, dst_ids = rng.sample(range(80), 9), rng.sample(range(64), 9)
        receiver.expect("gpu", dst_ids)
        ctx = tmp.get_context("spawn")
        out = ctx.Queue()
        proc = ctx.Process(target=_sender, args=(receiver.endpoint, dst_ids, src_ids, 5, out,
                                                 mode))
        proc.start()
        assert out.get(timeout=120) == ("ok", "done", *LAUNCHES[mode])
        proc.join(60)
        receiver.mark_delivered("gpu")
        assert receiver.wait("gpu", 1) is TransferState.DONE
        torch.cuda.synchronize()
        got = cache.data.cpu()
        expected = source("cpu", 5)
        assert torch.equal(got[:, :, dst_ids], expected.data[:, :, src_ids])
        untouched = [b for b in range(SPEC.num_blocks) if b not in dst_ids]
        assert not got[:, :, untouched].any()
    finally:
        receiver.close()


def test_cuda_ipc_refuses_a_destination_of_a_replaced_cache():
    """A restarted decode worker (same instance key) retires its predecessor's stamp: a
    destination reserved on the old cache is refused before the handle is even opened,
    the new cache is untouched, and a destination of the new cache works."""
    from pdserve.kv_transfer.base import StaleDestination

    old, _ = create_receiver("cuda_ipc", SPEC, "decode-gpu", "cuda", instance_key="actor0")
    new, cache = create_receiver("cuda_ipc", SPEC, "decode-gpu", "cuda", instance_key="actor0")
    try:
        before = cache.data.clone()
        sender = create_sender("cuda_ipc")
        with pytest.raises(StaleDestination, match="reserved on incarnation"):
            sender.begin(KVDestination("stale", old.endpoint, (1, 2), 32), SRC_SPEC)
        sender.close()
        torch.cuda.synchronize()
        assert torch.equal(cache.data, before)
        new.expect("gpu", [3, 4])
        ctx = tmp.get_context("spawn")
        out = ctx.Queue()
        proc = ctx.Process(target=_sender, args=(new.endpoint, [3, 4], [7, 8], 6, out))
        proc.start()
        assert out.get(timeout=120)[:2] == ("ok", "done")
        proc.join(60)
        torch.cuda.synchronize()
        assert torch.equal(cache.data.cpu()[:, :, [3, 4]], source("cpu", 6).data[:, :, [7, 8]])
    finally:
        new.close()
        old.close()
