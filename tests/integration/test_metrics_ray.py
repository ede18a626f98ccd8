"""One scrape target covers a multi-node Ray cluster: 2 prefill + 2 decode workers on two
simulated nodes, every worker's series served by the router's aggregated endpoint."""

from __future__ import annotations

import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdserve.cluster.cli.client import Client, build_request
from pdserve.cluster.launch.launcher import ClusterSpec, PoolSpec, launch
from pdserve.engine.config import EngineConfig
from pdserve.kv_transfer.backend_config import KVTransferConfig
from pdserve.router.config import RouterConfig
from pdserve.router.server import ServerConfig

pytestmark = pytest.mark.integration


def test_metrics_endpoint_exposes_every_worker_across_nodes(ray_cluster, demo_model_dir):
    spec = ClusterSpec(
        engine=EngineConfig(model=str(demo_model_dir), device="cpu", num_kv_blocks=256),
        prefill=PoolSpec(2, num_cpus=1, resources=(("node_a", 1),)),
        decode=PoolSpec(2, num_cpus=1, resources=(("node_b", 1),)),
        kv=KVTransferConfig(backend="tcp"),
        router=RouterConfig(model=str(demo_model_dir),
                            server=ServerConfig(port=0, metrics_port=0, metrics_refresh_s=0.2)),
        torch_threads=1)
    cluster = launch(spec)
    try:
        with Client(cluster.address, timeout_s=60) as c:
            for i in range(8):
                c.generate(build_request([5 + i] * 30, max_tokens=4))
        time.sleep(1.0)  # at least one metrics refresh after the last request
        text = urllib.request.urlopen(f"http://{cluster.metrics_address}/metrics",
                                      timeout=10).read().decode()
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        up = {s.labels["worker"]: (s.labels["pool"], s.value) for s in fams["pdserve_worker_up"].samples}
        assert up == {"prefill-0": ("prefill", 1.0), "prefill-1": ("prefill", 1.0),
                      "decode-0": ("decode", 1.0), "decode-1": ("decode", 1.0)}
        steps = {s.labels["worker"] for s in fams["pdserve_step_duration_seconds"].samples
                 if s.name.endswith("_count") and s.value > 0}
        assert steps == set(up)  # every worker ran, and its histogram reached the endpoint
        sent = sum(s.value for s in fams["pdserve_kv_transfer_bytes"].samples
                   if s.labels.get("backend") == "tcp")
        assert sent > 0
        ttft = [s for s in fams["pdserve_time_to_first_token_seconds"].samples
                if s.name.endswith("_count")]
        assert sum(s.value for s in ttft) == 8
    finally:
        cluster.shutdown()
