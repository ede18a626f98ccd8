"""What rank 0 of a tensor-parallel decode instance tells its other ranks' KV receivers.

Every rank of a decode instance has its own receiver (its cache holds its KV heads), and
every rank reserved the same blocks, since rank 0's block manager decides for all. Where
the sender's ``finish`` is delivery (shm, CUDA IPC: ``KVReceiver.sender_delivers``) the
other ranks' receivers need nothing. Where the receiver sees the data arrive itself (TCP),
rank 0 must tell them which transfers to expect before the reservation is handed out,
learn from them whether their part landed, and tell them to forget finished ones. One
``RankControl`` message does all three (in a CONTROL step message's ``extra``); every
rank answers one integer per registration (1: expected) and one per polled transfer
(``STATE_CODES``), and the MIN over the ranks comes back to rank 0.

At start-up every rank's endpoint reaches rank 0 (``encode_endpoint`` through the group's
byte all-gather), so a reservation's ``KVDestination`` can name every rank.
Wire form: MessagePack (msgspec) into typed structs and validated dataclasses; never pickle.
"""

from __future__ import annotations

import msgspec

from pdserve.kv_transfer.messages import KVEndpoint
from pdserve.kv_transfer.tracker import TransferState

# MIN over the ranks: FAILED (or unknown) anywhere fails; DONE only if DONE everywhere.
STATE_CODES = {TransferState.FAILED: 0, TransferState.PENDING: 1,
               TransferState.TRANSFERRING: 1, TransferState.DONE: 2}
FAILED, LANDED = 0, 2


class Register(msgspec.Struct, frozen=True):
    transfer_id: str
    block_ids: tuple[int, ...]


class RankControl(msgspec.Struct, frozen=True):
    forget: tuple[str, ...] = ()
    register: tuple[Register, ...] = ()
    poll: tuple[str, ...] = ()

    @property
    def reply(self) -> int:
        return len(self.register) + len(self.poll)


_encoder = msgspec.msgpack.Encoder()
_control = msgspec.msgpack.Decoder(RankControl)
_endpoint = msgspec.msgpack.Decoder(KVEndpoint)


def encode_control(msg: RankControl) -> bytes:
    return _encoder.encode(msg)


def decode_control(data: bytes) -> RankControl:
    return _decode(_control, data, "rank control")


def encode_endpoint(endpoint: KVEndpoint) -> bytes:
    return _encoder.encode(endpoint)


def decode_endpoint(data: bytes) -> KVEndpoint:
    return _decode(_endpoint, data, "KV endpoint")


def _decode(decoder: msgspec.msgpack.Decoder, data: bytes, what: str):
    try:
        return decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ValueError(f"not a valid {what} message: {str(exc)[:200]}") from None
