"""A TCP sender's connection to one receiver: a socket plus the thread that feeds it.

Lifecycle: ``connect`` opens the socket, does the handshake synchronously (HELLO, and the
challenge-response of ``framing`` when the receiver has a secret; so a wrong or missing
secret or a stale endpoint fails ``begin`` with a clear error) and starts the writer
thread. Callers enqueue whole frames (``send_layer``, ``send_control``); the thread
writes them in order with ``sendall`` straight from the tensor's memory. The first socket
error is kept in ``error``: every later enqueue fails fast, queued frames are dropped and
their waiters released. ``close`` lets queued frames go out (bounded by a timeout), then
shuts the socket so a thread stuck on a receiver that stopped reading exits too.
"""

from __future__ import annotations

import contextlib
import queue
import select
import socket
import threading
from dataclasses import dataclass

import numpy as np
import torch

from pdserve.kv_transfer.block_copy import tensor_bytes
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
)


@dataclass
class _Frame:
    header: bytes
    payload: np.ndarray | None = None  # keeps the tensor alive until written
    transfer: object | None = None  # the Transfer whose bytes_sent to bump
    written: threading.Event | None = None


def _handshake_reply(sock: socket.socket) -> tuple[FrameHeader, str] | None:
    """The receiver's next handshake frame and its id field; None when it closed or spoke
    nonsense."""
    try:
        return read_frame_start(sock)
    except (OSError, ProtocolError):
        return None


class SendConnection:
    def __init__(self, sock: socket.socket, name: str, max_queued: int, incarnation: str):
        self._sock = sock
        # The incarnation of the receiving cache, as its HELLO said: a connection reaches
        # one process, so every transfer on it must have been reserved on this one.
        self.incarnation = incarnation
        self._queue: queue.Queue[_Frame | None] = queue.Queue(max_queued)
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @classmethod
    def connect(cls, host: str, port: int, worker_id: str, secret: str, timeout: float,
                max_queued: int) -> SendConnection:
        """``secret``: the cluster's KV shared secret ("" = none)."""
        sock = socket.create_connection((host, port), timeout=timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(encode_header(MsgType.HELLO, worker_id))
            reply = _handshake_reply(sock)
            if reply is not None and reply[0].msg_type is MsgType.CHALLENGE:
                if not secret:
                    raise ConnectionRefusedError(
                        f"KV receiver {worker_id} at {host}:{port} requires the cluster's "
                        "shared secret and this sender has none (see docs/security.md)")
                nonce = recv_exact(sock, NONCE_BYTES)
                sock.sendall(encode_header(MsgType.AUTH, worker_id, payload_len=MAC_BYTES)
                             + auth_mac(secret.encode(), nonce, worker_id))
                reply = _handshake_reply(sock)
            if reply is None or reply[0].msg_type is not MsgType.HELLO or not reply[1]:
                raise ConnectionRefusedError(
                    f"KV receiver {worker_id} at {host}:{port} refused the handshake "
                    "(wrong shared secret, or the endpoint belongs to another worker)")
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        conn = cls(sock, f"pdserve-kv-send-{worker_id}", max_queued, reply[1])
        conn._thread.start()
        return conn

    def send_layer(self, transfer, layer: int, kv: torch.Tensor, queue_timeout: float,
                   heads: tuple[int, int]) -> None:
        """Queue one LAYER frame of ``heads`` (first, count) of the receiver's; ``kv`` is a
        contiguous CPU tensor the caller won't touch."""
        payload = tensor_bytes(kv)
        header = encode_header(MsgType.LAYER, transfer.transfer_id, layer, kv.shape[1],
                               payload.size, heads)
        self._put(_Frame(header, payload, transfer), queue_timeout)

    def send_control(self, msg_type: MsgType, transfer_id: str,
                     wait_timeout: float | None, heads: tuple[int, int] = (0, 0)) -> None:
        """Queue DONE (naming the ``heads`` sent) or ABORT; with ``wait_timeout`` block until
        it is written."""
        if wait_timeout is None:
            # Best effort: if it cannot go out, the receiver fails the transfer anyway
            # when this connection drops.
            with contextlib.suppress(OSError):
                self._put(_Frame(encode_header(msg_type, transfer_id, heads=heads)), 1.0)
            return
        written = threading.Event()
        self._put(_Frame(encode_header(msg_type, transfer_id, heads=heads), written=written),
                  wait_timeout)
        if not written.wait(wait_timeout):
            raise TimeoutError(f"not written within {wait_timeout} s")
        if self.error is not None:
            raise ConnectionError(f"connection lost: {self.error}")

    def alive(self) -> bool:
        """False once the receiver hung up. It never speaks after the handshake, so a
        readable socket means EOF or reset: checked before reusing the connection, so a
        restarted or closed receiver is noticed at ``begin``, not after a layer is lost."""
        if self.error is not None:
            return False
        try:
            readable, _, _ = select.select([self._sock], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable

    def close(self, timeout: float = 5.0) -> None:
        """Let queued frames go out for up to ``timeout`` s (0: don't), then cut."""
        sentinel_queued = False
        if timeout > 0:
            try:
                self._queue.put(None, timeout=timeout)
                sentinel_queued = True
            except queue.Full:
                pass
            self._thread.join(timeout)
        if self._thread.is_alive():
            self.error = self.error or ConnectionAbortedError("connection closed")
            self._shutdown()  # unblocks a sendall to a receiver that stopped reading
            if not sentinel_queued:
                self._queue.put(None)  # the thread now drains without sending
            self._thread.join()
        self._sock.close()

    def _put(self, frame: _Frame, timeout: float) -> None:
        if self.error is not None:
            raise ConnectionError(f"connection lost: {self.error}")
        try:
            self._queue.put(frame, timeout=timeout)
        except queue.Full as exc:
            raise TimeoutError(f"send queue stayed full for {timeout} s") from exc

    def _shutdown(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def _run(self) -> None:
        while True:
            frame = self._queue.get()
            if frame is None:
                return
            if self.error is None:
                try:
                    self._sock.sendall(frame.header)
                    if frame.payload is not None:
                        self._sock.sendall(frame.payload)
                        frame.transfer.bytes_sent += frame.payload.size
                except OSError as exc:
                    self.error = exc
                    self._shutdown()
            if frame.written is not None:
                frame.written.set()
