"""Conditional disaggregation on real Ray actors, through the gRPC endpoint: with the
short-prompt threshold on, short prompts are prefilled on the decode worker and long ones
on the prefill pool, both return the single-process engine's greedy tokens, the router's
Prometheus endpoint counts each decision, and no block is held afterwards."""

from __future__ import annotations

import random
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdserve.cluster.cli.client import Client, build_request
from pdserve.cluster.launch.launcher import ClusterSpec, PoolSpec, launch
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kv_transfer.backend_config import KVTransferConfig
from pdserve.router.config import RouterConfig
from pdserve.router.local_prefill import LocalPrefillConfig
from pdserve.router.server import ServerConfig
from tests.cluster_helpers import engine_config, wait_until
from tests.cluster_helpers import ray_held as blocks_held

pytestmark = pytest.mark.integration

THRESHOLD = 24


def _decisions(metrics_address: str) -> dict[tuple[str, str], float]:
    text = urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10).read().decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    return {
        (s.labels["decision"], s.labels["reason"]): s.value
        for s in fams["pdserve_router_prefill_decisions"].samples
        if s.name.endswith("_total")
    }


def test_local_and_remote_prefills_match_the_engine_and_are_counted(ray_cluster, demo_model_dir):
    rng = random.Random(7)
    lengths = [3, 10, 24, 25, 60, 100, 17, 40]
    prompts = [[rng.randrange(3, 900) for _ in range(n)] for n in lengths]
    max_tokens = [rng.randrange(2, 16) for _ in prompts]
    engine = LLMEngine.from_config(engine_config(demo_model_dir))
    want = [
        c.token_ids
        for c in engine.generate(prompts, [SamplingParams(max_tokens=m) for m in max_tokens])
    ]
    spec = ClusterSpec(
        engine=engine_config(demo_model_dir),
        prefill=PoolSpec(1, num_cpus=1),
        decode=PoolSpec(1, num_cpus=1),
        kv=KVTransferConfig(backend="shm"),
        router=RouterConfig(
            model=str(demo_model_dir),
            server=ServerConfig(port=0, metrics_port=0),
            local_prefill=LocalPrefillConfig(max_local_tokens=THRESHOLD),
        ),
        torch_threads=1,
    )
    cluster = launch(spec)
    try:

        def one(i):
            with Client(cluster.address, timeout_s=120) as c:
                return tuple(
                    c.generate(build_request(prompts[i], max_tokens=max_tokens[i])).token_ids
                )

        with ThreadPoolExecutor(len(prompts)) as pool:
            got = list(pool.map(one, range(len(prompts))))
        assert got == list(want)
        short = sum(n <= THRESHOLD for n in lengths)
        counted = {k: v for k, v in _decisions(cluster.metrics_address).items() if v}
        assert counted == {("local", "short"): short, ("remote", "remote"): len(lengths) - short}
        assert wait_until(lambda: blocks_held(cluster) == 0), cluster.stats()
    finally:
        cluster.shutdown()
