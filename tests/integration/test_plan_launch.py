"""``serve --plan``: a low node-affinity plan becomes one STRICT_PACK placement group per
prefill+decode pair; each pair lands on one node and requests stay inside their unit."""

from __future__ import annotations

import pytest

from pdserve.cluster.cli.client import Client, build_request
from pdserve.cluster.launch.plan_launcher import check_launchable, launch_plan
from pdserve.cluster.planning.plan import InstanceGroup, Plan, Segment, low_affinity_groups
from pdserve.cluster.planning.simulator.config import InstanceSpec
from pdserve.engine.config import EngineConfig
from pdserve.kv_transfer.backend_config import KVTransferConfig
from pdserve.router.config import RouterConfig
from pdserve.router.server import ServerConfig

pytestmark = pytest.mark.integration


def low_affinity_plan(model: str) -> Plan:
    groups = low_affinity_groups(1, 1, 1, 1, 1, 1, pp_cross=1, units=2, gpus_per_node=2)
    return Plan(model=model, profile="test", mode="disaggregated", affinity="low",
                prefill=InstanceSpec(1, 1, 2), decode=InstanceSpec(1, 1, 2), units=2,
                placement=tuple(groups))


def test_plans_that_cannot_launch_are_refused_clearly(demo_model_dir):
    plan = Plan(model="m", profile="p", mode="colocated", affinity="none",
                colocated=InstanceSpec(2, 1, 1))
    with pytest.raises(ValueError, match="tp=2"):
        check_launchable(plan)
    piped = Plan(model="m", profile="p", mode="disaggregated", affinity="high",
                 prefill=InstanceSpec(1, 2, 1), decode=InstanceSpec(1, 1, 1),
                 placement=(InstanceGroup((Segment("prefill", 0, 0, 2, 1),)),
                            InstanceGroup((Segment("decode", 0, 0, 1, 1),))))
    with pytest.raises(ValueError, match="pp=2"):
        check_launchable(piped)


def test_plan_with_tensor_parallel_instances(ray_cluster, tmp_path):
    """A plan's tp 2 prefill instance runs as two rank actors in its bundle (2 GPUs, on
    one node), beside a tp 1 decode instance; requests get the tp 1 engine's tokens."""
    import ray

    from pdserve.engine.demo_tp_model import create_tp_demo_model
    from pdserve.engine.llm_engine import LLMEngine
    from pdserve.engine.sampling_params import SamplingParams

    model = str(create_tp_demo_model("llama", tmp_path / "llama"))
    plan = Plan(model=model, profile="test", mode="disaggregated", affinity="high",
                prefill=InstanceSpec(2, 1, 1), decode=InstanceSpec(1, 1, 1),
                placement=(InstanceGroup((Segment("prefill", 0, 0, 1, 2),)),
                           InstanceGroup((Segment("decode", 0, 0, 1, 1),))))
    engine = EngineConfig(model=model, device="cpu", num_kv_blocks=256)
    prompts = [[5 + i] * (3 + 7 * i) for i in range(4)]
    want = [tuple(c.token_ids) for c in LLMEngine.from_config(engine).generate(
        prompts, SamplingParams(max_tokens=6))]
    cluster = launch_plan(
        plan, engine, KVTransferConfig(backend="tcp"),
        RouterConfig(model=model, server=ServerConfig(port=0, metrics_port=0)),
        cpus_per_bundle=0.5, torch_threads=1)
    try:
        (_, prefill), = cluster.prefills
        assert len(ray.get(prefill.rank_pids.remote())) == 1
        with Client(cluster.address, timeout_s=60) as c:
            got = [tuple(c.generate(build_request(p, max_tokens=6)).token_ids) for p in prompts]
        assert got == want
    finally:
        cluster.shutdown()


def test_low_affinity_plan_pairs_share_a_node(ray_cluster, demo_model_dir):
    import ray

    plan = low_affinity_plan(str(demo_model_dir))
    specs = plan.placement_groups()
    assert [s.strategy for s in specs] == ["STRICT_PACK", "STRICT_PACK"]
    cluster = launch_plan(
        plan, EngineConfig(model=str(demo_model_dir), device="cpu", num_kv_blocks=256),
        KVTransferConfig(backend="shm"),
        RouterConfig(model=str(demo_model_dir), server=ServerConfig(port=0, metrics_port=0)),
        torch_threads=1)
    try:
        node = {w: ray.get(h.node_id.remote()) for w, h in (*cluster.prefills, *cluster.decodes)}
        assert node["prefill-0"] == node["decode-0"]
        assert node["prefill-1"] == node["decode-1"]
        assert node["prefill-0"] != node["prefill-1"]  # 2 GPUs per node: one pair each
        assert dict(cluster.spec.router.units) == {"prefill-0": 0, "decode-0": 0,
                                                   "prefill-1": 1, "decode-1": 1}
        with Client(cluster.address, timeout_s=60) as c:
            for i in range(6):
                assert len(c.generate(build_request([9 + i] * 20, max_tokens=3)).token_ids) == 3
        stats = cluster.stats()
        assert all(s.completed > 0 for w, s in stats.items() if w.startswith("prefill"))
    finally:
        cluster.shutdown()
