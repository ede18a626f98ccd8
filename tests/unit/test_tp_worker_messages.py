"""What the ranks of tensor-parallel workers tell each other, and the configuration checks.

The typed codecs of a prefill step's ``ShipOrders`` and a decode instance's
``RankControl`` and endpoints (bytes in a step message, never pickle): round trips, and
malformed bytes refused. A destination that names every decode rank, through the router's
wire format too. A decode follower's hooks on a real receiver: registration, polls and
forgetting. The launch configuration: TP degrees, checksums between degrees, resources.
"""

from __future__ import annotations

import pytest
import torch

from pdserve.cluster.launch.launcher import ClusterSpec, PoolSpec, kv_between_degrees
from pdserve.cluster.launch.placement_check import Demand
from pdserve.decode_worker.follower import DecodeRankHooks
from pdserve.decode_worker.rank_control import (
    RankControl,
    Register,
    decode_control,
    decode_endpoint,
    encode_control,
    encode_endpoint,
)
from pdserve.engine.config import EngineConfig
from pdserve.engine.kv_cache import KVCacheSpec
from pdserve.engine.parallel.step_message import StepKind
from pdserve.kv_transfer.backend_config import KVTransferConfig
from pdserve.kv_transfer.messages import KVDestination
from pdserve.kv_transfer.registry import create_receiver
from pdserve.kv_transfer.tp_destination import TPKVDestination
from pdserve.prefill_worker import channel_wire
from pdserve.prefill_worker.rank_sends import (
    ShipOrder,
    ShipOrders,
    decode_orders,
    encode_orders,
)


def _receivers(d: int, heads_total: int = 4, backend: str = "inprocess"):
    per = max(1, heads_total // d)
    spec = KVCacheSpec(2, 16, 4, per, 8, torch.float32)
    return [create_receiver(backend, spec, f"decode-0-rank{r}")[0] for r in range(d)]


def _destination(receivers, blocks=(3, 5, 9)) -> KVDestination:
    tp = TPKVDestination("req-1", tuple(r.endpoint for r in receivers), blocks, 10, 4)
    return tp.as_destination()


def test_a_destination_names_every_decode_rank():
    receivers = _receivers(2)
    dest = _destination(receivers)
    assert dest.endpoint == receivers[0].endpoint
    assert dest.rank_endpoints == (receivers[1].endpoint,)
    whole = TPKVDestination.of(dest, 4)
    assert whole.tp == 2 and whole.rank(1).endpoint == receivers[1].endpoint
    # a tp 1 destination is the one-rank view
    single = KVDestination("r", receivers[0].endpoint, (1,), 3)
    with pytest.raises(ValueError, match="holds 4 of 4"):
        TPKVDestination.of(single, 4)  # rank 0 holds 2 heads, not all 4
    with pytest.raises(ValueError, match="rank_endpoints"):
        KVDestination("r", receivers[0].endpoint, (1,), 3, rank_endpoints=("not one",))


def test_the_router_channel_carries_every_rank():
    dest = _destination(_receivers(2))
    frame = channel_wire.encode(channel_wire.DestinationCall(4, dest))
    msg = channel_wire._decode(channel_wire._call_decoder, frame[4:])
    assert msg.destination == dest


def test_ship_orders_round_trip_and_refuse_garbage():
    dest = _destination(_receivers(2))
    orders = ShipOrders((ShipOrder(dest, (7, 1, 4)),), "off")
    assert decode_orders(encode_orders(orders)) == orders
    with pytest.raises(ValueError, match="ship order"):
        decode_orders(b"\x93garbage")
    bad = encode_orders(orders).replace(b"req-1", b"")  # an empty transfer id
    with pytest.raises(ValueError):
        decode_orders(bad)


def test_rank_control_and_endpoints_round_trip():
    receivers = _receivers(2)
    msg = RankControl(("a",), (Register("b", (1, 2)),), ("c", "d"))
    assert decode_control(encode_control(msg)) == msg and msg.reply == 3
    assert decode_endpoint(encode_endpoint(receivers[1].endpoint)) == receivers[1].endpoint
    with pytest.raises(ValueError, match="rank control"):
        decode_control(b"\xc1")
    with pytest.raises(ValueError, match="KV endpoint"):
        decode_endpoint(encode_control(msg))


@pytest.mark.parametrize("backend", ["inprocess", "tcp"])
def test_decode_follower_hooks_track_transfers(backend):
    (receiver,) = _receivers(1, backend=backend)
    hooks = DecodeRankHooks(receiver)
    try:
        def ask(**fields):
            msg = RankControl(**fields)
            return list(hooks.answer(StepKind.CONTROL, encode_control(msg), msg.reply))

        assert ask(register=(Register("t1", (1, 2)), Register("t2", (3,)))) == [1, 1]
        assert ask(register=(Register("t1", (4,)),)) == [0]  # already expected here
        assert ask(poll=("t1", "t2", "never")) == [1, 1, 0]  # pending, pending, unknown
        receiver.mark_delivered("t2")
        if backend == "inprocess":  # the sender's finish is delivery
            assert ask(poll=("t2",)) == [2]
        assert ask(forget=("t1", "t2"), poll=("t1",)) == [0]
    finally:
        receiver.close()


def test_checksums_between_tp_degrees():
    kv = KVTransferConfig(backend="shm")
    assert kv_between_degrees(kv, 2, 2) is kv  # equal degrees: rank 0's share is checked
    assert kv_between_degrees(kv, 1, 2).checksum == "off"  # auto: off
    off = KVTransferConfig(backend="shm", checksum="off")
    assert kv_between_degrees(off, 4, 2) is off
    with pytest.raises(ValueError, match="equal prefill and decode tp"):
        kv_between_degrees(KVTransferConfig(backend="shm", checksum="full"), 2, 1)
    engine = EngineConfig(model="m")
    with pytest.raises(ValueError, match="equal prefill and decode tp"):
        ClusterSpec(engine, PoolSpec(tp=2), PoolSpec(tp=1),
                    KVTransferConfig(backend="tcp", checksum="sample"))
    spec = ClusterSpec(engine, PoolSpec(tp=2), PoolSpec(tp=1), KVTransferConfig(backend="tcp"))
    assert spec.kv_config().checksum == "off"
    with pytest.raises(ValueError, match="colocated"):
        ClusterSpec(engine, colocated=PoolSpec(tp=2))


def test_tp_pools_ask_for_every_rank():
    with pytest.raises(ValueError, match="tp must be"):
        PoolSpec(tp=0)
    pool = PoolSpec(count=2, num_cpus=0.5, num_gpus=1, resources=(("fast", 1.0),), tp=4)
    demand = Demand.of_pool("prefill", pool)
    assert demand.count == 2 and demand.needs == {"CPU": 2.0, "GPU": 4.0, "fast": 4.0}
    assert pool.engine(EngineConfig(model="m")).tensor_parallel_size == 4
    assert PoolSpec().rank_launcher("prefill", KVTransferConfig(), None) is None
    spec = ClusterSpec(EngineConfig(model="m"), PoolSpec(2, tp=2), PoolSpec(1, tp=4))
    assert spec.num_workers == 3 and spec.num_ranks == 8


def test_a_tp_worker_needs_a_rank_launcher():
    from pdserve.engine.parallel.rank_launcher import start_ranks

    assert start_ranks(None, EngineConfig(model="m"), "w") is None  # tp 1: no group
    with pytest.raises(ValueError, match="needs a RankLauncher"):
        start_ranks(None, EngineConfig(model="m", tensor_parallel_size=2), "prefill-0")
