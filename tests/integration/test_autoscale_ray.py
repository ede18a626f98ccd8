"""The SLO autoscaler on real Ray actors: a burst grows both pools to their bounds, the
new workers serve, and once the load is gone the pools shrink back; workers leave only
after draining, so every request returns the single-process engine's tokens and nothing
is held at the end. Decisions are counted in
the router's metrics.

Capacities come from a ``FixedCapacity`` (0.5 req/s per instance, a test double beside the
profile-based ``ProfileCapacity``) so that the decisions do not depend on this host's
speed, and the test calls ``step`` itself instead of the actor's timed loop."""

from __future__ import annotations

import random
import threading
import time
import urllib.request

import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families

from pdserve.cluster.autoscale import AutoscaleConfig, FixedCapacity, PoolBounds
from pdserve.cluster.autoscale.actor import AutoscalerActor
from pdserve.cluster.cli.client import Client, build_request
from pdserve.cluster.launch.launcher import ClusterSpec, PoolSpec, launch
from pdserve.engine.latency_profile import distserve_opt13b_a100
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kv_transfer.backend_config import KVTransferConfig
from pdserve.router.config import RouterConfig
from pdserve.router.server import ServerConfig
from pdserve.router.slo import SloConfig
from tests.cluster_helpers import engine_config, wait_until
from tests.cluster_helpers import ray_held as blocks_held

pytestmark = pytest.mark.integration

# Targets no request misses on a slow host: the decisions follow the rate alone.
SLO = SloConfig(ttft_s=60.0, tpot_s=10.0)


def _scaling(metrics_address: str) -> dict[tuple[str, str, str], float]:
    text = urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10).read().decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    return {(s.labels["pool"], s.labels["direction"], s.labels["reason"]): s.value
            for s in fams["pdserve_autoscaler_decisions"].samples
            if s.name.endswith("_total") and s.value > 0}  # (every series exists, at 0)


def _send(address, prompts, max_tokens, got):
    def one(i):
        with Client(address, timeout_s=180) as c:
            got[i] = tuple(c.generate(build_request(prompts[i], max_tokens=max_tokens)).token_ids)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    return threads


def test_pools_follow_a_burst_and_shrink_after_draining(ray_cluster, demo_model_dir):
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 900) for _ in range(rng.randrange(8, 80))] for _ in range(12)]
    engine = LLMEngine.from_config(engine_config(demo_model_dir))
    want = [c.token_ids for c in engine.generate(prompts[:6], SamplingParams(max_tokens=30))]
    want += [c.token_ids for c in engine.generate(prompts[6:], SamplingParams(max_tokens=300))]
    cluster = launch(ClusterSpec(
        engine=engine_config(demo_model_dir), prefill=PoolSpec(1), decode=PoolSpec(1),
        kv=KVTransferConfig(backend="shm"), torch_threads=1,
        router=RouterConfig(model=str(demo_model_dir), slo=SLO,
                            server=ServerConfig(port=0, metrics_port=0))))
    config = AutoscaleConfig(PoolBounds(1, 2, "prefill"), PoolBounds(1, 2, "decode"),
                             distserve_opt13b_a100(), SLO, interval_s=1.0,
                             upscale_cooldown_s=0.0, downscale_window_s=2.0, headroom=1.0)
    scaler = AutoscalerActor.remote(config, cluster.spec, cluster.router, cluster.prefills,
                                    cluster.decodes, 1, window_s=3.0,
                                    capacity=FixedCapacity(0.5, 0.5))
    cluster.autoscaler = scaler  # shutdown stops it and every worker it added
    try:
        ray.get(scaler.history.remote())  # started (its process up) before the load comes
        got: list = [None] * len(prompts)
        burst = _send(cluster.address, prompts[:6], 30, got)
        assert wait_until(lambda: ray.get(cluster.router.in_flight.remote()) >= 3, timeout=30)
        row = ray.get(scaler.step.remote())
        assert row["decision"] is not None and row["decision"]["reason"] == "rate_up", repr(
            {k: row[k] for k in ("arrival_rate", "finished", "ttft_attainment", "in_service")})
        assert (row["decision"]["prefill"], row["decision"]["decode"]) == (2, 2)
        ray.get(scaler.settle.remote(120))
        assert ray.get(cluster.router.pool_sizes.remote()) == {
            "prefill": {"active": 2, "draining": 0}, "decode": {"active": 2, "draining": 0}}
        for t in burst:
            t.join(180)

        # Long requests spread over both pools; then no new arrivals: after the down
        # window the pools shrink, the leaving workers draining whatever they still hold
        # (draining while streaming is pinned down in tests/unit/test_router_membership.py;
        # here it depends on this host's speed).
        tail = [None] * 6
        late = _send(cluster.address, prompts[6:], 300, tail)
        time.sleep(3.1)  # the load window (3 s) holds no arrival any more
        assert ray.get(scaler.step.remote())["decision"] is None  # the down window starts
        time.sleep(2.1)
        row = ray.get(scaler.step.remote())
        assert row["decision"] is not None and row["decision"]["reason"] == "rate_down", row
        assert (row["decision"]["prefill"], row["decision"]["decode"]) == (1, 1)
        ray.get(scaler.settle.remote(180))
        for t in late:
            t.join(180)
        assert got[:6] + tail == list(want)
        assert ray.get(cluster.router.pool_sizes.remote()) == {
            "prefill": {"active": 1, "draining": 0}, "decode": {"active": 1, "draining": 0}}
        events = ray.get(scaler.history.remote())["events"]
        assert [e["event"] for e in events if e["worker"] == "decode-1"] == [
            "starting", "joined", "draining", "left"]
        pools = ray.get(scaler.stop.remote())
        cluster.prefills, cluster.decodes = pools["prefill"], pools["decode"]
        assert [w for w, _ in cluster.decodes] == ["decode-0"]
        assert wait_until(lambda: blocks_held(cluster) == 0, timeout=30), cluster.stats()
        assert _scaling(cluster.metrics_address) == {
            ("prefill", "up", "rate_up"): 1, ("decode", "up", "rate_up"): 1,
            ("prefill", "down", "rate_down"): 1, ("decode", "down", "rate_down"): 1}
    finally:
        cluster.shutdown()
