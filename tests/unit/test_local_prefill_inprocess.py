"""Conditional disaggregation on the real request path, in one process (no Ray).

Router, workers and gRPC as in test_router_inprocess.py, with the short-prompt threshold
on: short prompts are prefilled on a decode worker, long ones on the prefill pool, and
greedy output equals the single-process engine's either way. The router's counter says
which went where; cancelling a local request frees its blocks; a decode worker that
refuses a local prefill sends the request down the remote path.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from pdserve.cluster.cli.client import Client, build_request
from pdserve.cluster.launch.local import LocalCluster
from pdserve.decode_worker.messages import NoCapacityError
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.router.config import RouterConfig
from pdserve.router.hops import HOP_NAMES
from pdserve.router.local_prefill import LocalPrefillConfig
from pdserve.router.prefill_placement import OUTCOMES
from pdserve.router.server import ServerConfig
from tests.cluster_helpers import engine_config, wait_until
from tests.cluster_helpers import local_idle as no_blocks_held

THRESHOLD = 24  # prompts of at most this many tokens are prefilled on a decode worker


def _router(model) -> RouterConfig:
    return RouterConfig(
        model=str(model),
        server=ServerConfig(port=0, metrics_port=None),
        local_prefill=LocalPrefillConfig(max_local_tokens=THRESHOLD),
    )


def _decisions(cluster) -> dict[tuple[str, str], float]:
    metrics = cluster.server.metrics
    return {
        (d, r): metrics.registry.get_sample_value(
            "pdserve_router_prefill_decisions_total",
            {"model": metrics.model, "decision": d, "reason": r},
        )
        for d, r in OUTCOMES
    }


def _counted(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def _prefill_queue_times(cluster) -> float:
    metrics = cluster.server.metrics
    return (
        metrics.registry.get_sample_value(
            "pdserve_request_queue_time_seconds_count", {"model": metrics.model, "pool": "prefill"}
        )
        or 0
    )


def _prefilled_remotely(cluster) -> int:
    return sum(s.completed for s in cluster.prefill_stats())


@pytest.fixture(scope="module")
def cluster(demo_model_dir):
    with LocalCluster(
        engine_config(demo_model_dir), num_prefill=1, num_decode=2, router=_router(demo_model_dir)
    ) as c:
        yield c


def test_short_prompts_local_long_remote_all_match_the_engine(cluster, demo_model_dir):
    rng = random.Random(3)
    lengths = [1, 5, 24, 25, 60, 120, 12, 90, 3, 24, 40, 18]
    prompts = [[rng.randrange(3, 900) for _ in range(n)] for n in lengths]
    max_tokens = [rng.randrange(1, 20) for _ in prompts]
    engine = LLMEngine.from_config(engine_config(demo_model_dir))
    want = [
        c.token_ids
        for c in engine.generate(prompts, [SamplingParams(max_tokens=m) for m in max_tokens])
    ]
    before, remote_before = _decisions(cluster), _prefilled_remotely(cluster)
    queued_before = _prefill_queue_times(cluster)

    def one(i):
        with Client(cluster.address, timeout_s=60) as c:
            return tuple(c.generate(build_request(prompts[i], max_tokens=max_tokens[i])).token_ids)

    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(one, range(len(prompts))))
    assert got == list(want)
    short = sum(n <= THRESHOLD for n in lengths)
    assert _counted(before, _decisions(cluster)) == {
        ("local", "short"): short,
        ("remote", "remote"): len(lengths) - short,
    }
    assert _prefilled_remotely(cluster) - remote_before == len(lengths) - short
    # only requests that went through the prefill pool have a prefill queue time
    assert _prefill_queue_times(cluster) - queued_before == len(lengths) - short
    assert wait_until(lambda: no_blocks_held(cluster)), cluster.decode_stats()


def test_a_local_requests_first_token_hops(cluster):
    with Client(cluster.address, timeout_s=60) as c:
        msgs = list(c.stream(build_request([5, 6, 7, 8], max_tokens=3)))
    usage = msgs[-1].usage
    names = [h.name for h in usage.timing.hops]
    assert "local_prefill" in names and "prefill_compute" not in names
    assert names == [n for n in HOP_NAMES if n in names]
    assert usage.cached_tokens == 0 and usage.completion_tokens == 3


def test_cancelling_a_local_request_mid_stream_frees_its_blocks(cluster):
    before = _decisions(cluster)
    with Client(cluster.address) as c:
        call = c.stream(build_request([11] * 20, max_tokens=2000, temperature=0.0))
        seen = 0
        for msg in call:
            seen += len(msg.token_ids)
            if seen >= 3:
                assert any(s.num_used_blocks for s in cluster.decode_stats())
                call.cancel()
                break
    assert _counted(before, _decisions(cluster)) == {("local", "short"): 1}
    assert wait_until(lambda: no_blocks_held(cluster)), cluster.decode_stats()
    assert all(s.num_running == 0 and s.num_waiting == 0 for s in cluster.decode_stats())


def test_a_decode_worker_that_refuses_the_local_prefill_sends_it_remote(demo_model_dir):
    prompt = [7, 8, 9, 10, 11]
    engine = LLMEngine.from_config(engine_config(demo_model_dir))
    want = engine.generate([prompt], SamplingParams(max_tokens=6))[0].token_ids
    with (
        LocalCluster(
            engine_config(demo_model_dir),
            num_prefill=1,
            num_decode=1,
            router=_router(demo_model_dir),
        ) as c,
        Client(c.address, timeout_s=60) as client,
    ):
        worker = c.decodes[0].worker

        def full(msg):
            raise NoCapacityError("at max_num_seqs")

        worker.prefill_local = full
        try:
            before = _decisions(c)
            assert tuple(client.generate(build_request(prompt, max_tokens=6)).token_ids) == want
            assert _counted(before, _decisions(c)) == {("remote", "decode_full"): 1}
        finally:
            del worker.prefill_local
        before = _decisions(c)  # room again: local
        assert tuple(client.generate(build_request(prompt, max_tokens=6)).token_ids) == want
        assert _counted(before, _decisions(c)) == {("local", "short"): 1}
        assert wait_until(lambda: no_blocks_held(c))
