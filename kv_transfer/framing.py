"""The TCP backend's wire format: fixed binary frames, never pickle.

Every frame is a fixed 26-byte header, the transfer id (utf-8), then a payload::

    magic b"PDKV" | version u8 | type u8 | id_len u16 | layer u16 | num_blocks u32 |
    head_offset u16 | head_count u16 | payload_len u64          (network byte order)

A connection starts with a handshake. The sender sends HELLO (id = the receiver's worker
id, no payload). A receiver without a shared secret answers HELLO: accepted. A receiver
with one answers CHALLENGE (id = its worker id, payload = a fresh random ``NONCE_BYTES``
nonce); the sender answers AUTH (payload = ``auth_mac``: HMAC-SHA256 keyed by the secret
over nonce || worker id), and the receiver, after a constant-time compare, answers HELLO
or closes the connection. The receiver's HELLO carries, as its id, the incarnation of its
cache: the sender refuses to send a transfer reserved on any other incarnation. The secret itself never crosses the wire, and a
recorded AUTH is useless against any other nonce or worker.

Then, per transfer: one LAYER per layer (payload = the raw bytes of that layer's contiguous
[2, num_blocks, block_size, head_count, head_dim] K/V, written to the receiver's heads
``head_offset ..``: all of them unless prefill and decode run different TP degrees, and
``head_count`` 0 means all of them; dtype
and the rest of the shape come from the endpoint's spec) and finally DONE, naming the heads
this sender sent (several senders may each fill some heads of one transfer), or ABORT to
give up. Frames
of many transfers may interleave on one connection; each frame is whole.

Decoding here only checks what is checkable without the receiver's state (magic, version,
type, per-type length limits); the receiver validates the rest against its spec.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import socket
import struct
from dataclasses import dataclass

from pdserve.kv_transfer.messages import MAX_TRANSFER_ID_BYTES

MAGIC = b"PDKV"
# 4: head window in LAYER and DONE; 3: HELLO answer names the cache's incarnation;
# 2: challenge-response
VERSION = 4
NONCE_BYTES = 32
MAC_BYTES = hashlib.sha256().digest_size
_HANDSHAKE_PAYLOAD = {"HELLO": 0, "CHALLENGE": NONCE_BYTES, "AUTH": MAC_BYTES}

_HEADER = struct.Struct("!4sBBHHIHHQ")
HEADER_SIZE = _HEADER.size


class ProtocolError(ValueError):
    """The peer broke the protocol; the connection must be dropped."""


class MsgType(enum.IntEnum):
    HELLO = 1
    LAYER = 2
    DONE = 3
    ABORT = 4
    CHALLENGE = 5
    AUTH = 6


@dataclass(frozen=True)
class FrameHeader:
    msg_type: MsgType
    id_len: int
    layer: int = 0
    num_blocks: int = 0
    payload_len: int = 0
    head_offset: int = 0
    head_count: int = 0

    def __post_init__(self) -> None:
        if self.id_len > MAX_TRANSFER_ID_BYTES:
            raise ProtocolError(f"transfer id of {self.id_len} bytes is too long")
        if self.msg_type.name in _HANDSHAKE_PAYLOAD:
            want = _HANDSHAKE_PAYLOAD[self.msg_type.name]
            if (self.payload_len != want or self.num_blocks or self.layer or self.head_offset
                    or self.head_count):
                raise ProtocolError(f"{self.msg_type.name} frame must carry exactly {want} "
                                    f"payload bytes and no blocks, got {self.payload_len}")
            return
        if self.id_len == 0:
            raise ProtocolError(f"{self.msg_type.name} without a transfer id")
        if self.head_count == 0 and self.head_offset:
            raise ProtocolError("a head offset without a head count")
        if self.msg_type is MsgType.LAYER:
            if self.num_blocks < 1 or self.payload_len < 1:
                raise ProtocolError("LAYER frame without blocks")
        elif self.payload_len or self.num_blocks:
            raise ProtocolError(f"{self.msg_type.name} frame must not carry a payload")


def encode_header(msg_type: MsgType, transfer_id: str, layer: int = 0, num_blocks: int = 0,
                  payload_len: int = 0, heads: tuple[int, int] = (0, 0)) -> bytes:
    """Header plus transfer id: everything of a frame but its payload. ``heads``: (first,
    count) of the receiver's KV heads (LAYER and DONE)."""
    tid = transfer_id.encode()
    # validate what we send
    FrameHeader(msg_type, len(tid), layer, num_blocks, payload_len, *heads)
    return _HEADER.pack(MAGIC, VERSION, msg_type, len(tid), layer, num_blocks, *heads,
                        payload_len) + tid


def auth_mac(secret: bytes, nonce: bytes, worker_id: str) -> bytes:
    """The AUTH payload: proves knowledge of ``secret`` for this nonce and receiver only."""
    return hmac.new(secret, nonce + worker_id.encode(), hashlib.sha256).digest()


def decode_header(raw: bytes) -> FrameHeader:
    if len(raw) != HEADER_SIZE:
        raise ProtocolError(f"short header ({len(raw)} bytes)")
    (magic, version, msg_type, id_len, layer, num_blocks, head_offset, head_count,
     payload_len) = _HEADER.unpack(raw)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r}")
    if version != VERSION:
        raise ProtocolError(f"unsupported protocol version {version}")
    try:
        kind = MsgType(msg_type)
    except ValueError as exc:
        raise ProtocolError(f"unknown message type {msg_type}") from exc
    return FrameHeader(kind, id_len, layer, num_blocks, payload_len, head_offset, head_count)


def decode_transfer_id(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError("transfer id is not utf-8") from exc


def recv_exact(sock: socket.socket, n: int, *, eof_ok: bool = False) -> bytes | None:
    """Read exactly ``n`` bytes. EOF before the first byte returns None if ``eof_ok``;
    EOF anywhere else is a truncated frame (``ConnectionError``)."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            if got == 0 and eof_ok:
                return None
            raise ConnectionError(f"connection closed after {got} of {n} bytes")
        got += k
    return bytes(buf)


def recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from the socket (large payloads land without intermediate copies)."""
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError(f"connection closed after {got} of {n} payload bytes")
        got += k


def read_frame_start(sock: socket.socket) -> tuple[FrameHeader, str] | None:
    """Header and transfer id of the next frame; None on a clean EOF between frames."""
    raw = recv_exact(sock, HEADER_SIZE, eof_ok=True)
    if raw is None:
        return None
    header = decode_header(raw)
    tid = decode_transfer_id(recv_exact(sock, header.id_len)) if header.id_len else ""
    return header, tid
