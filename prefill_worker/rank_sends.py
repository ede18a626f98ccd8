"""What rank 0 of a tensor-parallel prefill instance tells its other ranks to ship.

Every rank of a prefill instance holds only its KV heads, so every rank sends its own
share of a request's KV (``kv_transfer/tp_send.RankSends``). Rank 0 decides which
requests ship in a step and puts one ``ShipOrder`` per request in the step message's
``extra`` (``engine/parallel/executor.py``): the destination (which names every decode
rank), the request's blocks in this instance's cache, and whether the model computes the
KV in this very step (the layer hook ships each layer as it is computed) or it is already
there (a parked request: all layers at once, in a CONTROL message). After its part, every
rank answers one integer per order, 1 for a transfer that finished, 0 for one that
failed; rank 0 reports a request's first token only when the MIN over the ranks is 1.

Wire form: MessagePack (msgspec) of ``ShipOrders``, decoded into the typed structs and
their validated dataclasses (``KVDestination``); never pickle.
"""

from __future__ import annotations

import msgspec

from pdserve.kv_transfer.messages import KVDestination


class ShipOrder(msgspec.Struct, frozen=True):
    destination: KVDestination
    block_table: tuple[int, ...]  # the request's blocks in the prefill instance's cache


class ShipOrders(msgspec.Struct, frozen=True):
    orders: tuple[ShipOrder, ...]
    checksum: str = "off"


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(ShipOrders)


def encode_orders(orders: ShipOrders) -> bytes:
    return _encoder.encode(orders)


def decode_orders(data: bytes) -> ShipOrders:
    """``ValueError`` for bytes that are not exactly a ``ShipOrders``."""
    try:
        return _decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ValueError(f"not a valid ship order message: {str(exc)[:200]}") from None
