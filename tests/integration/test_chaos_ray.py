"""Chaos: kill -9 a decode worker, then a prefill worker, under steady load on Ray.

A 2-prefill, 2-decode cluster (shared-memory KV) serves a steady stream of greedy
requests. Mid-run the test SIGKILLs one decode worker's process, then one prefill
worker's. Every request must still complete with exactly the tokens of a failure-free
run (the single-process engine's): requests caught on the dead decode worker resume on
the other by re-prefilling prompt + tokens sent; those caught in prefill are prefilled
again. Ray restarts both workers (``PoolSpec.max_restarts``), the router's heartbeat
returns them to their pools, every prefill x decode pair then serves the engine's exact
tokens (the restarted decode worker's KV written by survivors and by the restarted
prefill worker alike), and nothing is left holding KV blocks.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from pdserve.cluster.cli.client import Client, build_request
from pdserve.cluster.launch.launcher import launch
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling_params import SamplingParams
from tests.cluster_helpers import chaos_spec, engine_config, generate_through, wait_until
from tests.cluster_helpers import ray_held as held

ray = pytest.importorskip("ray")

N_REQUESTS = 60
CONCURRENCY = 6




def workload():
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 900) for _ in range(rng.randrange(20, 300))]
               for _ in range(N_REQUESTS)]
    return prompts, [rng.randrange(24, 64) for _ in prompts]




def test_kill_decode_then_prefill_worker_loses_no_request(ray_cluster, demo_model_dir):
    prompts, max_tokens = workload()
    engine = LLMEngine.from_config(engine_config(demo_model_dir))
    want = [tuple(c.token_ids) for c in engine.generate(
        prompts, [SamplingParams(max_tokens=m) for m in max_tokens])]
    del engine

    spec = chaos_spec(demo_model_dir, 2, 2, "shm")
    cluster = launch(spec)
    try:
        victims = {"decode": cluster.decodes[0], "prefill": cluster.prefills[0]}
        pids = {k: ray.get(h.pid.remote()) for k, (_, h) in victims.items()}
        done = [0]
        lock = threading.Lock()

        def one(i):
            # steady arrivals: request i starts no earlier than i * 0.15 s into the run
            time.sleep(max(0.0, t0 + i * 0.15 - time.monotonic()))
            with Client(cluster.address, timeout_s=180) as c:
                toks = []
                for msg in c.stream(build_request(prompts[i], max_tokens=max_tokens[i])):
                    toks.extend(msg.token_ids)
            with lock:
                done[0] += 1
            return tuple(toks)

        def chaos():
            # kill when a third, then two thirds of the requests have been issued
            time.sleep(N_REQUESTS * 0.15 / 3)
            os.kill(pids["decode"], signal.SIGKILL)
            time.sleep(N_REQUESTS * 0.15 / 3)
            os.kill(pids["prefill"], signal.SIGKILL)

        t0 = time.monotonic()
        killer = threading.Thread(target=chaos)
        killer.start()
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            results = list(pool.map(lambda i: _guard(one, i), range(N_REQUESTS)))
        killer.join()

        errors = [r for r in results if isinstance(r, Exception)]
        report = ray.get(cluster.router.reliability.remote())
        print(f"\nchaos: {N_REQUESTS} requests, {len(errors)} failed, "
              f"{report['retries']} retries, deaths "
              f"{ {w: v['deaths'] for w, v in report['workers'].items()} }")
        assert not errors, errors[:3]
        assert results == want  # identical to the failure-free run, token for token
        assert report["failed_after_retries"] == 0
        assert report["workers"][victims["decode"][0]]["deaths"] >= 1
        assert report["workers"][victims["prefill"][0]]["deaths"] >= 1
        assert report["retries"] >= 1  # the decode kill caught streams mid-way

        # Ray restarts both (new processes) and the router takes them back.
        def rejoined():
            r = ray.get(cluster.router.reliability.remote())
            return all(w["alive"] for w in r["workers"].values())

        assert wait_until(rejoined, 90, 0.2), ray.get(cluster.router.reliability.remote())
        for kind, (_, h) in victims.items():
            assert ray.get(h.pid.remote()) != pids[kind]
        # ...and serve again: through the router, and through every prefill x decode pair
        # (driven explicitly: a restarted decode worker must get correct KV from every
        # prefill worker, restarted or not, whatever the router would have picked)
        with ThreadPoolExecutor(4) as pool:
            again = list(pool.map(lambda i: _guard(one_now, cluster, prompts[i], max_tokens[i]),
                                  range(4)))
        assert again == want[:4]
        pairs = list(itertools.product(cluster.prefills, cluster.decodes))
        by_pair = {(p[0], d[0]): generate_through(p, d, prompts[4 + k], max_tokens[4 + k])
                   == want[4 + k] for k, (p, d) in enumerate(pairs)}
        assert len(by_pair) == 4 and all(by_pair.values()), by_pair
        assert wait_until(lambda: held(cluster) == 0, 30, 0.2), cluster.stats()
    finally:
        cluster.shutdown()


def one_now(cluster, prompt, max_tokens):
    with Client(cluster.address, timeout_s=120) as c:
        return tuple(c.generate(build_request(prompt, max_tokens=max_tokens)).token_ids)


def _guard(fn, *args):
    try:
        return fn(*args)
    except Exception as exc:  # collected and asserted on, with the rest of the results
        return exc
