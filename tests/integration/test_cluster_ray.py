"""The disaggregated cluster on real Ray actors, reached through its gRPC endpoint.

- 32 concurrent greedy requests of mixed prompt lengths through a 2-prefill, 2-decode
  cluster return exactly the single-process engine's tokens, with each CPU transfer
  backend (shared memory, TCP).
- Multi-node: prefill pool pinned to one Ray node, decode pool to another, KV over TCP.
- A client that cancels mid-stream leaves zero reserved blocks on both pools.
"""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from pdserve.cluster.cli.client import Client, build_request
from pdserve.cluster.launch.launcher import ClusterSpec, PoolSpec, launch
from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kv_transfer.backend_config import KVTransferConfig
from pdserve.router.config import RouterConfig
from pdserve.router.server import ServerConfig
from tests.cluster_helpers import engine_config as small_engine
from tests.cluster_helpers import ray_held as blocks_held

pytestmark = pytest.mark.integration


def engine_config(model) -> EngineConfig:
    return small_engine(model, max_num_batched_tokens=2048)


def workload(n=32, seed=0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 900) for _ in range(rng.choice((1, 5, 17, 40, 90, 200)))]
               for _ in range(n)]
    max_tokens = [rng.randrange(1, 20) for _ in prompts]
    return prompts, max_tokens


@pytest.fixture(scope="module")
def reference(demo_model_dir):
    prompts, max_tokens = workload()
    engine = LLMEngine.from_config(engine_config(demo_model_dir))
    outs = engine.generate(prompts, [SamplingParams(max_tokens=m) for m in max_tokens])
    return prompts, max_tokens, [c.token_ids for c in outs]


def run_concurrently(address, prompts, max_tokens):
    def one(i):
        with Client(address, timeout_s=120) as c:
            return tuple(c.generate(build_request(prompts[i], max_tokens=max_tokens[i])).token_ids)

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, range(len(prompts))))




TWO = PoolSpec(2, num_cpus=1)


def start(model, backend, prefill=TWO, decode=TWO):
    spec = ClusterSpec(engine=engine_config(model), prefill=prefill, decode=decode,
                       kv=KVTransferConfig(backend=backend),
                       router=RouterConfig(model=str(model), server=ServerConfig(port=0, metrics_port=0)),
                       torch_threads=1)
    return launch(spec)


def check_prefill_paths(cluster) -> None:
    """Prompts to a prefill worker on the router's node went over the direct channel (one
    socket, opened when the router started; a request or two may precede it), those to
    a worker on another node as Ray calls."""
    import ray

    router_node = ray.get(cluster.router.node_id.remote())
    paths = ray.get(cluster.router.reliability.remote())["prefill_paths"]
    for w, handle in cluster.prefills:
        p = paths[w]
        if ray.get(handle.node_id.remote()) == router_node:
            assert p["channels_opened"] == 1 and "ray_only" not in p, paths
            assert p["sent"]["ray"] <= 2 and p["sent"]["direct"] > 0, paths
        else:
            assert "another node" in p["ray_only"] and p["sent"]["direct"] == 0, paths
    assert any(p["sent"]["direct"] for p in paths.values()) or all(
        "ray_only" in p for p in paths.values()), paths


@pytest.mark.parametrize("backend", ["shm", "tcp"])
def test_32_concurrent_requests_match_engine(ray_cluster, demo_model_dir, reference, backend):
    prompts, max_tokens, want = reference
    cluster = start(demo_model_dir, backend)
    try:
        got = run_concurrently(cluster.address, prompts, max_tokens)
        assert got == list(want)
        check_prefill_paths(cluster)
        deadline = time.monotonic() + 10
        while blocks_held(cluster) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert blocks_held(cluster) == 0
    finally:
        cluster.shutdown()


def test_multi_node_prefill_and_decode_on_different_nodes_over_tcp(
        ray_cluster, demo_model_dir, reference):
    import ray

    prompts, max_tokens, want = reference
    cluster = start(demo_model_dir, "tcp",
                    prefill=PoolSpec(2, num_cpus=1, resources=(("node_a", 1),)),
                    decode=PoolSpec(2, num_cpus=1, resources=(("node_b", 1),)))
    try:
        nodes = {n["NodeID"]: n["Resources"] for n in ray.nodes()}
        where = {w: ray.get(h.node_id.remote()) for w, h in (*cluster.prefills, *cluster.decodes)}
        assert all("node_a" in nodes[where[w]] for w, _ in cluster.prefills)
        assert all("node_b" in nodes[where[w]] for w, _ in cluster.decodes)
        got = run_concurrently(cluster.address, prompts[:16], max_tokens[:16])
        assert got == list(want[:16])
        check_prefill_paths(cluster)
    finally:
        cluster.shutdown()


def test_cancel_mid_stream_leaves_no_blocks(ray_cluster, demo_model_dir):
    cluster = start(demo_model_dir, "shm", prefill=PoolSpec(1, num_cpus=1),
                    decode=PoolSpec(1, num_cpus=1))
    try:
        with Client(cluster.address) as c:
            call = c.stream(build_request([11] * 50, max_tokens=3000))
            for i, _ in enumerate(call):
                if i >= 3:
                    call.cancel()
                    break
        deadline = time.monotonic() + 15
        while blocks_held(cluster) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert blocks_held(cluster) == 0, cluster.stats()
    finally:
        cluster.shutdown()


def test_dead_worker_pool_answers_unavailable(ray_cluster, demo_model_dir):
    import grpc
    import ray

    cluster = start(demo_model_dir, "shm", prefill=PoolSpec(1, num_cpus=1),
                    decode=PoolSpec(1, num_cpus=1))
    try:
        with Client(cluster.address, timeout_s=60) as c:
            assert len(c.generate(build_request([5] * 8, max_tokens=3)).token_ids) == 3
            ray.kill(cluster.decodes[0][1], no_restart=True)
            with pytest.raises(grpc.RpcError) as err:
                c.generate(build_request([5] * 8, max_tokens=3))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "decode" in err.value.details()
    finally:
        cluster.shutdown()
    # the killed worker never unlinked its shared-memory KV cache; shutdown did
    import os

    assert cluster.shm_segments
    assert not any(os.path.exists(f"/dev/shm/{n}") for n in cluster.shm_segments)


def test_colocated_cluster_on_ray_matches_engine(ray_cluster, demo_model_dir, reference):
    prompts, max_tokens, want = reference
    spec = ClusterSpec(engine=engine_config(demo_model_dir), colocated=PoolSpec(2, num_cpus=1),
                       router=RouterConfig(model=str(demo_model_dir), server=ServerConfig(port=0, metrics_port=0)),
                       torch_threads=1)
    cluster = launch(spec)
    try:
        assert not cluster.prefills and len(cluster.decodes) == 2
        got = run_concurrently(cluster.address, prompts[:12], max_tokens[:12])
        assert got == list(want[:12])
    finally:
        cluster.shutdown()
