"""SLO-aware routing: TTFT prediction from a profile, worker choice, admission control."""

from __future__ import annotations

import dataclasses

import grpc
import pytest

from pdserve.cluster.cli.client import Client, build_request
from pdserve.cluster.launch.local import LocalCluster
from pdserve.engine.config import EngineConfig
from pdserve.engine.latency_profile import DecodeFit, LatencyProfile, ParallelEntry, PrefillFit
from pdserve.router.config import RouterConfig
from pdserve.router.policy import RoutingRequest, WorkerLoad
from pdserve.router.policy_slo import SloAware
from pdserve.router.server import ServerConfig
from pdserve.router.slo import SloConfig


def profile(a=10.0, b=1.0, c=0.0, da=5.0, db=0.01, dc=1.0) -> LatencyProfile:
    return LatencyProfile("toy", "test", (ParallelEntry(1, PrefillFit(a, b, c),
                                                        DecodeFit(da, db, dc), 10_000),),
                          kv_bytes_per_token=100)


def req(n=100, out=10, ttft=None, tpot=None):
    return RoutingRequest("r", n, out, ttft, tpot)


def test_predicted_ttft_batches_the_queue_under_the_token_budget():
    pol = SloAware(profile(), prefill_token_budget=250)
    load = WorkerLoad("p0", prefill_queue={"a": 100, "b": 100, "c": 100})
    # batches [100, 100] then [100, 100(own)]: 2 * (10 + 200) ms
    assert pol.predict_ttft_s(req(100), load) == pytest.approx(0.420)
    assert pol.predict_ttft_s(req(100), WorkerLoad("idle")) == pytest.approx(0.110)


def test_prefill_choice_is_lowest_predicted_ttft_not_fewest_requests():
    pol = SloAware(profile(), prefill_token_budget=4096)
    busy_long = WorkerLoad("p0", prefill_queue={"a": 3000})
    busy_short = WorkerLoad("p1", prefill_queue={"a": 10, "b": 10, "c": 10})
    assert pol.rank_prefill(req(100), [busy_long, busy_short]) == ["p1", "p0"]
    assert pol.rank_prefill(req(100), [dataclasses.replace(busy_short, healthy=False),
                                       busy_long]) == ["p0"]


def test_decode_choice_prefers_headroom_then_predicted_tpot():
    pol = SloAware(profile())
    full = WorkerLoad("d0", free_blocks=1, total_blocks=100, decode_contexts={})
    crowded = WorkerLoad("d1", free_blocks=90, total_blocks=100,
                         decode_contexts={str(i): 500 for i in range(30)})
    light = WorkerLoad("d2", free_blocks=90, total_blocks=100, decode_contexts={"x": 50})
    assert pol.rank_decode(req(100, 10), [full, crowded, light]) == ["d2", "d1", "d0"]
    # a TPOT target that only the light worker meets pushes the crowded one behind... still ranks
    assert pol.rank_decode(req(100, 10, tpot=0.02), [crowded, light])[0] == "d2"


def engine(model):
    return EngineConfig(model=str(model), device="cpu", num_kv_blocks=256, max_num_seqs=16)


@pytest.mark.parametrize("admission, expect_reject", [("reject", True), ("best_effort", False)])
def test_admission_rejects_requests_that_cannot_meet_ttft(demo_model_dir, tmp_path, admission,
                                                          expect_reject):
    prof = tmp_path / "profile.json"
    profile(a=50.0, b=1.0).save(prof)  # predicts >= 50 ms for any prompt
    router = RouterConfig(model=str(demo_model_dir), server=ServerConfig(port=0, metrics_port=0),
                          policy="slo_aware", profile=str(prof), admission=admission,
                          slo=SloConfig(ttft_s=10.0, tpot_s=1.0))
    with LocalCluster(engine(demo_model_dir), router=router) as c, \
            Client(c.address, timeout_s=30) as client:
        ok = client.generate(build_request([5] * 20, max_tokens=3))  # 70 ms << 10 s
        assert len(ok.token_ids) == 3
        tight = build_request([5] * 20, max_tokens=3)
        tight.slo.ttft_ms = 20.0  # per-request override below the 70 ms prediction
        if expect_reject:
            with pytest.raises(grpc.RpcError) as err:
                client.generate(tight)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "predicted TTFT" in err.value.details()
            assert c.server.orchestrator.rejected == 1
        else:
            assert len(client.generate(tight).token_ids) == 3
