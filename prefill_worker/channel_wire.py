"""Wire format of the direct router <-> prefill-worker channel: typed frames, never pickle.

The request path's three calls (``prefill``, ``set_destination``, ``abort``) can travel on
a Unix socket between the router and a prefill worker on the same host instead of as Ray
actor calls (``channel_server.py``, ``router/prefill_channel.py``; Ray keeps placement,
lifecycle, health and every other call). A Ray call costs ~2 ms round trip here, a socket
round trip ~0.07 ms (benchmarks/results/router_overhead_floor.md).

A frame is a 4-byte big-endian length, then that many bytes of MessagePack of one message
below (msgspec, tagged by type). Decoding is typed: each message, and the dataclasses in
it (``PrefillRequest``, ``KVDestination``, ``PrefillResult``, ...), is built field by
field from the declared types and runs its own ``__post_init__`` validation, so a frame
that is not exactly one of these messages is a ``ProtocolError`` and the connection is
dropped. Every call carries a ``call_id`` its reply repeats; replies may come in any order.
The worker speaks first: ``Hello`` names the worker and this life of its process.
"""

from __future__ import annotations

import asyncio
import struct

import msgspec

from pdserve.kv_transfer.messages import KVDestination
from pdserve.prefill_worker.messages import PrefillRequest, PrefillResult

VERSION = 1
MAX_FRAME_BYTES = 64 << 20  # a 1M-token prompt is ~5 MiB of MessagePack
_LENGTH = struct.Struct("!I")


class ProtocolError(ValueError):
    """The peer sent something that is not a frame of this protocol: drop the connection."""


class Hello(msgspec.Struct, frozen=True, tag=True):
    """The worker's first frame."""

    version: int
    worker_id: str
    incarnation: str  # this life of the worker process (a restart gives a new one)


class PrefillCall(msgspec.Struct, frozen=True, tag=True):
    call_id: int
    request: PrefillRequest


class DestinationCall(msgspec.Struct, frozen=True, tag=True):
    call_id: int
    destination: KVDestination


class AbortCall(msgspec.Struct, frozen=True, tag=True):
    call_id: int
    request_id: str


class PrefillDone(msgspec.Struct, frozen=True, tag=True):
    call_id: int
    result: PrefillResult


class Ack(msgspec.Struct, frozen=True, tag=True):
    """The reply to ``DestinationCall`` (``value`` None) and ``AbortCall``."""

    call_id: int
    value: bool | None = None


class Failed(msgspec.Struct, frozen=True, tag=True):
    """The call raised on the worker: its exception's type name and message."""

    call_id: int
    error_type: str
    message: str


Call = PrefillCall | DestinationCall | AbortCall
Reply = PrefillDone | Ack | Failed

_encoder = msgspec.msgpack.Encoder()
_call_decoder = msgspec.msgpack.Decoder(Call)
_reply_decoder = msgspec.msgpack.Decoder(Reply | Hello)


def encode(msg: Call | Reply | Hello) -> bytes:
    """One frame: the length prefix and the message."""
    body = _encoder.encode(msg)
    if len(body) > MAX_FRAME_BYTES:
        raise ValueError(f"a frame of {len(body)} bytes exceeds {MAX_FRAME_BYTES}")
    return _LENGTH.pack(len(body)) + body


LENGTH_BYTES = _LENGTH.size


def frame_length(head: bytes) -> int:
    """The body length a frame's header announces; ``ProtocolError`` above the limit."""
    (length,) = _LENGTH.unpack(head)
    if length > MAX_FRAME_BYTES:
        raise ProtocolError(f"a frame of {length} bytes exceeds {MAX_FRAME_BYTES}")
    return length


def decode_call(body: bytes) -> Call:
    """A router's call from a frame's body (worker side, read by a plain thread)."""
    return _decode(_call_decoder, body)


async def _read_body(reader: asyncio.StreamReader) -> bytes | None:
    """The next frame's bytes; None at a clean end of stream (between frames)."""
    try:
        head = await reader.readexactly(_LENGTH.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise ProtocolError("the stream ended inside a frame header") from None
    length = frame_length(head)
    try:
        return await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise ProtocolError("the stream ended inside a frame") from None


def _decode(decoder: msgspec.msgpack.Decoder, body: bytes):
    try:
        return decoder.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"not a valid message: {str(exc)[:200]}") from None


async def read_call(reader: asyncio.StreamReader) -> Call | None:
    """The router's next call (worker side); None when the router closed the channel."""
    body = await _read_body(reader)
    return None if body is None else _decode(_call_decoder, body)


async def read_reply(reader: asyncio.StreamReader) -> Reply | Hello | None:
    """The worker's next frame (router side); None when the worker closed the channel."""
    body = await _read_body(reader)
    return None if body is None else _decode(_reply_decoder, body)
