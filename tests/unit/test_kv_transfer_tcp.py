"""TCP backend robustness: what a hostile or broken peer can and cannot do to a receiver.

Raw sockets speak the frame format by hand (``framing.encode_header``) to send garbage,
truncated or mislabelled frames; the receiver must drop the offending connection (or just
the offending frames) and keep serving everyone else, never writing unreserved blocks.
"""

from __future__ import annotations

import dataclasses
import socket
import struct
import threading
import time

import pytest
import torch

from pdserve.engine.kv_cache import KVCache, KVCacheSpec
from pdserve.kv_transfer.base import KVDestination, TransferError, TransferState, send_kv_blocks
from pdserve.kv_transfer.framing import (
    HEADER_SIZE,
    FrameHeader,
    MsgType,
    ProtocolError,
    decode_header,
    decode_transfer_id,
    encode_header,
    read_frame_start,
)
from pdserve.kv_transfer.registry import create_receiver, create_sender
from pdserve.kv_transfer.tcp import parse_address

SPEC = KVCacheSpec(num_layers=2, num_blocks=16, block_size=4, num_kv_heads=2, head_dim=4,
                   dtype=torch.float32)
SRC_SPEC = KVCacheSpec(2, 32, 4, 2, 4, torch.float32)


def source(seed: int = 0) -> KVCache:
    g = torch.Generator().manual_seed(seed)
    return KVCache(SRC_SPEC, buffer=torch.randn(SRC_SPEC.shape, generator=g))


@pytest.fixture
def no_thread_leaks():
    baseline = threading.active_count()
    yield
    deadline = time.monotonic() + 5
    while threading.active_count() > baseline and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == baseline, threading.enumerate()


@pytest.fixture
def rx(no_thread_leaks):
    receiver, cache = create_receiver("tcp", SPEC, "decode-0")
    yield receiver, cache
    receiver.close()


def raw_connect(receiver, token: str = "", worker_id: str | None = None,
                handshake: bool = True) -> socket.socket:
    sock = socket.create_connection(parse_address(receiver.endpoint.address), timeout=5)
    if handshake:
        tok = token.encode()
        sock.sendall(encode_header(MsgType.HELLO, worker_id or receiver.endpoint.worker_id,
                                   payload_len=len(tok)) + tok)
    return sock


def accepted(sock: socket.socket) -> bool:
    start = read_frame_start(sock) if _readable(sock) else None
    return start is not None and start[0].msg_type is MsgType.HELLO


def _readable(sock: socket.socket) -> bool:
    try:
        return bool(sock.recv(1, socket.MSG_PEEK))
    except OSError:
        return False


def closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def layer_frame(tid: str, layer: int, payload: bytes, num_blocks: int,
                payload_len: int | None = None) -> bytes:
    n = len(payload) if payload_len is None else payload_len
    return encode_header(MsgType.LAYER, tid, layer, num_blocks, n) + payload


def layer_bytes(src: KVCache, layer: int, ids) -> bytes:
    return src.data[layer].index_select(1, torch.tensor(ids)).numpy().tobytes()


def send_all_layers(sock, src: KVCache, tid: str, src_ids) -> None:
    for layer in range(SPEC.num_layers):
        sock.sendall(layer_frame(tid, layer, layer_bytes(src, layer, src_ids), len(src_ids)))
    sock.sendall(encode_header(MsgType.DONE, tid))


def transfer(receiver, sender, tid: str, dst_ids, src_ids, seed: int = 0):
    receiver.expect(tid, dst_ids)
    dest = KVDestination(tid, receiver.endpoint, tuple(dst_ids), len(dst_ids) * 4)
    return send_kv_blocks(sender, dest, source(seed), src_ids)


def assert_blocks(cache: KVCache, dst_ids, src: KVCache, src_ids) -> None:
    assert torch.equal(cache.data[:, :, dst_ids], src.data[:, :, src_ids])


def test_garbage_is_disconnected_and_receiver_keeps_serving(rx):
    receiver, cache = rx
    bad = raw_connect(receiver, handshake=False)
    bad.sendall(b"GARBAGE!" * 8)
    assert closed_by_peer(bad)
    bad2 = raw_connect(receiver)
    assert accepted(bad2)
    bad2.sendall(b"XXXX" + bytes(HEADER_SIZE))  # bad magic after a good handshake
    assert closed_by_peer(bad2)
    huge = raw_connect(receiver)
    assert accepted(huge)
    huge.sendall(encode_header(MsgType.LAYER, "x", 0, 1, 2**62))  # must not allocate that
    assert closed_by_peer(huge)
    wrong_version = raw_connect(receiver)
    assert accepted(wrong_version)
    frame = bytearray(encode_header(MsgType.DONE, "x"))
    frame[4] = 99
    wrong_version.sendall(bytes(frame))
    assert closed_by_peer(wrong_version)
    sender = create_sender("tcp")
    transfer(receiver, sender, "ok", [3, 9], [0, 1])
    assert receiver.wait("ok", 5) is TransferState.DONE
    assert_blocks(cache, [3, 9], source(), [0, 1])
    sender.close()


def test_frames_for_unknown_transfers_are_discarded(rx):
    receiver, cache = rx
    src = source(1)
    sock = raw_connect(receiver)
    assert accepted(sock)
    # A whole layer for a transfer nobody expects, then a real one on the same connection:
    # the stray payload must be consumed exactly, or the next header would be misread.
    sock.sendall(layer_frame("stranger", 0, layer_bytes(src, 0, [5, 6, 7]), 3))
    sock.sendall(encode_header(MsgType.DONE, "stranger"))
    receiver.expect("real", [1, 2])
    send_all_layers(sock, src, "real", [10, 11])
    assert receiver.wait("real", 5) is TransferState.DONE
    assert_blocks(cache, [1, 2], src, [10, 11])
    untouched = [b for b in range(SPEC.num_blocks) if b not in (1, 2)]
    assert not cache.data[:, :, untouched].any()
    sock.close()


def test_truncated_payload_then_disconnect_fails_transfer(rx):
    receiver, cache = rx
    receiver.expect("t", [4, 5])
    sock = raw_connect(receiver)
    assert accepted(sock)
    full = layer_bytes(source(), 0, [0, 1])
    sock.sendall(layer_frame("t", 0, full[: len(full) // 2], 2, payload_len=len(full)))
    assert receiver.wait("t", 0.2) is TransferState.TRANSFERRING
    sock.close()
    assert receiver.wait("t", 5) is TransferState.FAILED
    assert not cache.data.any()


def test_wrong_payload_length_is_rejected(rx):
    receiver, cache = rx
    receiver.expect("w", [4, 5])
    sock = raw_connect(receiver)
    assert accepted(sock)
    payload = layer_bytes(source(), 0, [0, 1]) + b"\0" * 8
    sock.sendall(layer_frame("w", 0, payload, 2))
    assert closed_by_peer(sock)
    assert receiver.wait("w", 5) is TransferState.FAILED
    assert not cache.data.any()


def test_block_count_or_layer_mismatch_fails_only_that_transfer(rx):
    receiver, cache = rx
    src = source(2)
    receiver.expect("few", [1, 2, 3])
    receiver.expect("layer", [4])
    receiver.expect("fine", [5])
    sock = raw_connect(receiver)
    assert accepted(sock)
    sock.sendall(layer_frame("few", 0, layer_bytes(src, 0, [0, 1]), 2))  # 3 reserved
    sock.sendall(layer_frame("layer", 7, layer_bytes(src, 0, [0]), 1))  # no layer 7
    send_all_layers(sock, src, "fine", [9])  # the connection survived both
    assert receiver.wait("fine", 5) is TransferState.DONE
    assert receiver.state("few") is TransferState.FAILED
    assert receiver.state("layer") is TransferState.FAILED
    assert_blocks(cache, [5], src, [9])
    assert not cache.data[:, :, [1, 2, 3, 4]].any()
    sock.close()


def test_done_before_every_layer_fails(rx):
    receiver, _ = rx
    receiver.expect("half", [0])
    sock = raw_connect(receiver)
    assert accepted(sock)
    sock.sendall(layer_frame("half", 0, layer_bytes(source(), 0, [0]), 1))
    sock.sendall(encode_header(MsgType.DONE, "half"))
    assert receiver.wait("half", 5) is TransferState.FAILED
    sock.close()


def test_auth_token(no_thread_leaks):
    receiver, cache = create_receiver("tcp", SPEC, "decode-a", auth_token="s3cret")
    try:
        receiver.expect("a", [0, 1])
        wrong = create_sender("tcp", auth_token="guess")
        with pytest.raises(TransferError, match="refused"):
            wrong.begin(KVDestination("a", receiver.endpoint, (0, 1), 8), SRC_SPEC)
        wrong.close()
        raw = raw_connect(receiver, worker_id="decode-b")  # wrong worker, no answer
        assert closed_by_peer(raw)
        assert receiver.state("a") is TransferState.PENDING
        assert not cache.data.any()
        # (challenge-response details: tests/unit/test_kv_transfer_tcp_auth.py)
        sender = create_sender("tcp", auth_token="s3cret")
        send_kv_blocks(sender, KVDestination("a", receiver.endpoint, (0, 1), 8), source(),
                       [2, 3])
        assert receiver.wait("a", 5) is TransferState.DONE
        sender.close()
    finally:
        receiver.close()


def test_forget_then_late_frames_are_ignored(rx):
    receiver, cache = rx
    src = source(3)
    receiver.expect("gone", [6, 7])
    sock = raw_connect(receiver)
    assert accepted(sock)
    sock.sendall(layer_frame("gone", 0, layer_bytes(src, 0, [0, 1]), 2))
    deadline = time.monotonic() + 5
    while not cache.data[0, :, [6, 7]].any() and time.monotonic() < deadline:
        time.sleep(0.005)
    receiver.forget("gone")
    before = cache.data.clone()
    sock.sendall(layer_frame("gone", 1, layer_bytes(src, 1, [0, 1]), 2))
    sock.sendall(encode_header(MsgType.DONE, "gone"))
    receiver.expect("next", [8])
    send_all_layers(sock, src, "next", [4])
    assert receiver.wait("next", 5) is TransferState.DONE
    with pytest.raises(KeyError):
        receiver.state("gone")
    assert torch.equal(cache.data[1, :, [6, 7]], before[1, :, [6, 7]])  # layer 1 not written
    sock.close()


def test_sender_abort_fails_the_transfer_on_the_receiver(rx):
    receiver, _ = rx
    sender = create_sender("tcp")
    receiver.expect("ab", [0])
    t = sender.begin(KVDestination("ab", receiver.endpoint, (0,), 4), SRC_SPEC)
    sender.send_layer(t, 0, source().data[0].index_select(1, torch.tensor([0])))
    sender.abort(t)
    assert receiver.wait("ab", 5) is TransferState.FAILED
    with pytest.raises(TransferError):
        sender.finish(t)
    sender.close()


def test_interleaved_transfers_on_one_connection(rx):
    receiver, cache = rx
    src = source(4)
    sender = create_sender("tcp")
    plans = {"i0": ([0, 5], [1, 2]), "i1": ([7, 3, 12], [30, 0, 8]), "i2": ([15], [16])}
    transfers = {}
    for tid, (dst, _) in plans.items():
        receiver.expect(tid, dst)
        transfers[tid] = sender.begin(KVDestination(tid, receiver.endpoint, tuple(dst),
                                                    4 * len(dst)), SRC_SPEC)
    for layer in range(SPEC.num_layers):
        for tid, (_, src_ids) in plans.items():
            kv = src.data[layer].index_select(1, torch.tensor(src_ids))
            sender.send_layer(transfers[tid], layer, kv)
    for tid in reversed(list(plans)):
        sender.finish(transfers[tid])
    assert len(sender._conns) == 1  # one persistent connection carried all three
    for tid, (dst, src_ids) in plans.items():
        assert receiver.wait(tid, 5) is TransferState.DONE
        assert_blocks(cache, dst, src, src_ids)
    sender.close()


def test_two_senders_at_once(rx):
    receiver, cache = rx
    errors = []

    def run(k: int) -> None:
        sender = create_sender("tcp")
        try:
            for j in range(3):
                dst = [k * 8 + 2 * j, k * 8 + 2 * j + 1]
                transfer(receiver, sender, f"s{k}-{j}", dst, [j, 31 - j], seed=k)
        except Exception as exc:  # surfaced below
            errors.append(exc)
        finally:
            sender.close()

    threads = [threading.Thread(target=run, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    for k in (0, 1):
        for j in range(3):
            assert receiver.wait(f"s{k}-{j}", 5) is TransferState.DONE
            assert_blocks(cache, [k * 8 + 2 * j, k * 8 + 2 * j + 1], source(k), [j, 31 - j])


def test_close_fails_pending_and_stops_threads(no_thread_leaks):
    receiver, _ = create_receiver("tcp", SPEC, "decode-c")
    sender = create_sender("tcp")
    receiver.expect("done", [0])
    send_kv_blocks(sender, KVDestination("done", receiver.endpoint, (0,), 4), source(), [1])
    assert receiver.wait("done", 5) is TransferState.DONE
    receiver.expect("pending", [1])
    idle = raw_connect(receiver)  # a connection that never says anything more
    assert accepted(idle)
    receiver.close()
    assert receiver.state("pending") is TransferState.FAILED
    assert receiver.state("done") is TransferState.DONE
    assert closed_by_peer(idle)
    with pytest.raises(TransferError):  # nothing listens any more
        sender.begin(KVDestination("x", receiver.endpoint, (2,), 4), SRC_SPEC)
    sender.close()
    idle.close()


def test_receiver_survives_a_sender_dying_mid_frame(rx):
    receiver, cache = rx
    receiver.expect("half", [2])
    sock = raw_connect(receiver)
    assert accepted(sock)
    sock.sendall(encode_header(MsgType.LAYER, "half", 0, 1, 10_000)[:-3])  # cut in the header
    sock.close()
    sender = create_sender("tcp")
    transfer(receiver, sender, "after", [3], [0])
    assert receiver.wait("after", 5) is TransferState.DONE
    assert receiver.state("half") is TransferState.PENDING  # no byte of it had arrived
    sender.close()



def test_connection_lost_mid_transfer_fails_the_sender(no_thread_leaks):
    """A receiver that vanishes (connection reset) after the handshake."""
    receiver, _ = create_receiver("tcp", SPEC, "decode-r")  # only for its endpoint shape
    receiver.close()
    server = socket.create_server(("127.0.0.1", 0))
    endpoint = dataclasses.replace(
        receiver.endpoint, address=f"127.0.0.1:{server.getsockname()[1]}")
    accepted_conn = []

    def serve() -> None:
        conn, _ = server.accept()
        read_frame_start(conn)
        conn.sendall(encode_header(MsgType.HELLO, endpoint.incarnation))
        accepted_conn.append(conn)

    t = threading.Thread(target=serve)
    t.start()
    sender = create_sender("tcp")
    tr = sender.begin(KVDestination("x", endpoint, (0, 1), 8), SRC_SPEC)
    t.join(5)
    conn = accepted_conn[0]
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()  # linger 0: the peer gets a reset, not a polite FIN
    server.close()
    time.sleep(0.05)
    kv = source().data[0].index_select(1, torch.tensor([0, 1]))
    with pytest.raises(TransferError):
        sender.send_layer(tr, 0, kv)
        sender.send_layer(tr, 1, kv.clone())
        sender.finish(tr, timeout=5)
    assert tr.state is TransferState.FAILED
    sender.close()


def test_frame_header_roundtrip_and_limits():
    raw = encode_header(MsgType.LAYER, "req-é", layer=3, num_blocks=5, payload_len=640)
    header = decode_header(raw[:HEADER_SIZE])
    assert header == FrameHeader(MsgType.LAYER, len("req-é".encode()), 3, 5, 640)
    assert decode_transfer_id(raw[HEADER_SIZE:]) == "req-é"
    with pytest.raises(ProtocolError, match="type"):
        decode_header(raw[:5] + b"\x09" + raw[6:HEADER_SIZE])
    with pytest.raises(ProtocolError, match="payload"):
        FrameHeader(MsgType.DONE, 1, payload_len=1)
    with pytest.raises(ProtocolError, match="HELLO"):
        FrameHeader(MsgType.HELLO, 0, payload_len=10**6)
    with pytest.raises(ProtocolError, match="without a transfer id"):
        FrameHeader(MsgType.ABORT, 0)
    with pytest.raises(ProtocolError, match="utf-8"):
        decode_transfer_id(b"\xff\xfe")
