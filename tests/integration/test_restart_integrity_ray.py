"""A restarted decode worker gets correct KV from every prefill worker that survived it.

The bug this pins down: a decode worker's shared-memory segment keeps its name across a
Ray restart, and prefill workers that had attached the killed worker's segment went on
writing into it (deleted, still mapped) while the restarted worker decoded from its fresh,
zeroed one: the first token right, the rest wrong, status OK. The test makes every prefill
worker meet the decode worker's cache first, kills the decode worker (SIGKILL: it cleans
nothing up), waits for Ray to restart it, then sends requests through every surviving
prefill worker to it (each pair driven explicitly, so routing cannot skip one) and through
the router. Every output must equal the single-process engine's, for shm and for TCP.
"""

from __future__ import annotations

import os
import random
import signal

import pytest

from pdserve.cluster.cli.client import Client, build_request
from pdserve.cluster.launch.launcher import launch
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling_params import SamplingParams
from tests.cluster_helpers import chaos_spec, engine_config, generate_through, wait_until
from tests.cluster_helpers import ray_held as held

ray = pytest.importorskip("ray")

MAX_TOKENS = 12


@pytest.mark.parametrize("backend", ["shm", "tcp"])
def test_restarted_decode_worker_gets_correct_kv_from_every_surviving_prefill_worker(
        ray_cluster, demo_model_dir, backend):
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 900) for _ in range(rng.randrange(20, 120))] for _ in range(8)]
    engine = LLMEngine.from_config(engine_config(demo_model_dir))
    want = [o.token_ids for o in engine.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS))]
    del engine
    spec = chaos_spec(demo_model_dir, 2, 1, backend)
    cluster = launch(spec)
    try:
        decode = cluster.decodes[0]
        # Every prefill worker writes into the decode worker's cache (attaches, connects).
        for i, prefill in enumerate(cluster.prefills):
            assert generate_through(prefill, decode, prompts[i], MAX_TOKENS) == want[i]
        pid = ray.get(decode[1].pid.remote())
        os.kill(pid, signal.SIGKILL)
        # Ray restarts it in place: same actor, same name, a new process and cache.
        assert wait_until(lambda: _pid(decode[1]) not in (None, pid), 60, 0.2)
        ok = []
        for i, prefill in enumerate(cluster.prefills):
            for k in (2 + 2 * i, 3 + 2 * i):
                got = generate_through(prefill, decode, prompts[k], MAX_TOKENS)
                ok.append((prefill[0], k, got == want[k]))
        assert all(good for *_, good in ok), ok
        # ...and through the router, once its heartbeat has the worker back.
        def rejoined():
            r = ray.get(cluster.router.reliability.remote())
            return all(w["alive"] for w in r["workers"].values())

        assert wait_until(rejoined, 60, 0.2)
        with Client(cluster.address, timeout_s=60) as client:
            for k in (6, 7):
                got = client.generate(build_request(prompts[k], max_tokens=MAX_TOKENS))
                assert tuple(got.token_ids) == want[k]
        assert wait_until(lambda: held(cluster) == 0, 30, 0.2), cluster.stats()
    finally:
        cluster.shutdown()


def _pid(handle) -> int | None:
    try:
        return ray.get(handle.pid.remote(), timeout=5)
    except Exception:  # still restarting
        return None
