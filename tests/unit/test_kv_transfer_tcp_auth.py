"""The TCP KV backend's shared secret: challenge-response, never published, never logged.

A receiver with a secret challenges every connection; senders with no or a wrong secret,
and raw peers that skip or botch the answer, are disconnected before any block is
written. The secret is cluster configuration (``KVTransferConfig``): it is absent from
the endpoint a receiver publishes, and a cluster launched with the tcp backend gets a
random one when none is configured. One in-process cluster checks the workers thread it.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
import socket

import pytest
import torch

from pdserve.cluster.cli.client import Client, build_request
from pdserve.cluster.launch.local import LocalCluster
from pdserve.engine.config import EngineConfig
from pdserve.engine.kv_cache import KVCache, KVCacheSpec
from pdserve.kv_transfer.backend_config import SECRET_ENV, KVTransferConfig
from pdserve.kv_transfer.base import KVDestination, TransferError, TransferState, send_kv_blocks
from pdserve.kv_transfer.framing import (
    HEADER_SIZE,
    MAC_BYTES,
    NONCE_BYTES,
    MsgType,
    auth_mac,
    encode_header,
    read_frame_start,
    recv_exact,
)
from pdserve.kv_transfer.registry import create_receiver, create_sender
from pdserve.kv_transfer.tcp import parse_address

SPEC = KVCacheSpec(num_layers=2, num_blocks=16, block_size=4, num_kv_heads=2, head_dim=4,
                   dtype=torch.float32)
SECRET = "kv-secret-0123456789abcdef"


def source() -> KVCache:
    g = torch.Generator().manual_seed(0)
    return KVCache(SPEC, buffer=torch.randn(SPEC.shape, generator=g))


@pytest.fixture
def rx(caplog):
    caplog.set_level(logging.DEBUG, logger="pdserve.kv_transfer")
    receiver, cache = create_receiver("tcp", SPEC, "decode-s", auth_token=SECRET)
    yield receiver, cache
    receiver.close()
    assert SECRET not in caplog.text  # nothing logged, at any level, holds the secret


def dest(receiver, tid: str, ids=(0, 1)) -> KVDestination:
    receiver.expect(tid, ids)
    return KVDestination(tid, receiver.endpoint, tuple(ids), len(ids) * SPEC.block_size)


def closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> bool:
    sock.settimeout(timeout)
    try:
        while True:  # skip whatever the receiver sent before closing
            if sock.recv(4096) == b"":
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def layer_frames(tid: str, ids) -> bytes:
    src = source()
    out = b""
    for layer in range(SPEC.num_layers):
        payload = src.data[layer].index_select(1, torch.tensor(list(ids))).numpy().tobytes()
        out += encode_header(MsgType.LAYER, tid, layer, len(ids), len(payload)) + payload
    return out + encode_header(MsgType.DONE, tid)


def test_right_secret_transfers(rx):
    receiver, cache = rx
    sender = create_sender("tcp", auth_token=SECRET)
    try:
        send_kv_blocks(sender, dest(receiver, "ok", (3, 9)), source(), [0, 1])
        assert receiver.wait("ok", 5) is TransferState.DONE
        assert torch.equal(cache.data[:, :, [3, 9]], source().data[:, :, [0, 1]])
    finally:
        sender.close()


@pytest.mark.parametrize("secret", [None, "", "kv-secret-0123456789abcdeX"])
def test_missing_or_wrong_secret_is_refused(rx, secret):
    receiver, cache = rx
    sender = create_sender("tcp", auth_token=secret)
    try:
        with pytest.raises(TransferError, match="requires the cluster's shared secret"
                           if not secret else "refused the handshake"):
            sender.begin(dest(receiver, "t"), SPEC)
    finally:
        sender.close()
    assert receiver.state("t") is TransferState.PENDING
    assert not cache.data.any()


def _hello(receiver) -> tuple[socket.socket, bytes]:
    sock = socket.create_connection(parse_address(receiver.endpoint.address), timeout=5)
    sock.sendall(encode_header(MsgType.HELLO, receiver.endpoint.worker_id))
    header, worker_id = read_frame_start(sock)
    assert header.msg_type is MsgType.CHALLENGE and worker_id == receiver.endpoint.worker_id
    return sock, recv_exact(sock, NONCE_BYTES)


def test_raw_peers_cannot_skip_or_fake_the_answer(rx):
    receiver, cache = rx
    receiver.expect("x", [0, 1])
    # Frames straight after the challenge, without AUTH.
    sock, _ = _hello(receiver)
    sock.sendall(layer_frames("x", [0, 1]))
    assert closed_by_peer(sock)
    # A guessed MAC; a MAC for another nonce (a replay); the right nonce for another worker.
    sock, first_nonce = _hello(receiver)
    sock.sendall(encode_header(MsgType.AUTH, "decode-s", payload_len=MAC_BYTES) + bytes(32))
    assert closed_by_peer(sock)
    for nonce_of, worker in ((first_nonce, "decode-s"), (None, "decode-other")):
        sock, nonce = _hello(receiver)
        mac = auth_mac(SECRET.encode(), nonce_of or nonce, worker)
        sock.sendall(encode_header(MsgType.AUTH, "decode-s", payload_len=MAC_BYTES) + mac
                     + layer_frames("x", [0, 1]))
        assert closed_by_peer(sock)
    # The old protocol (a token in HELLO) is a protocol error, not a way in.
    sock = socket.create_connection(parse_address(receiver.endpoint.address), timeout=5)
    raw = bytearray(encode_header(MsgType.HELLO, "decode-s"))
    raw[HEADER_SIZE - 1] = len(SECRET)  # payload_len (u64) ends the header
    sock.sendall(bytes(raw) + SECRET.encode())
    assert closed_by_peer(sock)
    assert receiver.state("x") is TransferState.PENDING
    assert not cache.data.any()
    # Doing it right works on the same receiver.
    sock, nonce = _hello(receiver)
    sock.sendall(encode_header(MsgType.AUTH, "decode-s", payload_len=MAC_BYTES)
                 + auth_mac(SECRET.encode(), nonce, "decode-s"))
    header, _ = read_frame_start(sock)
    assert header.msg_type is MsgType.HELLO
    sock.sendall(layer_frames("x", [0, 1]))
    assert receiver.wait("x", 5) is TransferState.DONE
    sock.close()


def test_the_endpoint_does_not_carry_the_secret(rx):
    receiver, _ = rx
    ep = receiver.endpoint
    assert SECRET not in repr(ep)
    assert SECRET.encode() not in pickle.dumps(ep)
    assert SECRET not in repr(dataclasses.asdict(ep))
    assert "auth_token" not in {f.name for f in dataclasses.fields(ep)}


def test_a_receiver_without_secret_accepts_any_sender():
    receiver, _ = create_receiver("tcp", SPEC, "decode-open")
    sender = create_sender("tcp", auth_token=SECRET)  # a secret it is not asked for is unused
    try:
        send_kv_blocks(sender, dest(receiver, "o"), source(), [0, 1])
        assert receiver.wait("o", 5) is TransferState.DONE
    finally:
        sender.close()
        receiver.close()


# -- configuration -------------------------------------------------------------------------
def test_config_secret_sources(tmp_path):
    cfg = KVTransferConfig(backend="tcp", shared_secret=SECRET)
    assert cfg.auth_token == SECRET and SECRET not in repr(cfg)
    assert cfg.with_cluster_secret(environ={}) == cfg
    secret_file = tmp_path / "kv.secret"
    secret_file.write_text(f"\n{SECRET}\n")
    from_file = KVTransferConfig(backend="tcp", secret_file=str(secret_file))
    assert from_file.auth_token == SECRET
    resolved = from_file.with_cluster_secret(environ={SECRET_ENV: "ignored-0123456789abcdef"})
    assert (resolved.shared_secret, resolved.secret_file) == (SECRET, None)  # no file needed
    from_env = KVTransferConfig(backend="tcp").with_cluster_secret(environ={SECRET_ENV: SECRET})
    assert from_env.auth_token == SECRET
    with pytest.raises(ValueError, match="not both"):
        KVTransferConfig(backend="tcp", shared_secret=SECRET, secret_file=str(secret_file))
    with pytest.raises(ValueError, match="cannot read"):
        KVTransferConfig(backend="tcp", secret_file=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="at least"):
        KVTransferConfig(backend="tcp", shared_secret="short")
    with pytest.raises(ValueError, match="at least"):
        KVTransferConfig(backend="tcp").with_cluster_secret(environ={SECRET_ENV: "short"})


def test_tcp_clusters_get_a_random_secret_by_default():
    a = KVTransferConfig(backend="tcp").with_cluster_secret(environ={})
    b = KVTransferConfig(backend="tcp").with_cluster_secret(environ={})
    assert len(a.auth_token) == 64 and a.auth_token != b.auth_token
    assert pickle.loads(pickle.dumps(a)) == a  # crosses Ray to every worker
    shm = KVTransferConfig(backend="shm")
    assert shm.with_cluster_secret(environ={SECRET_ENV: SECRET}) is shm


def test_workers_share_the_configured_secret(demo_model_dir):
    """Decode receivers and prefill senders of one cluster both use ``KVTransferConfig``."""
    engine = EngineConfig(model=str(demo_model_dir), device="cpu", num_kv_blocks=64,
                          block_size=16, max_num_seqs=4, max_num_batched_tokens=256)
    kv = KVTransferConfig(backend="tcp").with_cluster_secret(environ={})
    with LocalCluster(engine, kv=kv) as cluster:
        with Client(cluster.address, timeout_s=60) as c:
            out = c.generate(build_request([5, 6, 7, 8, 9], max_tokens=3))
        assert len(out.token_ids) == 3
