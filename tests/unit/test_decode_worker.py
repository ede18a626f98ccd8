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


# -- prefill on the decode worker itself (conditional disaggregation) ------------------------
def _drain(worker) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    while worker.has_work():
        batch = worker.step()
        for d in () if batch is None else batch.deltas:
            assert d.error is None, d.error
            out.setdefault(d.request_id, []).extend(d.token_ids)
    return out


def test_local_prefill_streams_the_engines_tokens_beside_a_disaggregated_request(
        worker, demo_model_dir):
    from pdserve.decode_worker.messages import LocalPrefillRequest
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.engine.model_runner import ModelInput

    prompts = [[3, 14, 15, 92, 65, 35], [27, 18, 28] * 7]
    params = SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True)
    engine = LLMEngine.from_config(EngineConfig(model=str(demo_model_dir), device="cpu"))
    want = [list(c.token_ids) for c in engine.generate(prompts, params)]
    # r0 the disaggregated way (its KV computed in place, as a transfer would leave it),
    # r1 prefilled here; both decode in the same batches
    dest = worker.reserve(ReserveRequest("r0", len(prompts[0]))).destination
    worker.runner.run([ModelInput(prompts[0], 0, list(dest.block_ids), sample=False)])
    worker.receiver.mark_delivered("r0")
    worker.start(StartDecode("r0", tuple(prompts[0]), params,
                             SampledToken(want[0][0], None, ())))
    worker.prefill_local(LocalPrefillRequest("r1", tuple(prompts[1]), params))
    assert worker.stats().num_waiting == 1  # queued like a preempted request, no blocks yet
    out = _drain(worker)
    assert [want[0][0], *out["r0"]] == want[0]
    assert out["r1"] == want[1]  # the first token came through the stream too
    assert worker.blocks.stats().num_used_blocks == 0


def test_local_prefill_is_refused_at_max_num_seqs_or_without_free_blocks(worker):
    from pdserve.decode_worker.messages import LocalPrefillRequest

    params = SamplingParams(max_tokens=4)
    worker.reserve(ReserveRequest("big", 200))  # 13 of 16 blocks
    with pytest.raises(NoCapacityError, match="free KV blocks"):
        worker.prefill_local(LocalPrefillRequest("r1", tuple([5] * 60), params))  # 4 blocks
    for i in range(3):
        worker.prefill_local(LocalPrefillRequest(f"s{i}", (5, 6), params))
    with pytest.raises(NoCapacityError, match="max_num_seqs"):
        worker.prefill_local(LocalPrefillRequest("s3", (5, 6), params))
    with pytest.raises(ValueError, match="already holds"):
        worker.prefill_local(LocalPrefillRequest("s0", (5, 6), params))
    with pytest.raises(ValueError, match="context"):
        worker.prefill_local(LocalPrefillRequest("huge", tuple([5] * 9000), params))
    stats = worker.stats()
    assert (stats.num_reserved, stats.num_waiting) == (1, 3)  # the refused left nothing
    for rid in ("big", "s0", "s1", "s2"):
        assert worker.release(rid)
    assert worker.blocks.stats().num_used_blocks == 0 and not worker.has_work()


def test_releasing_a_local_request_frees_its_blocks_queued_or_running(worker):
    from pdserve.decode_worker.messages import LocalPrefillRequest

    params = SamplingParams(max_tokens=100, ignore_eos=True)
    worker.prefill_local(LocalPrefillRequest("q", tuple([5] * 40), params))
    assert worker.release("q")  # still queued: nothing allocated, nothing left behind
    assert not worker.has_work() and worker.stats().num_waiting == 0
    worker.prefill_local(LocalPrefillRequest("r", tuple([5] * 40), params))
    worker.step()
    worker.step()
    assert worker.blocks.stats().num_used_blocks == 3
    assert worker.release("r")
    assert worker.blocks.stats().num_used_blocks == 0 and not worker.has_work()
    assert not worker.release("r")
