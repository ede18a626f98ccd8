"""The full request path in one process (real workers, router and gRPC; no Ray).

Same worker and router code as the Ray cluster: greedy output through the cluster equals
the single-process engine; bad input gets INVALID_ARGUMENT; cancellation and transfer
failures free every block on both workers.
"""

from __future__ import annotations

import random
import threading

import grpc
import pytest

from pdserve.cluster.cli.client import Client, build_request
from pdserve.cluster.launch.local import LocalCluster
from pdserve.decode_worker.messages import NoCapacityError
from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kv_transfer.base import TransferError
from pdserve.router.hops import HOP_NAMES
from pdserve.router.policy import RoutingRequest
from tests.cluster_helpers import engine_config, wait_until
from tests.cluster_helpers import local_idle as no_blocks_held


@pytest.fixture(scope="module")
def cluster(demo_model_dir):
    with LocalCluster(engine_config(demo_model_dir), num_prefill=2, num_decode=2) as c:
        yield c


def test_concurrent_greedy_matches_single_process_engine(cluster, demo_model_dir):
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 900) for _ in range(rng.randrange(1, 120))] for _ in range(12)]
    max_tokens = [rng.randrange(1, 24) for _ in prompts]
    engine = LLMEngine.from_config(engine_config(demo_model_dir))
    want = [c.token_ids for c in engine.generate(
        prompts, [SamplingParams(max_tokens=m) for m in max_tokens])]
    got: list = [None] * len(prompts)

    def one(i):
        with Client(cluster.address, timeout_s=60) as c:
            got[i] = tuple(c.generate(build_request(prompts[i], max_tokens=max_tokens[i])).token_ids)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == list(want)
    assert wait_until(lambda: no_blocks_held(cluster))


def test_text_prompt_stream_and_usage(cluster, demo_model_dir):
    engine = LLMEngine.from_config(engine_config(demo_model_dir))
    want = engine.generate(["The kitchen smelled of"], SamplingParams(max_tokens=12))[0]
    with Client(cluster.address, timeout_s=60) as c:
        msgs = list(c.stream(build_request("The kitchen smelled of", max_tokens=12)))
    tokens = [t for m in msgs for t in m.token_ids]
    assert tuple(tokens) == want.token_ids
    assert "".join(m.text for m in msgs) == want.text
    assert msgs[-1].finish_reason != 0 and all(m.finish_reason == 0 for m in msgs[:-1])
    assert msgs[-1].usage.completion_tokens == 12
    assert msgs[-1].usage.prompt_tokens == len(want.prompt_token_ids)
    assert msgs[-1].usage.ttft_ms > 0
    # the hop breakdown covers the router's whole way to the first token, in path order
    hops = [(h.name, h.ms) for h in msgs[-1].usage.timing.hops]
    names = [name for name, _ in hops]
    assert names == [n for n in HOP_NAMES if n in names]
    assert {"validate", "prefill_compute", "to_stream"} <= set(names)
    assert all(ms >= 0 for _, ms in hops)
    assert sum(ms for _, ms in hops) >= msgs[-1].usage.ttft_ms
    # the decode reservation: on the path, or (overlapping the prefill) beside it
    beside = [h.name for h in msgs[-1].usage.timing.concurrent]
    assert ("reserve_call" in names) != ("reserve_call" in beside)


@pytest.mark.parametrize("req, fragment", [
    (build_request(""), "empty"),
    (build_request([5] * 5000), "context"),
    (build_request([5, 6], max_tokens=0), "max_tokens"),
    (build_request([5, 6], max_tokens=100000), "max_tokens"),
    (build_request([5, 6], temperature=-1.0), "temperature"),
    (build_request([5, 6], top_p=0.0), "top_p"),
    (build_request([5, 6], top_p=1.5), "top_p"),
    (build_request([5, 10**6]), "vocabulary"),
])
def test_bad_input_is_invalid_argument_and_server_keeps_serving(cluster, req, fragment):
    with Client(cluster.address, timeout_s=30) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.generate(req)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert fragment in err.value.details()
        assert len(c.generate(build_request([7, 8, 9], max_tokens=3)).token_ids) == 3


def test_client_cancel_mid_stream_frees_blocks_on_both_workers(cluster):
    with Client(cluster.address) as c:
        call = c.stream(build_request([11] * 40, max_tokens=2000, temperature=0.0))
        seen = 0
        for msg in call:
            seen += len(msg.token_ids)
            if seen >= 3:
                call.cancel()
                break
    assert wait_until(lambda: no_blocks_held(cluster)), (cluster.decode_stats(),
                                                         cluster.prefill_stats())


def test_failed_transfer_is_retried_then_reported_and_frees_blocks(demo_model_dir):
    with LocalCluster(engine_config(demo_model_dir)) as c:
        sender = c.prefills[0].worker.sender
        real, real_stacked = sender.send_layer, sender.send_layers
        calls = {"n": 0, "fail": lambda n: n == 2}

        def flaky(transfer, layer, kv):
            calls["n"] += 1
            if calls["fail"](calls["n"]):
                raise TransferError(transfer.dest.transfer_id, "injected link failure")
            return real(transfer, layer, kv)

        def flaky_stacked(transfer, first_layer, kv):
            # A prompt whose destination came after its last step ships all layers at
            # once (parked): the same link, so the same failures.
            calls["n"] += 1
            if calls["fail"](calls["n"]):
                raise TransferError(transfer.dest.transfer_id, "injected link failure")
            return real_stacked(transfer, first_layer, kv)

        def break_link():
            sender.send_layer, sender.send_layers = flaky, flaky_stacked

        def mend_link():
            sender.send_layer, sender.send_layers = real, real_stacked

        break_link()
        with Client(c.address, timeout_s=30) as client:
            # One broken transfer: retried, same tokens as an undisturbed request.
            got = client.generate(build_request([9] * 30, max_tokens=8)).token_ids
            assert calls["n"] > 2 and len(got) == 8
            assert c.server.orchestrator.retries == 1
            mend_link()
            want = client.generate(build_request([9] * 30, max_tokens=8)).token_ids
            assert got == want
            # A link that stays broken: the retry budget runs out, UNAVAILABLE, nothing held.
            calls["fail"] = lambda n: True
            break_link()
            with pytest.raises(grpc.RpcError) as err:
                client.generate(build_request([9] * 30, max_tokens=8))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "transfer" in err.value.details().lower()
            assert "4 attempts" in err.value.details()
            assert wait_until(lambda: no_blocks_held(c))
            mend_link()
            assert client.generate(build_request([9] * 30, max_tokens=8)).token_ids == want


def test_health_service_and_reflection(cluster):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(cluster.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "pdserve.v1.Generation"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        reqs = iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        names = {s.name for r in refl.ServerReflectionInfo(reqs, timeout=10)
                 for s in r.list_services_response.service}
        assert "pdserve.v1.Generation" in names and "grpc.health.v1.Health" in names


def test_deadline_exceeded_is_honoured_and_frees_blocks(cluster):
    with Client(cluster.address, timeout_s=0.3) as c:
        with pytest.raises(grpc.RpcError) as err:
            c.generate(build_request([13] * 40, max_tokens=3000))
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: no_blocks_held(cluster))


def test_full_decode_cache_answers_resource_exhausted(demo_model_dir):
    cfg = EngineConfig(model=str(demo_model_dir), device="cpu", num_kv_blocks=8, block_size=16,
                       max_num_seqs=4, max_num_batched_tokens=1024)
    with LocalCluster(cfg) as c, Client(c.address, timeout_s=60) as client:
        hog = client.stream(build_request([21] * 100, max_tokens=20))  # 7 of the 8 blocks
        next(hog)  # it is running and holds its blocks
        with pytest.raises(grpc.RpcError) as err:
            client.generate(build_request([22] * 60, max_tokens=4))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        md = dict(err.value.trailing_metadata() or ())
        assert int(md["retry-after-ms"]) > 0
        list(hog)
        assert wait_until(lambda: no_blocks_held(c))
        # Once the load is gone the same request is served.
        assert len(client.generate(build_request([22] * 60, max_tokens=4)).token_ids) == 4


def test_reservation_refused_after_the_prompt_went_out_aborts_the_prefill(demo_model_dir):
    """The prompt goes to prefill while its decode blocks are being reserved; when the
    reservation is refused after all (the router's view of free blocks was stale), the
    client gets RESOURCE_EXHAUSTED and the prefill worker drops the prompt and its KV."""
    with LocalCluster(engine_config(demo_model_dir)) as c, \
            Client(c.address, timeout_s=60) as client:
        orch = c.server.orchestrator
        assert wait_until(lambda: orch.admission.decode_room_likely(
            RoutingRequest("x", 60, 4)))  # a heartbeat saw room: the prompt goes first
        worker, prefill = c.decodes[0].worker, c.prefills[0]
        sent = []

        def refuse(msg):
            raise NoCapacityError("full after all")

        def add(msg, received=None):
            sent.append(msg.destination_follows)
            return type(prefill.worker).add(prefill.worker, msg, received)

        worker.reserve, prefill.worker.add = refuse, add
        try:
            with pytest.raises(grpc.RpcError) as err:
                client.generate(build_request([23] * 60, max_tokens=4))
        finally:
            del worker.reserve, prefill.worker.add
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert sent == [True]  # the prompt did go out before the reservation
        assert wait_until(lambda: no_blocks_held(c) and not prefill._waiters
                          and len(prefill.worker.destinations) == 0)
        assert len(client.generate(build_request([23] * 60, max_tokens=4)).token_ids) == 4


def test_colocated_mode_matches_engine_and_frees_blocks(demo_model_dir):
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 900) for _ in range(rng.randrange(1, 90))] for _ in range(8)]
    max_tokens = [rng.randrange(1, 16) for _ in prompts]
    engine = LLMEngine.from_config(engine_config(demo_model_dir))
    want = [c.token_ids for c in engine.generate(
        prompts, [SamplingParams(max_tokens=m) for m in max_tokens])]
    with LocalCluster(engine_config(demo_model_dir), colocated=2) as c:
        def one(i):
            with Client(c.address, timeout_s=60) as client:
                return tuple(client.generate(
                    build_request(prompts[i], max_tokens=max_tokens[i])).token_ids)

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(one, range(len(prompts))))
        assert got == list(want)
        with Client(c.address) as client:  # cancel mid-stream frees the colocated blocks too
            call = client.stream(build_request([11] * 30, max_tokens=2000))
            next(call)
            call.cancel()
        assert wait_until(lambda: all(s.num_used_blocks == 0 and s.num_running == 0
                                      for s in c.decode_stats()))
