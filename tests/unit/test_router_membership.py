"""Pools that change while the router serves (router/membership.py), in one process.

A worker added to a running router takes requests; a drained one leaves only once it holds
nothing, while the requests it held finish with the output one uninterrupted run gives; a
drain that runs out of time leaves the worker in service; the last worker of a pool cannot
leave; the pool gauges follow.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
from prometheus_client import generate_latest

from pdserve.cluster.cli.client import Client, build_request
from pdserve.cluster.launch.local import LocalCluster
from pdserve.decode_worker.build import build_decode_host
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.prefill_worker.build import build_prefill_host
from pdserve.router.drain import DrainTimeout, work_held
from tests.cluster_helpers import engine_config, local_idle, wait_until


@pytest.fixture(scope="module")
def engine(demo_model_dir):
    return LLMEngine.from_config(engine_config(demo_model_dir))


def _generate(cluster, prompts, max_tokens, got):
    def one(i):
        with Client(cluster.address, timeout_s=120) as c:
            got[i] = tuple(c.generate(build_request(prompts[i], max_tokens=max_tokens)).token_ids)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    return threads


def _gauge(cluster, pool, state) -> float:
    text = generate_latest(cluster.server.metrics.registry).decode()
    line = next(x for x in text.splitlines() if x.startswith("pdserve_router_pool_workers{")
                and f'pool="{pool}"' in x and f'state="{state}"' in x)
    return float(line.rsplit(" ", 1)[1])


def test_added_workers_serve_and_drained_ones_leave_holding_nothing(demo_model_dir, engine):
    cfg = engine_config(demo_model_dir)
    cluster = LocalCluster(cfg, num_prefill=1, num_decode=1)
    new_p = build_prefill_host("prefill-1", cfg, cluster.kv, 1)
    new_d = build_decode_host("decode-1", cfg, cluster.kv, 1)
    try:
        with cluster:
            members = cluster.server.membership
            cluster.run(members.add("prefill", "prefill-1", new_p))
            cluster.run(members.add("decode", "decode-1", new_d))
            assert members.sizes() == {"prefill": {"active": 2, "draining": 0},
                                       "decode": {"active": 2, "draining": 0}}
            assert _gauge(cluster, "decode", "active") == 2

            prompts = [[5 + i, 17, 23 + i, 99] * (i + 1) for i in range(8)]
            want = [c.token_ids for c in engine.generate(
                prompts, [SamplingParams(max_tokens=40)] * len(prompts))]
            got: list = [None] * len(prompts)
            threads = _generate(cluster, prompts, 40, got)
            # Drain the first workers while those requests stream through both pools.
            loads = cluster.server.orchestrator.decode_load
            assert wait_until(lambda: loads["decode-0"].in_flight > 0)
            futs = [asyncio.run_coroutine_threadsafe(members.drain(w, timeout_s=120),
                                                     cluster.loop)
                    for w in ("decode-0", "prefill-0")]
            assert wait_until(lambda: _gauge(cluster, "decode", "draining") == 1, timeout=5)
            for f in futs:
                f.result(180)
            # They left only once holding nothing; every request finished intact.
            assert work_held(cluster.run(cluster.decodes[0].stats())) == 0
            assert work_held(cluster.run(cluster.prefills[0].stats())) == 0
            for t in threads:
                t.join(180)
            assert got == list(want)
            assert members.sizes() == {"prefill": {"active": 1, "draining": 0},
                                       "decode": {"active": 1, "draining": 0}}
            assert _gauge(cluster, "decode", "draining") == 0
            assert _gauge(cluster, "decode", "active") == 1

            # New requests go to the workers that joined.
            steps = cluster.run(new_d.stats()).steps
            with Client(cluster.address, timeout_s=60) as c:
                out = c.generate(build_request(prompts[0], max_tokens=8)).token_ids
            assert tuple(out) == want[0][:8]
            assert cluster.run(new_d.stats()).steps > steps
            assert wait_until(lambda: work_held(cluster.run(new_d.stats())) == 0)
            # The last of a pool cannot leave.
            with pytest.raises(ValueError, match="last of its pool"):
                cluster.run(members.drain("decode-1"))
    finally:  # after the router stopped
        new_p.close()
        new_d.close()


def test_drain_that_times_out_keeps_the_worker_in_service(demo_model_dir):
    cfg = engine_config(demo_model_dir)
    with LocalCluster(cfg, num_prefill=1, num_decode=2) as cluster:
        members = cluster.server.membership
        got: list = [None] * 4
        threads = _generate(cluster, [[7, 8, 9, 10]] * 4, 200, got)
        assert wait_until(lambda: any(w.in_flight for w in
                                      cluster.server.orchestrator.decode_load.values()))
        busy = next(w for w, load in cluster.server.orchestrator.decode_load.items()
                    if load.in_flight)
        with pytest.raises(DrainTimeout, match=busy):
            cluster.run(members.drain(busy, timeout_s=0.05))
        load = cluster.server.orchestrator.decode_load[busy]
        assert not load.draining
        assert members.sizes()["decode"] == {"active": 2, "draining": 0}
        for t in threads:
            t.join(180)
        assert all(g is not None and len(g) == 200 for g in got)
        assert wait_until(lambda: local_idle(cluster))
