"""KV-aware prefill routing: the router's prefix record, the scoring, and a live cluster.

The record (``PrefixIndex``): matches leading blocks, forgets beyond a worker's capacity,
is corrected by prefill results and dropped with a worker. The keys are the prefill
workers' own prefix-cache hashes. The policy: a repeated prefix goes back to the worker
that holds it unless that worker's queue costs more than the hit saves; admission
predicts with the uncached tokens only. In one process (real workers, router, gRPC):
requests sharing a long prefix find it cached, and greedy output is unchanged.
"""

from __future__ import annotations

import pytest

from pdserve.cluster.cli.client import Client, build_request
from pdserve.cluster.launch.local import LocalCluster
from pdserve.engine.block_manager import BlockManager
from pdserve.engine.latency_profile import distserve_opt13b_a100
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling_params import SamplingParams
from pdserve.router.config import RouterConfig
from pdserve.router.policies import create_policy
from pdserve.router.policy import LeastLoaded, RoutingRequest, WorkerLoad
from pdserve.router.policy_kv import KvAware, block_keys
from pdserve.router.prefix_index import PrefixIndex, WorkerPrefixes
from pdserve.router.server import ServerConfig
from tests.cluster_helpers import engine_config


def test_worker_record_matches_leading_blocks_and_forgets_beyond_capacity():
    w = WorkerPrefixes(capacity_blocks=4)
    w.record(["a", "b", "c"])
    assert w.match(["a", "b", "x", "c"]) == 2 and w.match(["x", "a"]) == 0
    w.record(["d", "e"])  # five blocks in a record of four: "a" (least recent) goes
    assert len(w) == 4 and w.match(["a"]) == 0 and w.match(["b", "c"]) == 2
    w.forget_from(["b", "c", "d"], 1)
    assert w.match(["b", "c"]) == 1
    with pytest.raises(ValueError):
        WorkerPrefixes(0)


def test_index_is_corrected_by_results_and_dropped_with_a_worker():
    idx = PrefixIndex(default_capacity_blocks=100)
    idx.record("p0", ["a", "b", "c"])
    idx.observe("p0", ["a", "b", "c", "d"], cached_blocks=1)  # it had lost b and c
    assert idx.match("p0", ["a", "b", "c", "d"]) == 4  # ...and now computed all four
    idx.observe("p0", ["a", "x"], cached_blocks=0)  # "a" was evicted meanwhile
    assert idx.match("p0", ["a"]) == 1  # recomputed: held again
    idx.drop("p0")
    assert idx.match("p0", ["a"]) == 0


def test_keys_are_the_prefix_caches_own_hashes():
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    prompt = list(range(3, 17))  # 14 tokens: 3 full blocks
    alloc = bm.allocate("r", prompt)
    bm.mark_computed("r", prompt)
    keys = block_keys(prompt, 4)
    assert len(keys) == 3
    bm.free("r")
    again = bm.allocate("s", prompt + [99])
    assert again.num_cached_tokens == 12  # the worker reuses exactly the keyed blocks
    assert block_keys(prompt[:8] + [1, 2, 3, 4], 4)[:2] == keys[:2] != block_keys([0] * 12, 4)[:2]
    del alloc


def _loads(n=2, block_size=4):
    return [WorkerLoad(f"p{i}", block_size=block_size) for i in range(n)]


def _req(rid, prompt):
    return RoutingRequest(rid, len(prompt), 4, prompt_token_ids=tuple(prompt))


def test_a_repeated_prefix_goes_back_to_its_worker_unless_its_queue_costs_more():
    policy = KvAware(LeastLoaded())
    loads = _loads()
    shared = list(range(100, 140))  # 10 blocks of 4
    first = policy.rank_prefill(_req("a", shared + [1, 2]), loads)[0]
    other = next(w for w in loads if w.worker_id != first)
    holder = next(w for w in loads if w.worker_id == first)
    holder.queued_tokens = 30  # busier, but the hit saves 40 tokens of compute
    assert policy.rank_prefill(_req("b", shared + [7, 8, 9]), loads)[0] == first
    holder.queued_tokens = 500  # now the queue costs more than the hit saves
    assert policy.rank_prefill(_req("c", shared + [5]), loads)[0] == other.worker_id
    # nothing cached anywhere and equal loads: the choice rotates
    holder.queued_tokens = 0
    other.queued_tokens = 0
    picks = {policy.rank_prefill(_req(f"d{i}", [i + 1] * 9), loads)[0] for i in range(4)}
    assert picks == {"p0", "p1"}


def test_results_correct_the_record():
    policy = KvAware(LeastLoaded())
    loads = _loads()
    shared = list(range(100, 140))
    req = _req("a", shared + [1])
    first = policy.rank_prefill(req, loads)[0]
    policy.observe_prefill(req, first, cached_tokens=0, block_size=4)
    assert policy.index.match(first, block_keys(shared, 4)) == 10  # computed: held
    req2 = _req("b", shared + [2])
    assert policy.rank_prefill(req2, loads)[0] == first
    policy.observe_prefill(req2, first, cached_tokens=8, block_size=4)  # lost 8 blocks
    assert policy.index.match(first, block_keys(shared, 4)) == 10  # recomputed again
    policy.forget_worker(first)
    assert policy.index.match(first, block_keys(shared, 4)) == 0


def test_over_slo_aware_admission_predicts_with_the_uncached_tokens():
    profile = distserve_opt13b_a100()
    policy = create_policy("slo_aware", profile, 2048, kv_aware=True)
    assert isinstance(policy, KvAware)
    loads = _loads(block_size=16)
    shared = list(range(1000, 1000 + 1024))
    cold = policy.predict_ttft_s(_req("x", shared + [1]), loads[0])
    first = policy.rank_prefill(_req("a", shared + [1]), loads)[0]
    holder = next(w for w in loads if w.worker_id == first)
    warm = policy.predict_ttft_s(_req("b", shared + [2]), holder)
    assert warm < cold  # 1024 of 1025 tokens cached: only one to compute


def test_live_cluster_reuses_shared_prefixes(demo_model_dir):
    """Two prefill workers in one process; requests share a 96-token prefix. With
    KV-aware routing every request after the first finds the prefix cached (usage says
    so), and greedy tokens equal the single-process engine's."""
    prefix = [7 + (i * 13) % 800 for i in range(96)]
    prompts = [prefix + [900 + i, 3 + i] for i in range(6)]
    engine = LLMEngine.from_config(engine_config(demo_model_dir))
    want = [tuple(c.token_ids) for c in engine.generate(prompts, SamplingParams(max_tokens=3))]
    router = RouterConfig(model=str(demo_model_dir), server=ServerConfig(port=0, metrics_port=0),
                          kv_aware_routing=True)
    with LocalCluster(engine_config(demo_model_dir), num_prefill=2, num_decode=1,
                      router=router) as c, Client(c.address, timeout_s=60) as client:
        got, cached = [], []
        for p in prompts:  # one at a time: each sees the previous one's cache
            out = client.generate(build_request(p, max_tokens=3))
            got.append(tuple(out.token_ids))
            cached.append(out.usage.cached_tokens)
    assert got == want
    assert cached[0] == 0 and all(n == 96 for n in cached[1:]), cached
