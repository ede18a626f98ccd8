"""Recovery from worker failures on the in-process cluster (no Ray).

The router is told a worker is dead exactly as its heartbeat would tell it
(``health.mark_dead``) while requests stream: the worker itself keeps running, so this
is also the "hung worker" case, where late tokens from the abandoned worker must not
reach the client. Real process kills are in ``tests/integration/test_chaos_ray.py``.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from pdserve.cluster.cli.client import Client, build_request
from pdserve.cluster.launch.local import LocalCluster
from pdserve.router.config import RouterConfig
from pdserve.router.reliability import ReliabilityConfig
from pdserve.router.server import ServerConfig
from tests.cluster_helpers import engine_config, wait_until
from tests.cluster_helpers import local_idle as idle


@pytest.fixture(scope="module")
def cluster(demo_model_dir):
    router = RouterConfig(model=str(demo_model_dir),
                          server=ServerConfig(port=0, metrics_port=None),
                          reliability=ReliabilityConfig(heartbeat_interval_s=0.2))
    with LocalCluster(engine_config(demo_model_dir), num_prefill=2, num_decode=2,
                      router=router) as c:
        yield c




def run_streams(c: LocalCluster, requests, on_tokens=None):
    """Stream every request on its own thread; returns each one's token ids (or error)."""
    out: list = [None] * len(requests)

    def one(i):
        try:
            with Client(c.address, timeout_s=120) as client:
                toks: list[int] = []
                for msg in client.stream(requests[i]):
                    toks.extend(msg.token_ids)
                    if on_tokens is not None:
                        on_tokens(i, len(toks))
                out[i] = toks
        except grpc.RpcError as exc:
            out[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    return out


def reference(c: LocalCluster, requests):
    with Client(c.address, timeout_s=120) as client:
        return [list(client.generate(r).token_ids) for r in requests]


def test_decode_worker_death_resumes_streams_elsewhere_with_identical_output(cluster):
    reqs = [build_request([5 + i] * (8 + 3 * i), max_tokens=48) for i in range(6)]
    reqs.append(build_request([7] * 20, max_tokens=48, temperature=0.8, seed=1234))
    want = reference(cluster, reqs)
    orch = cluster.server.orchestrator
    retries0 = orch.retries
    fired = threading.Event()

    def kill_once(i, n):
        if n >= 12 and not fired.is_set():
            fired.set()
            # as the heartbeat does for a worker that stops answering
            cluster.loop.call_soon_threadsafe(orch.health.mark_dead, "decode-0", "test")

    got = run_streams(cluster, reqs, kill_once)
    assert fired.is_set()
    assert got == want  # no token lost, repeated or changed; seeded sampling included
    assert orch.retries > retries0  # some streams really were on decode-0 and resumed
    assert orch.failed_after_retries == 0
    # decode-0 still answers its heartbeat, so it rejoins; nothing stays reserved anywhere
    assert wait_until(lambda: orch.health.is_alive("decode-0"))
    assert wait_until(lambda: idle(cluster)), cluster.decode_stats()


def test_prefill_worker_death_mid_prefill_is_prefilled_again_elsewhere(cluster):
    orch = cluster.server.orchestrator
    worker = cluster.prefills[0].worker
    real = worker.step
    stalled = threading.Event()

    def stall(*a, **kw):  # prefill-0 hangs on its next step until declared dead
        stalled.set()
        time.sleep(1.0)
        return real(*a, **kw)

    reqs = [build_request([11 + i] * 40, max_tokens=6) for i in range(4)]
    want = reference(cluster, reqs)
    retries0 = orch.retries
    worker.step = stall
    try:
        killer = threading.Thread(target=lambda: (
            stalled.wait(30),
            cluster.loop.call_soon_threadsafe(orch.health.mark_dead, "prefill-0", "test")))
        killer.start()
        got = run_streams(cluster, reqs)
        killer.join(30)
    finally:
        worker.step = real
    assert got == want
    assert orch.retries > retries0
    assert wait_until(lambda: orch.health.is_alive("prefill-0"))
    assert wait_until(lambda: idle(cluster)), (cluster.decode_stats(), cluster.prefill_stats())


def test_retry_budget_spent_gives_unavailable_and_frees_everything(cluster):
    orch = cluster.server.orchestrator
    # Both decode workers hang (their loops are held), so no heartbeat can revive them
    # while the request is served, however slow this host is.
    hung = threading.Event()
    for h in cluster.decodes:
        h._loop.post(lambda: hung.wait(30))
    try:
        time.sleep(0.5)  # heartbeat answers already on their way have arrived
        for wid in ("decode-0", "decode-1"):
            cluster.loop.call_soon_threadsafe(orch.health.mark_dead, wid, "test")
        with Client(cluster.address, timeout_s=30) as client, \
                pytest.raises(grpc.RpcError) as err:
            client.generate(build_request([3] * 10, max_tokens=8))
    finally:
        hung.set()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "decode" in err.value.details()
    # the heartbeats bring both back and service resumes
    assert wait_until(lambda: all(orch.health.is_alive(w) for w in ("decode-0", "decode-1")))
    with Client(cluster.address, timeout_s=30) as client:
        assert len(client.generate(build_request([3] * 10, max_tokens=8)).token_ids) == 8
    assert wait_until(lambda: idle(cluster))


def test_deadline_is_honoured_and_the_work_stops_early(cluster):
    steps0 = sum(s.steps for s in cluster.decode_stats())
    max_tokens = 4000
    with Client(cluster.address, timeout_s=0.5) as client, pytest.raises(grpc.RpcError) as err:
        client.generate(build_request([4] * 16, max_tokens=max_tokens))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: idle(cluster)), cluster.decode_stats()
    # the decode worker dropped the request instead of generating all its tokens
    assert sum(s.steps for s in cluster.decode_stats()) - steps0 < max_tokens // 2


def test_reliability_config_is_validated():
    with pytest.raises(ValueError, match="max_retries"):
        ReliabilityConfig(max_retries=-1)
    with pytest.raises(ValueError, match="heartbeat"):
        ReliabilityConfig(heartbeat_timeout_s=0)
    with pytest.raises(ValueError, match="max_in_flight"):
        ReliabilityConfig(max_in_flight=0)
