"""Tensor-parallel workers on Ray, through the gRPC endpoint (issue 13's acceptance).

Each prefill or decode worker of tp > 1 is one Ray actor per rank (rank 0 the pool's
worker, ranks 1.. ``TPRankActor``s on its node, gloo on CPU). On the TP demo Llama (8
query, 4 KV heads), 16 concurrent greedy requests of mixed lengths must return the
single-process tp 1 engine's tokens exactly, for prefill/decode degrees (1, 2), (2, 1),
(2, 2) and (4, 2), with the shared-memory and the TCP KV backends: every decode rank gets
exactly its KV heads from the prefill ranks that hold them. Nothing is left holding blocks.

Then ``kill -9`` of one rank of a decode instance under load: its rank 0 notices at its
next collective and exits, Ray restarts the instance as a group (new ranks), the router
resumes the requests caught there on the other decode instance, and every request still
returns the tp 1 tokens.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from pdserve.cluster.cli.client import Client, build_request
from pdserve.cluster.launch.launcher import ClusterSpec, PoolSpec, launch
from pdserve.engine.demo_tp_model import create_tp_demo_model
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kv_transfer.backend_config import KVTransferConfig
from pdserve.router.config import RouterConfig
from pdserve.router.reliability import ReliabilityConfig
from pdserve.router.server import ServerConfig
from tests.cluster_helpers import engine_config, wait_until
from tests.cluster_helpers import ray_held as held

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.integration

# A rank asks a quarter CPU: a tp 4 worker and its ranks fit the test nodes (4 CPUs each)
# beside the others. Ray CPUs are a scheduling count; the host has 2 cores anyway.
RANK_CPUS = 0.25


@pytest.fixture(scope="module")
def tp_model(tmp_path_factory) -> str:
    return str(create_tp_demo_model("llama", tmp_path_factory.mktemp("tp-ray") / "llama"))


def workload(n: int, seed: int, lengths=(1, 5, 17, 40, 90)):
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 200) for _ in range(rng.choice(lengths))] for _ in range(n)]
    return prompts, [rng.randrange(2, 16) for _ in prompts]


def reference(model: str, prompts, max_tokens):
    engine = LLMEngine.from_config(engine_config(model))
    outs = engine.generate(prompts, [SamplingParams(max_tokens=m) for m in max_tokens])
    return [tuple(c.token_ids) for c in outs]


@pytest.fixture(scope="module")
def sixteen(tp_model):
    prompts, max_tokens = workload(16, 13)
    return prompts, max_tokens, reference(tp_model, prompts, max_tokens)


def spec(model: str, p: int, d: int, backend: str, num_decode: int = 1,
         heartbeat_s: float = 1.0) -> ClusterSpec:
    return ClusterSpec(
        engine=engine_config(model, num_kv_blocks=256),
        prefill=PoolSpec(1, num_cpus=RANK_CPUS, tp=p),
        decode=PoolSpec(num_decode, num_cpus=RANK_CPUS, tp=d),
        kv=KVTransferConfig(backend=backend),
        router=RouterConfig(model=model, server=ServerConfig(port=0, metrics_port=0),
                            reliability=ReliabilityConfig(heartbeat_interval_s=heartbeat_s)),
        torch_threads=1)


def generate(address: str, prompt, max_tokens: int) -> tuple[int, ...]:
    with Client(address, timeout_s=180) as c:
        return tuple(c.generate(build_request(prompt, max_tokens=max_tokens)).token_ids)


@pytest.mark.parametrize("backend", ["shm", "tcp"])
@pytest.mark.parametrize("p, d", [(1, 2), (2, 1), (2, 2), (4, 2)])
def test_tp_pools_return_the_tp1_tokens(ray_cluster, tp_model, sixteen, p, d, backend):
    prompts, max_tokens, want = sixteen
    cluster = launch(spec(tp_model, p, d, backend))
    try:
        # one actor per rank: ranks 1.. are separate processes
        for _, h in (*cluster.prefills, *cluster.decodes):
            pids = ray.get(h.rank_pids.remote())
            assert len(set(pids)) == len(pids)
        assert len(ray.get(cluster.prefills[0][1].rank_pids.remote())) == p - 1
        assert len(ray.get(cluster.decodes[0][1].rank_pids.remote())) == d - 1
        with ThreadPoolExecutor(len(prompts)) as pool:
            got = list(pool.map(lambda i: generate(cluster.address, prompts[i], max_tokens[i]),
                                range(len(prompts))))
        assert got == want
        assert wait_until(lambda: held(cluster) == 0, 20, 0.1), cluster.stats()
    finally:
        cluster.shutdown()


def test_kill_one_decode_rank_under_load(ray_cluster, tp_model):
    prompts, max_tokens = workload(24, 29, lengths=(20, 60, 120))
    max_tokens = [m + 24 for m in max_tokens]  # long enough to be caught mid-decode
    want = reference(tp_model, prompts, max_tokens)
    cluster = launch(spec(tp_model, 1, 2, "shm", num_decode=2, heartbeat_s=0.2))
    try:
        victim_id, victim = cluster.decodes[0]
        rank0_pid = ray.get(victim.pid.remote())
        (rank1_pid,) = ray.get(victim.rank_pids.remote())
        t0 = time.monotonic()

        def one(i):
            time.sleep(max(0.0, t0 + i * 0.1 - time.monotonic()))
            return generate(cluster.address, prompts[i], max_tokens[i])

        def chaos():
            time.sleep(len(prompts) * 0.1 / 3)
            os.kill(rank1_pid, signal.SIGKILL)

        killer = threading.Thread(target=chaos)
        killer.start()
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(one, range(len(prompts))))
        killer.join()
        report = ray.get(cluster.router.reliability.remote())
        assert got == want  # no request lost, every one the tp 1 tokens
        assert report["failed_after_retries"] == 0
        assert report["workers"][victim_id]["deaths"] >= 1

        # the instance restarted as a group: a new rank 0 process with a new rank 1
        def back():
            r = ray.get(cluster.router.reliability.remote())
            return all(w["alive"] for w in r["workers"].values())

        assert wait_until(back, 90, 0.2), ray.get(cluster.router.reliability.remote())
        assert ray.get(victim.pid.remote()) != rank0_pid
        (new_rank1,) = ray.get(victim.rank_pids.remote())
        assert new_rank1 != rank1_pid
        assert wait_until(lambda: held(cluster) == 0, 30, 0.2), cluster.stats()
    finally:
        cluster.shutdown()
