"""TCP backend: any two hosts, framed binary protocol (see ``framing``), never pickle.

Receiver lifecycle: ``TcpReceiver.create`` allocates the cache, listens (``bind_host``,
port 0 = ephemeral; the endpoint's address is ``host:port``) and starts an accept thread;
each accepted connection gets a thread that runs the handshake (worker id; with a shared
secret, a challenge-response: see ``framing``; the answer names the cache's incarnation),
then reads frames: a LAYER's payload
lands in a per-connection staging buffer (``recv_into``, no per-chunk concatenation) and
is scattered into the blocks reserved by ``expect``; DONE after every layer -> DONE,
ABORT -> FAILED, a connection lost with a transfer half-streamed -> FAILED. Frames of unknown or forgotten transfers are read and
dropped. A frame that breaks the protocol (bad magic/version/type, a payload length
that does not match its block count) closes that connection only, as does a failed
handshake: a peer without the secret never gets to send a frame that is acted on. The
secret is configuration given to both sides (``KVTransferConfig``), never published in
the endpoint, and never logged. ``close`` stops every thread.

Sender lifecycle: one persistent connection per endpoint, opened by the first ``begin``
that needs it, with a thread that drains a queue of frames, so ``send_layer`` returns at
once and the bytes go out while the prefill computes the next layer. ``finish`` queues
DONE and waits until it is written; a broken connection fails every transfer on it with
``TransferError`` and the next ``begin`` reconnects. A connection to another incarnation
than a destination's (the receiver restarted on the same address) is replaced once; if
the live incarnation still differs, the transfer fails with ``StaleDestination``. The sender learns of bytes *written*;
delivery is observed on the decode side, where ``mark_delivered`` is not needed.
"""

from __future__ import annotations

import contextlib
import hmac
import itertools
import logging
import secrets
import selectors
import socket
import threading
from collections.abc import Sequence

import numpy as np
import torch

from pdserve.engine.kv_cache import KVCache, KVCacheSpec
from pdserve.kv_transfer.base import KVReceiver, KVSender, Transfer, stale_destination
from pdserve.kv_transfer.block_copy import BlockWriter
from pdserve.kv_transfer.framing import (
    MAC_BYTES,
    NONCE_BYTES,
    FrameHeader,
    MsgType,
    ProtocolError,
    auth_mac,
    encode_header,
    read_frame_start,
    recv_exact,
    recv_exact_into,
)
from pdserve.kv_transfer.incarnation import new_incarnation
from pdserve.kv_transfer.messages import KVCacheSpecMsg, KVEndpoint
from pdserve.kv_transfer.tcp_connection import SendConnection
from pdserve.kv_transfer.tracker import TransferState

log = logging.getLogger(__name__)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port, got {address!r}")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _advertised_host(bind_host: str) -> str:
    if bind_host not in ("", "0.0.0.0", "::"):
        return bind_host
    try:  # listening everywhere: publish an address other hosts can use
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


class _Staging:
    """A connection's receive buffer: grows to the largest layer seen, then is reused."""

    def __init__(self):
        self._buf = np.empty(0, dtype=np.uint8)

    def take(self, nbytes: int) -> np.ndarray:
        if self._buf.size < nbytes:
            self._buf = np.empty(nbytes, dtype=np.uint8)
        return self._buf[:nbytes]


class TcpReceiver(KVReceiver):
    name = "tcp"
    sender_delivers = False

    def __init__(self, endpoint: KVEndpoint, cache: KVCache, listener: socket.socket,
                 secret: str, handshake_timeout: float):
        super().__init__(endpoint, cache)
        self._writer = BlockWriter(cache.data)
        self._listener = listener
        self._secret = secret.encode()
        self._handshake_timeout = handshake_timeout
        # Held while scattering into a transfer's blocks, and by forget(): once forget
        # returns, no connection thread is still writing blocks the caller may reuse.
        self._write_lock = threading.Lock()
        self._indices: dict[str, np.ndarray | torch.Tensor] = {}
        self._conns: dict[int, socket.socket] = {}
        self._threads: dict[int, threading.Thread] = {}
        self._conns_lock = threading.Lock()
        self._conn_ids = itertools.count(1)
        self._wake_r, self._wake_w = socket.socketpair()
        self._closed = threading.Event()
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"pdserve-kv-accept-{endpoint.worker_id}",
            daemon=True)

    @classmethod
    def create(cls, cache_spec: KVCacheSpec, worker_id: str, device: torch.device | str = "cpu",
               *, bind_host: str = "127.0.0.1", port: int = 0, advertise_host: str | None = None,
               auth_token: str = "", handshake_timeout: float = 10.0, instance_key: str = "",
               ) -> tuple[TcpReceiver, KVCache]:
        """``advertise_host`` is what the endpoint publishes (default: ``bind_host``, or
        this host's address when binding every interface). ``auth_token`` is the cluster's
        shared secret ("" = accept any sender); it is kept here, not in the endpoint.
        ``instance_key`` is accepted for a uniform call site and unused (the handshake
        names the incarnation)."""
        family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
        listener = socket.create_server((bind_host, port), family=family, backlog=128)
        try:
            cache = KVCache(cache_spec, device)
            address = format_address(advertise_host or _advertised_host(bind_host),
                                     listener.getsockname()[1])
            endpoint = KVEndpoint(cls.name, worker_id, address,
                                  KVCacheSpecMsg.from_spec(cache_spec), new_incarnation())
            receiver = cls(endpoint, cache, listener, auth_token, handshake_timeout)
        except BaseException:
            listener.close()
            raise
        receiver._accept_thread.start()
        return receiver, cache

    def expect(self, transfer_id: str, block_ids: Sequence[int]) -> None:
        with self._write_lock:
            super().expect(transfer_id, block_ids)
            self._indices[transfer_id] = self._writer.index(self._table.get(transfer_id).block_ids)

    def forget(self, transfer_id: str) -> None:
        with self._write_lock:
            super().forget(transfer_id)
            self._indices.pop(transfer_id, None)

    def mark_delivered(self, transfer_id: str) -> None:
        """Ignored: the connection threads see DONE frames themselves."""

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._accept_thread.join()
        self._listener.close()
        with self._conns_lock:
            conns, threads = list(self._conns.values()), list(self._threads.values())
        for conn in conns:
            with contextlib.suppress(OSError):  # wakes the thread blocked in recv
                conn.shutdown(socket.SHUT_RDWR)
        for t in threads:
            t.join()
        self._wake_r.close()
        self._wake_w.close()
        self._table.fail_all("receiver closed")

    # -- threads ------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._closed.is_set():
                for key, _ in sel.select():
                    if key.fileobj is self._wake_r:
                        return
                    try:
                        conn, peer = self._listener.accept()
                    except OSError:
                        continue
                    self._start_connection(conn, peer)

    def _start_connection(self, conn: socket.socket, peer) -> None:
        with self._conns_lock:
            if self._closed.is_set():
                conn.close()
                return
            cid = next(self._conn_ids)
            t = threading.Thread(target=self._serve, args=(cid, conn, peer), daemon=True,
                                 name=f"pdserve-kv-recv-{self.endpoint.worker_id}-{cid}")
            self._conns[cid], self._threads[cid] = conn, t
            t.start()  # under the lock: close() must never see an unstarted thread

    def _serve(self, cid: int, conn: socket.socket, peer) -> None:
        staging = _Staging()
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(self._handshake_timeout)
            if not self._handshake(conn, peer):
                return
            conn.settimeout(None)
            while True:
                start = read_frame_start(conn)
                if start is None:
                    return
                header, tid = start
                if header.msg_type is MsgType.LAYER:
                    self._on_layer(conn, cid, header, tid, staging)
                elif header.msg_type is MsgType.DONE:
                    self._on_done(cid, header, tid)
                elif header.msg_type is MsgType.ABORT:
                    self._table.transition(tid, TransferState.FAILED, "aborted by the sender")
                else:
                    raise ProtocolError("HELLO after the handshake")
        except ProtocolError as exc:
            log.warning("KV receiver %s: dropping connection from %s: %s",
                        self.endpoint.worker_id, peer, exc)
        except OSError as exc:  # includes a peer vanishing mid-frame
            if not self._closed.is_set():
                log.info("KV receiver %s: connection from %s lost: %s",
                         self.endpoint.worker_id, peer, exc)
        finally:
            self._table.fail_owned_by(cid, "connection lost mid-transfer")
            conn.close()
            with self._conns_lock:
                self._conns.pop(cid, None)
                self._threads.pop(cid, None)

    def _handshake(self, conn: socket.socket, peer) -> bool:
        start = read_frame_start(conn)
        if start is None:
            return False
        header, worker_id = start
        if header.msg_type is not MsgType.HELLO:
            raise ProtocolError(f"expected HELLO, got {header.msg_type.name}")
        if worker_id != self.endpoint.worker_id:
            log.warning("KV receiver %s: %s asked for worker %r", self.endpoint.worker_id,
                        peer, worker_id)
            return False
        if self._secret and not self._challenge(conn, peer, worker_id):
            return False
        conn.sendall(encode_header(MsgType.HELLO, self.endpoint.incarnation))
        return True

    def _challenge(self, conn: socket.socket, peer, worker_id: str) -> bool:
        """The peer must answer a fresh nonce with ``auth_mac``; nothing of the secret or of
        what the peer sent is logged."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        conn.sendall(encode_header(MsgType.CHALLENGE, worker_id, payload_len=NONCE_BYTES)
                     + nonce)
        reply = read_frame_start(conn)
        if reply is None or reply[0].msg_type is not MsgType.AUTH:
            log.warning("KV receiver %s: refused %s: it did not authenticate",
                        self.endpoint.worker_id, peer)
            return False
        mac = recv_exact(conn, MAC_BYTES)
        if not hmac.compare_digest(mac, auth_mac(self._secret, nonce, worker_id)):
            log.warning("KV receiver %s: refused %s: wrong shared secret",
                        self.endpoint.worker_id, peer)
            return False
        return True

    def _on_layer(self, conn: socket.socket, cid: int, header: FrameHeader, tid: str,
                  staging: _Staging) -> None:
        spec = self.endpoint.spec
        # Claim before validating, so a malformed frame also fails the transfer it names.
        known = self._table.claim(tid, cid)
        heads = self._heads(header)
        # Validated before anything is allocated: the length is attacker-controlled.
        if (header.num_blocks > spec.num_blocks
                or header.payload_len != spec.layer_payload_bytes(header.num_blocks)
                // spec.num_kv_heads * len(heads)):
            raise ProtocolError(f"LAYER of {header.num_blocks} blocks and {len(heads)} heads "
                                f"with {header.payload_len} payload bytes")
        payload = staging.take(header.payload_len)
        recv_exact_into(conn, memoryview(payload))
        if not known:
            return  # unknown, forgotten or finished: the payload is dropped
        entry = self._table.get(tid)
        problem = ""
        if header.layer >= spec.num_layers:
            problem = f"layer {header.layer} out of range"
        elif entry is not None and header.num_blocks != len(entry.block_ids):
            problem = f"{header.num_blocks} blocks sent, {len(entry.block_ids)} reserved"
        if problem:
            self._table.transition(tid, TransferState.FAILED, problem)
            return
        with self._write_lock:
            index = self._indices.get(tid)
            if index is None:
                return  # forgotten while the payload was in flight
            self._writer.write_bytes(header.layer, index, payload, (heads.start, len(heads)))
            self._table.note_layer(tid, header.layer, heads)

    def _heads(self, header: FrameHeader) -> range:
        """The receiver's KV heads a LAYER or DONE frame names."""
        count = header.head_count or self.endpoint.spec.num_kv_heads  # 0: all of them
        heads = range(header.head_offset, header.head_offset + count)
        if heads.stop > self.endpoint.spec.num_kv_heads:
            raise ProtocolError(f"heads [{heads.start}, {heads.stop}) outside the cache's "
                                f"{self.endpoint.spec.num_kv_heads}")
        return heads

    def _on_done(self, cid: int, header: FrameHeader, tid: str) -> None:
        self._table.complete(tid, self._heads(header), cid)


class TcpSender(KVSender):
    name = "tcp"

    def __init__(self, *, auth_token: str | None = None, connect_timeout: float = 5.0,
                 max_queued_frames: int = 64, queue_timeout: float = 30.0):
        """``auth_token``: the cluster's shared secret, proven to receivers that ask for it
        (None or "" = none; such a sender is refused by receivers that have one).
        ``max_queued_frames`` bounds memory when compute outruns the network: beyond it
        ``send_layer`` blocks (up to ``queue_timeout``)."""
        if max_queued_frames < 1 or connect_timeout <= 0 or queue_timeout <= 0:
            raise ValueError("max_queued_frames, connect_timeout and queue_timeout must be > 0")
        self._secret = auth_token or ""
        self._connect_timeout = connect_timeout
        self._max_queued = max_queued_frames
        self._queue_timeout = queue_timeout
        self._conns: dict[tuple[str, str], SendConnection] = {}
        self._lock = threading.Lock()

    def _open(self, transfer: Transfer) -> None:
        endpoint = transfer.dest.endpoint
        # Keyed by incarnation too: a destination of another life of the receiver never
        # reuses (or tears down) the connection that transfers of the live one are using.
        key = (endpoint.worker_id, endpoint.address, endpoint.incarnation)
        with self._lock:
            conn = self._conns.get(key)
            if conn is None or not conn.alive():
                if conn is not None:
                    del self._conns[key]
                    conn.close(timeout=0)
                host, port = parse_address(endpoint.address)
                conn = SendConnection.connect(host, port, endpoint.worker_id, self._secret,
                                              self._connect_timeout, self._max_queued)
                if conn.incarnation != endpoint.incarnation:
                    conn.close(timeout=0)
                    raise stale_destination(transfer.dest, conn.incarnation, "at connect")
                # Connections to earlier lives of this worker are dead or about to be.
                for old in [k for k in self._conns if k[0] == endpoint.worker_id]:
                    self._conns.pop(old).close(timeout=0)
                self._conns[key] = conn
        transfer.context = conn

    def _live_incarnation(self, transfer: Transfer) -> str | None:
        conn: SendConnection = transfer.context
        return conn.incarnation if conn.error is None else None

    def _write_layer(self, transfer: Transfer, layer: int, kv: torch.Tensor) -> None:
        conn: SendConnection = transfer.context
        src = kv.detach()
        if src.device.type != "cpu":
            src = src.cpu()
        conn.send_layer(transfer, layer, src.contiguous(), self._queue_timeout,
                        _heads(transfer))

    def _complete(self, transfer: Transfer, timeout: float) -> None:
        conn: SendConnection = transfer.context
        try:
            conn.send_control(MsgType.DONE, transfer.transfer_id, wait_timeout=timeout,
                              heads=_heads(transfer))
        except (OSError, TimeoutError):
            self._discard(conn)
            raise

    def _cancel(self, transfer: Transfer) -> None:
        conn: SendConnection | None = transfer.context
        if conn is not None and conn.error is None:
            conn.send_control(MsgType.ABORT, transfer.transfer_id, wait_timeout=None)

    def close(self) -> None:
        with self._lock:
            conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            conn.close()

    def _discard(self, conn: SendConnection) -> None:
        with self._lock:
            for key, c in list(self._conns.items()):
                if c is conn:
                    del self._conns[key]
        conn.close(timeout=0)


def _heads(transfer: Transfer) -> tuple[int, int]:
    """(first, count) of the receiver's KV heads ``transfer`` writes."""
    return transfer.head_window or (0, transfer.dest.endpoint.spec.num_kv_heads)
