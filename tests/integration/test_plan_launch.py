"""``serve --plan``: a low node-affinity plan becomes one STRICT_PACK placement group per
prefill+decode pair; each pair lands on one node and requests stay inside their unit."""

from __future__ import annotations

import pytest

from pdserve.cluster.cli.client import Client, build_request
from pdserve.cluster.launch.plan_launcher import check_launchable, launch_plan
from pdserve.cluster.planning.plan import Plan, low_affinity_groups
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


def test_plan_with_parallelism_is_refused_clearly(demo_model_dir):
    plan = Plan(model="m", profile="p", mode="colocated", affinity="none",
                colocated=InstanceSpec(2, 1, 1))
    with pytest.raises(ValueError, match="tp=2"):
        check_launchable(plan)


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
