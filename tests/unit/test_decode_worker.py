"""Decode worker failure paths: unclaimed reservations expire; a failed transfer frees blocks."""

from __future__ import annotations

import pytest

from pdserve.decode_worker.messages import NoCapacityError, ReserveRequest, StartDecode
from pdserve.decode_worker.worker import DecodeWorker
from pdserve.engine.config import EngineConfig
from pdserve.engine.messages import SampledToken
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kv_transfer.base import TransferState
from pdserve.kv_transfer.registry import create_receiver


@pytest.fixture()
def worker(demo_model_dir):
    cfg = EngineConfig(model=str(demo_model_dir), device="cpu", num_kv_blocks=16, block_size=16,
                       max_num_seqs=4)
    w = DecodeWorker.from_config("d0", cfg, lambda spec: create_receiver("inprocess", spec, "d0"))
    yield w
    w.receiver.close()


def test_unclaimed_reservation_expires_after_the_lease(worker):
    worker.lease_s = 0.0  # every reservation is already stale
    worker.reserve(ReserveRequest("r1", 100))
    assert worker.blocks.stats().num_used_blocks == 7
    worker.housekeeping()
    assert worker.blocks.stats().num_used_blocks == 0
    assert worker.stats().num_reserved == 0
    assert not worker.release("r1")  # already gone: releasing again is a no-op


def test_started_reservation_is_not_expired(worker):
    worker.lease_s = 0.0
    worker.reserve(ReserveRequest("r1", 20))
    worker.start(StartDecode("r1", tuple([5] * 20), SamplingParams(max_tokens=4),
                             SampledToken(7, None, ())))
    worker.housekeeping()
    assert worker.blocks.stats().num_used_blocks == 2


def test_reservation_beyond_capacity_is_refused_without_side_effects(worker):
    worker.reserve(ReserveRequest("big", 200))  # 13 of 16 blocks
    with pytest.raises(NoCapacityError):
        worker.reserve(ReserveRequest("r2", 100))
    assert worker.blocks.stats().num_used_blocks == 13
    assert worker.release("big")
    assert worker.blocks.stats().num_used_blocks == 0


def test_failed_transfer_ends_the_request_and_frees_blocks(worker):
    worker.reserve(ReserveRequest("r1", 20))
    # what a backend does when the link breaks mid-transfer (before delivery completes)
    worker.receiver._table.transition("r1", TransferState.FAILED, "link broke")
    worker.start(StartDecode("r1", tuple([5] * 20), SamplingParams(max_tokens=4),
                             SampledToken(7, None, ())))
    assert worker.receiver.state("r1") is TransferState.FAILED
    batch = worker.step()
    (delta,) = batch.deltas
    assert delta.error and delta.finish_reason == "abort"
    assert worker.blocks.stats().num_used_blocks == 0


def test_gauges_follow_every_change_not_only_steps(worker):
    from pdserve.engine.metrics import WorkerMetrics

    worker.metrics = WorkerMetrics("demo", "decode", "d0")

    def gauge(name):
        return worker.metrics.registry.get_sample_value(name, worker.metrics.labels)

    worker.reserve(ReserveRequest("r1", 20))
    assert gauge("pdserve_num_requests_waiting") == 1
    assert gauge("pdserve_kv_cache_usage_perc") == 2 / 16
    worker.release("r1")  # a cancel before the KV came: no step follows
    assert gauge("pdserve_num_requests_waiting") == 0
    assert gauge("pdserve_kv_cache_usage_perc") == 0
    worker.reserve(ReserveRequest("r2", 20))
    worker.start(StartDecode("r2", tuple([5] * 20), SamplingParams(max_tokens=50),
                             SampledToken(7, None, ())))
    worker.step()  # admitted: running
    assert gauge("pdserve_num_requests_running") == 1
    worker.release("r2")  # the router found a stop string: the burst is over
    assert gauge("pdserve_num_requests_running") == 0
    assert gauge("pdserve_kv_cache_usage_perc") == 0


def test_start_of_a_request_reserved_before_a_restart_is_refused(worker):
    from pdserve.decode_worker.messages import ReservationLost

    params, first = SamplingParams(max_tokens=4), SampledToken(7, None, ())
    with pytest.raises(ReservationLost, match="released"):
        worker.start(StartDecode("never", (5, 5), params, first))
    worker.reserve(ReserveRequest("r1", 20))
    with pytest.raises(ReservationLost, match="restarted"):
        worker.start(StartDecode("r1", tuple([5] * 20), params, first, incarnation="f" * 32))
    assert worker.stats().num_reserved == 1  # the live reservation is untouched
