"""KV transfer: every CPU backend moves blocks exactly, across processes where it matters.

Round trips copy a random source cache's blocks (scattered source ids) into scattered
reserved blocks of a zeroed decode cache, layer by layer, and check that exactly those
blocks changed. The shm and tcp senders also run in a spawned process, as workers do.
TCP protocol robustness lives in test_kv_transfer_tcp.py.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pdserve.engine.kv_cache import KVCache, KVCacheSpec
from pdserve.kv_transfer.base import (
    KVDestination,
    KVEndpoint,
    Transfer,
    TransferError,
    TransferState,
    send_kv_blocks,
)
from pdserve.kv_transfer.block_copy import BlockWriter, tensor_bytes
from pdserve.kv_transfer.incarnation import STAMP_BYTES
from pdserve.kv_transfer.messages import KVCacheSpecMsg
from pdserve.kv_transfer.registry import BACKENDS, create_receiver, create_sender
from pdserve.kv_transfer.shm_segment import ShmSegment
from pdserve.kv_transfer.tracker import TransferTable

CPU_BACKENDS = ("inprocess", "shm", "tcp")
DIRECT_WRITE = ("inprocess", "shm")  # the decode side learns of delivery via mark_delivered


def make_spec(num_blocks: int = 24, dtype: torch.dtype = torch.bfloat16, **kw) -> KVCacheSpec:
    args = dict(num_layers=3, block_size=4, num_kv_heads=2, head_dim=8) | kw
    return KVCacheSpec(num_blocks=num_blocks, dtype=dtype, **args)


def source_cache(spec: KVCacheSpec, seed: int) -> KVCache:
    """Deterministic from the seed, so a spawned sender can rebuild the same source."""
    g = torch.Generator().manual_seed(seed)
    return KVCache(spec, buffer=torch.randn(spec.shape, generator=g).to(spec.dtype))


def pick_ids(seed: int, num_src_blocks: int, num_dst_blocks: int, n: int):
    rng = random.Random(seed)
    return rng.sample(range(num_src_blocks), n), rng.sample(range(num_dst_blocks), n)


def assert_landed(dst: KVCache, src: KVCache, dst_ids, src_ids) -> None:
    assert torch.equal(dst.data[:, :, list(dst_ids)], src.data[:, :, list(src_ids)])
    untouched = torch.ones(dst.spec.num_blocks, dtype=torch.bool)
    untouched[list(dst_ids)] = False
    assert not dst.data[:, :, untouched].any(), "blocks outside the reservation changed"


def send_layer_by_layer(sender, dest: KVDestination, src: KVCache, src_ids) -> Transfer:
    t = sender.begin(dest, src.spec)
    assert t.state is TransferState.PENDING
    idx = torch.tensor(src_ids)
    for layer in reversed(range(src.spec.num_layers)):  # any order is fine
        sender.send_layer(t, layer, src.data[layer].index_select(1, idx))
        assert t.state is TransferState.TRANSFERRING
    sender.finish(t, timeout=10)
    assert t.state is TransferState.DONE and t.layers_sent == src.spec.num_layers
    return t


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def pair(backend):
    receiver, cache = create_receiver(backend, make_spec(), "decode-0")
    sender = create_sender(backend)
    yield receiver, cache, sender
    sender.close()
    receiver.close()


# --- round trips --------------------------------------------------------------------------


def test_roundtrip_layer_by_layer(backend, pair):
    receiver, cache, sender = pair
    src = source_cache(make_spec(num_blocks=40), seed=1)
    src_ids, dst_ids = pick_ids(1, 40, 24, 5)
    receiver.expect("req-1", dst_ids)
    assert receiver.state("req-1") is TransferState.PENDING
    dest = KVDestination("req-1", receiver.endpoint, tuple(dst_ids), num_tokens=19)
    t = send_layer_by_layer(sender, dest, src, src_ids)
    assert t.bytes_sent == 3 * 2 * 5 * cache.spec.block_bytes_per_layer
    if backend in DIRECT_WRITE:
        assert receiver.state("req-1") is TransferState.PENDING
        receiver.mark_delivered("req-1")
    assert receiver.wait("req-1", timeout=5) is TransferState.DONE
    assert_landed(cache, src, dst_ids, src_ids)
    receiver.forget("req-1")
    with pytest.raises(KeyError):
        receiver.state("req-1")
    receiver.mark_delivered("req-1")  # late news of a forgotten transfer: ignored


def test_many_transfers_reuse_one_attachment(backend, pair):
    receiver, cache, sender = pair
    src = source_cache(make_spec(num_blocks=40), seed=2)
    dst_all = random.Random(2).sample(range(24), 12)
    for i in range(3):
        dst_ids, src_ids = dst_all[4 * i:4 * i + 4], [3 * i, 3 * i + 1, 39 - i, 20 + i]
        receiver.expect(f"r{i}", dst_ids)
        send_kv_blocks(sender, KVDestination(f"r{i}", receiver.endpoint, dst_ids, 16), src,
                       src_ids)
        receiver.mark_delivered(f"r{i}")
        assert receiver.wait(f"r{i}", 5) is TransferState.DONE
        assert torch.equal(cache.data[:, :, dst_ids], src.data[:, :, src_ids])


def _spawned_sender(endpoint: KVEndpoint, dst_ids, src_ids, seed: int, src_blocks: int,
                    out) -> None:
    """Runs in a spawned process: the prefill side, with nothing shared but the endpoint."""
    try:
        spec = endpoint.spec
        src = source_cache(make_spec(src_blocks, spec.torch_dtype, num_layers=spec.num_layers,
                                     block_size=spec.block_size, num_kv_heads=spec.num_kv_heads,
                                     head_dim=spec.head_dim), seed)
        sender = create_sender(endpoint.backend)
        dest = KVDestination("xproc", endpoint, tuple(dst_ids), len(dst_ids) * spec.block_size)
        t = send_layer_by_layer(sender, dest, src, src_ids)
        sender.close()
        out.send(("ok", t.state.value))
    except BaseException as exc:  # report, do not hang the parent
        out.send(("error", repr(exc)))


def run_spawned_sender(endpoint: KVEndpoint, dst_ids, src_ids, seed: int, src_blocks: int):
    ctx = mp.get_context("spawn")
    recv_end, send_end = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_spawned_sender,
                       args=(endpoint, dst_ids, src_ids, seed, src_blocks, send_end))
    proc.start()
    try:
        assert recv_end.poll(60), "spawned sender did not report"
        assert recv_end.recv() == ("ok", "done")
    finally:
        proc.join(30)
    assert proc.exitcode == 0


@pytest.mark.parametrize("name", ["shm", "tcp"])
def test_sender_in_another_process(name):
    spec = make_spec(num_blocks=32, dtype=torch.float16)
    receiver, cache = create_receiver(name, spec, "decode-x")
    try:
        src_ids, dst_ids = pick_ids(7, 50, 32, 6)
        receiver.expect("xproc", dst_ids)
        run_spawned_sender(receiver.endpoint, dst_ids, src_ids, seed=7, src_blocks=50)
        if name == "shm":
            # The sender process is gone and did not take the segment with it.
            assert ShmSegment.attach(receiver.endpoint.address).size >= spec.nbytes
            receiver.mark_delivered("xproc")
        assert receiver.wait("xproc", 10) is TransferState.DONE
        expected = source_cache(make_spec(50, torch.float16), seed=7)
        assert_landed(cache, expected, dst_ids, src_ids)
    finally:
        receiver.close()
    if name == "shm":
        with pytest.raises(FileNotFoundError):
            ShmSegment.attach(receiver.endpoint.address)
        if os.path.isdir("/dev/shm"):
            assert not os.path.exists(f"/dev/shm/{receiver.endpoint.address}")


def test_shm_sender_close_does_not_unlink():
    receiver, cache = create_receiver("shm", make_spec(), "decode-s")
    try:
        sender = create_sender("shm")
        receiver.expect("a", [1, 2])
        send_kv_blocks(sender, KVDestination("a", receiver.endpoint, (1, 2), 8),
                       source_cache(make_spec(), 3), [5, 6])
        sender.close()
        cache.data[0, 0, 0].fill_(1.0)  # the receiver's mapping is still alive and shared
        seg = ShmSegment.attach(receiver.endpoint.address)
        view = seg.tensor(cache.spec.shape, cache.spec.dtype, offset=STAMP_BYTES)
        assert torch.equal(view, cache.data)
        del view
        seg.close()
    finally:
        receiver.close()


def test_shm_receiver_needs_cpu():
    with pytest.raises(ValueError, match="host memory"):
        create_receiver("shm", make_spec(), "d", "meta")


# --- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize("change", [
    dict(num_layers=4), dict(block_size=8), dict(num_kv_heads=1), dict(head_dim=16),
    dict(dtype=torch.float32),
])
def test_spec_mismatch_fails_at_begin(change):
    receiver, _ = create_receiver("inprocess", make_spec(), "d")
    sender = create_sender("inprocess")
    receiver.expect("r", [0])
    src_spec = make_spec(**({"num_blocks": 50} | change))
    with pytest.raises(TransferError, match="specs differ") as err:
        sender.begin(KVDestination("r", receiver.endpoint, (0,), 4), src_spec)
    assert err.value.transfer_id == "r"
    # A different number of blocks is fine: only the block shape must agree.
    sender.begin(KVDestination("r", receiver.endpoint, (0,), 4), make_spec(num_blocks=99))
    receiver.close()


def test_wrong_number_of_blocks_fails():
    receiver, _ = create_receiver("inprocess", make_spec(), "d")
    sender = create_sender("inprocess")
    with pytest.raises(TransferError, match="need 3 blocks"):
        sender.begin(KVDestination("r", receiver.endpoint, (0, 1), 9), make_spec())
    t = sender.begin(KVDestination("r", receiver.endpoint, (0, 1), 8), make_spec())
    with pytest.raises(TransferError, match="layer payload"):
        sender.send_layer(t, 0, torch.zeros(2, 3, 4, 2, 8, dtype=torch.bfloat16))
    assert t.state is TransferState.FAILED
    receiver.close()


def test_send_layer_and_finish_checks():
    receiver, _ = create_receiver("inprocess", make_spec(), "d")
    sender = create_sender("inprocess")
    dest = KVDestination("r", receiver.endpoint, (3,), 2)
    kv = torch.zeros(2, 1, 4, 2, 8, dtype=torch.bfloat16)
    t = sender.begin(dest, make_spec())
    with pytest.raises(TransferError, match="out of range"):
        sender.send_layer(t, 3, kv)
    assert t.state is TransferState.FAILED  # every TransferError fails the transfer
    with pytest.raises(TransferError, match="already failed"):
        sender.send_layer(t, 1, kv)
    t = sender.begin(dest, make_spec())
    sender.send_layer(t, 0, kv)
    with pytest.raises(TransferError, match="already sent"):
        sender.send_layer(t, 0, kv)
    t = sender.begin(dest, make_spec())
    sender.send_layer(t, 0, kv)
    with pytest.raises(TransferError, match="before layers"):
        sender.finish(t)
    assert t.state is TransferState.FAILED
    with pytest.raises(TransferError, match="failed"):
        sender.finish(t)
    t2 = sender.begin(dest, make_spec())
    sender.abort(t2)
    sender.abort(t2)  # idempotent
    assert t2.state is TransferState.FAILED
    with pytest.raises(TransferError, match="backend"):
        create_sender("shm").begin(dest, make_spec())
    receiver.close()
    with pytest.raises(TransferError, match="no in-process receiver"):
        sender.begin(dest, make_spec())


def test_messages_validate():
    msg = KVCacheSpecMsg.from_spec(make_spec())
    assert msg.dtype == "bfloat16" and msg.to_spec() == make_spec()
    with pytest.raises(ValueError, match="dtype"):
        KVCacheSpecMsg(1, 1, 1, 1, 1, "float99")
    with pytest.raises(ValueError, match="dtype"):
        KVCacheSpecMsg(1, 1, 1, 1, 1, "__class__")
    with pytest.raises(ValueError, match="num_blocks"):
        KVCacheSpecMsg(1, 0, 1, 1, 1, "float32")
    ep = KVEndpoint("tcp", "w", "h:1", msg, "a" * 32)
    with pytest.raises(ValueError):
        KVEndpoint("tcp", "", "h:1", msg, "a" * 32)
    with pytest.raises(ValueError, match="incarnation"):
        KVEndpoint("tcp", "w", "h:1", msg, "")
    for bad_ids in ((), (1, 1), (-1,), (24,)):
        with pytest.raises(ValueError):
            KVDestination("r", ep, bad_ids, 4)
    with pytest.raises(ValueError, match="transfer_id"):
        KVDestination("", ep, (1,), 4)
    assert KVDestination("r", ep, [np.int64(2)], 1).block_ids == (2,)


def test_receiver_expect_validates_and_wait_times_out():
    receiver, _ = create_receiver("inprocess", make_spec(), "d")
    with pytest.raises(ValueError):
        receiver.expect("r", [0, 0])
    with pytest.raises(ValueError):
        receiver.expect("r", [24])
    receiver.expect("r", [0])
    with pytest.raises(ValueError, match="already"):
        receiver.expect("r", [1])
    assert receiver.wait("r", timeout=0.05) is TransferState.PENDING
    receiver.close()  # unfinished transfers fail, waiters wake
    assert receiver.wait("r", timeout=5) is TransferState.FAILED
    with pytest.raises(KeyError):
        receiver.wait("nope", 0)


def test_terminal_states_are_final():
    table = TransferTable(num_layers=2, num_blocks=4)
    table.expect("a", [0])
    table.expect("b", [1])
    assert table.claim("a", owner=1)
    table.note_layer("a", 0)
    assert table.complete("a") is TransferState.FAILED  # a layer is missing
    assert not table.claim("a", owner=1)
    table.note_layer("b", 0)
    table.note_layer("b", 1)
    assert table.complete("b") is TransferState.DONE
    assert not table.transition("b", TransferState.FAILED)
    assert table.fail_owned_by(1, "gone") == []


def test_registry():
    assert set(BACKENDS) == {"inprocess", "shm", "tcp", "cuda_ipc"}
    with pytest.raises(ValueError, match="unknown KV transfer backend"):
        create_sender("carrier-pigeon")
    # Importing the CUDA backend is harmless without a GPU; using it on the CPU is not.
    with pytest.raises(ValueError, match="CUDA"):
        create_receiver("cuda_ipc", make_spec(), "d", "cpu")
    # Worker call sites pass their whole config to any backend.
    r, _ = create_receiver("inprocess", make_spec(), "d", bind_host="0.0.0.0", auth_token="x")
    r.close()


# --- the copy kernel ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype,head_dim", [(torch.bfloat16, 8), (torch.float16, 3),
                                            (torch.float32, 5), (torch.uint8, 7)])
def test_block_writer_matches_index_copy(dtype, head_dim):
    spec = make_spec(num_blocks=10, dtype=dtype, head_dim=head_dim, block_size=3)
    ours, ref = KVCache(spec), KVCache(spec)
    ids = [9, 0, 4]
    kv = torch.randint(0, 100, (2, 3, 3, 2, head_dim)).to(dtype)
    writer = BlockWriter(ours.data)
    writer.write(1, writer.index(ids), kv)
    writer.write_bytes(2, writer.index(ids), tensor_bytes(kv.contiguous()).copy())
    for layer in (1, 2):
        ref.data[layer].index_copy_(1, torch.tensor(ids), kv)
    assert torch.equal(ours.data, ref.data)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_inprocess_random_layouts(data):
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    spec = make_spec(num_blocks=data.draw(st.integers(1, 12)), dtype=dtype,
                     num_layers=data.draw(st.integers(1, 3)),
                     block_size=data.draw(st.integers(1, 5)),
                     num_kv_heads=data.draw(st.integers(1, 2)),
                     head_dim=data.draw(st.integers(1, 6)))
    n = data.draw(st.integers(1, spec.num_blocks))
    dst_ids = data.draw(st.permutations(range(spec.num_blocks)))[:n]
    src_spec = make_spec(num_blocks=n + data.draw(st.integers(0, 5)), dtype=dtype,
                         num_layers=spec.num_layers, block_size=spec.block_size,
                         num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim)
    src_ids = data.draw(st.permutations(range(src_spec.num_blocks)))[:n]
    num_tokens = (n - 1) * spec.block_size + data.draw(st.integers(1, spec.block_size))
    receiver, cache = create_receiver("inprocess", spec, "d")
    try:
        receiver.expect("r", dst_ids)
        src = source_cache(src_spec, seed=n)
        send_kv_blocks(create_sender("inprocess"),
                       KVDestination("r", receiver.endpoint, tuple(dst_ids), num_tokens),
                       src, src_ids)
        assert_landed(cache, src, dst_ids, src_ids)
    finally:
        receiver.close()
