"""Decode worker failure paths: unclaimed reservations expire; a failed transfer frees blocks."""

from __future__ import annotations

import pytest

from pdserve.decode_worker.messages import ReserveRequest, StartDecode
from pdserve.decode_worker.worker import DecodeWorker, NoCapacityError
from pdserve.engine.config import EngineConfig
from pdserve.engine.sampler import SampledToken
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
