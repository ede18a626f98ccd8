"""Metrics: the router's one endpoint carries request metrics and every worker's series."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pdserve.cluster.cli.client import Client, build_request
from pdserve.cluster.launch.local import LocalCluster
from pdserve.engine.config import EngineConfig
from pdserve.engine.metrics import WorkerMetrics
from pdserve.router.metrics_server import MetricsAggregator


def scrape(address: str) -> dict[str, list]:
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


def value(samples, **labels) -> float:
    return sum(s.value for s in samples if all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.fixture(scope="module")
def cluster(demo_model_dir):
    cfg = EngineConfig(model=str(demo_model_dir), device="cpu", num_kv_blocks=256, max_num_seqs=8)
    with LocalCluster(cfg, num_prefill=1, num_decode=2) as c:
        yield c


def test_one_endpoint_has_router_and_every_worker(cluster):
    with Client(cluster.address, timeout_s=30) as client:
        for n in (3, 5, 1):
            client.generate(build_request([7] * 20, max_tokens=n))
        with pytest.raises(grpc.RpcError):
            client.generate(build_request(""))
    asyncio.run_coroutine_threadsafe(cluster.server.aggregator.refresh(), cluster.loop).result(10)
    m = scrape(cluster.server.metrics_address)
    assert value(m["pdserve_time_to_first_token_seconds_count"]) == 3
    assert value(m["pdserve_requests_total"], code="OK") == 3
    assert value(m["pdserve_requests_total"], code="INVALID_ARGUMENT") == 1
    assert value(m["pdserve_slo_met_total"]) + value(m["pdserve_slo_missed_total"]) == 3
    assert value(m["pdserve_request_generation_tokens_sum"]) == 9
    assert value(m["pdserve_request_queue_time_seconds_count"], pool="prefill") == 3
    assert value(m["pdserve_request_queue_time_seconds_count"], pool="decode") == 2
    workers = {s.labels["worker"]: s.labels["pool"] for s in m["pdserve_worker_up"]}
    assert workers == {"prefill-0": "prefill", "decode-0": "decode", "decode-1": "decode"}
    assert all(s.value == 1 for s in m["pdserve_worker_up"])
    assert value(m["pdserve_step_duration_seconds_count"], pool="prefill") >= 3
    assert value(m["pdserve_kv_cache_capacity_blocks"], worker="decode-0") == 256
    assert value(m["pdserve_kv_transfer_bytes_total"], backend="inprocess") > 0
    assert value(m["pdserve_prefix_cache_queries_total"], pool="prefill") == 60
    # identical prompts: the prefill prefix cache hit on the 2nd and 3rd (whole blocks only)
    assert value(m["pdserve_prefix_cache_hits_total"], pool="prefill") == 32
    assert all("request" not in k for s in m["pdserve_worker_up"] for k in s.labels)


def test_unreachable_worker_is_reported_down_with_its_labels():
    wm = WorkerMetrics("m", "decode", "decode-7", "10.0.0.9")
    alive = {"ok": True}

    async def fetch() -> str:
        if not alive["ok"]:
            raise ConnectionError("actor died")
        return wm.text()

    agg = MetricsAggregator({"decode-7": fetch})
    reg = CollectorRegistry()
    reg.register(agg)
    asyncio.run(agg.refresh())
    fams = {f.name: f for f in text_string_to_metric_families(generate_latest(reg).decode())}
    assert fams["pdserve_worker_up"].samples[0].value == 1
    alive["ok"] = False
    asyncio.run(agg.refresh())
    fams = {f.name: f for f in text_string_to_metric_families(generate_latest(reg).decode())}
    (up,) = fams["pdserve_worker_up"].samples
    assert up.value == 0 and up.labels == {"model": "m", "pool": "decode", "worker": "decode-7",
                                           "node": "10.0.0.9"}
    assert "pdserve_kv_cache_usage_perc" not in fams  # stale series dropped
