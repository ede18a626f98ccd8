"""A launch the Ray cluster cannot hold fails within seconds, naming the pool and what is
missing, and leaves nothing behind (the session cluster: 12 CPUs, 4 fake GPUs, 2 per
worker node)."""

from __future__ import annotations

import time

import pytest

from pdserve.cluster.launch.launcher import ClusterSpec, PoolSpec, launch
from pdserve.cluster.launch.placement_check import PlacementError
from pdserve.cluster.launch.plan_launcher import launch_plan
from pdserve.cluster.planning.plan import Plan, low_affinity_groups
from pdserve.cluster.planning.simulator.config import InstanceSpec
from pdserve.kv_transfer.backend_config import KVTransferConfig
from pdserve.router.config import RouterConfig
from pdserve.router.server import ServerConfig
from tests.cluster_helpers import engine_config, wait_until

pytestmark = pytest.mark.integration


def router(model) -> RouterConfig:
    return RouterConfig(model=str(model), server=ServerConfig(port=0, metrics_port=0))


def free_cpus() -> float:
    import ray

    return ray.available_resources().get("CPU", 0.0)


@pytest.fixture(autouse=True)
def idle_ray(ray_cluster):
    """The session's Ray cluster shared with earlier test modules: wait until the actors
    they created have given back their CPUs, so what is free is what the cluster has."""
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    assert wait_until(lambda: free_cpus() == total, 60), (free_cpus(), total)


@pytest.mark.parametrize(("decode", "message"), [
    (PoolSpec(2, num_cpus=1, num_gpus=3),
     r"cannot place the decode pool: it asks for 2 workers x \{CPU: 1, GPU: 3\}, and no node "
     r"can hold one; the cluster has CPU 12, GPU 4 on 3 nodes"),
    (PoolSpec(20, num_cpus=1),
     r"cannot place the prefill pool and decode pool together: .*decode pool 20 workers x "
     r"\{CPU: 1\} = CPU 21, CPU 9 more than the cluster has free"),
    (PoolSpec(1, num_cpus=1, resources=(("decode", 1.0),)),
     r"cannot place the decode pool: .*\{CPU: 1, decode: 1\}.* decode 0 on 3 nodes"),
], ids=["gpus", "cpus", "custom-resource"])
def test_impossible_pool_fails_fast(ray_cluster, demo_model_dir, decode, message):
    before = free_cpus()
    spec = ClusterSpec(engine=engine_config(demo_model_dir), prefill=PoolSpec(1), decode=decode,
                       kv=KVTransferConfig(backend="shm"), router=router(demo_model_dir),
                       torch_threads=1)
    t0 = time.monotonic()
    with pytest.raises(PlacementError, match=message):
        launch(spec, placement_timeout_s=1.0)
    assert time.monotonic() - t0 < 10
    assert free_cpus() == before  # checked before any actor existed


def test_plan_that_needs_one_big_node_fails_fast(ray_cluster, demo_model_dir):
    # 2 prefill + 1 decode instance in one STRICT_PACK group: 3 GPUs on one node (max 2).
    groups = low_affinity_groups(1, 1, 2, 1, 1, 1, pp_cross=1, units=1, gpus_per_node=4)
    plan = Plan(model=str(demo_model_dir), profile="test", mode="disaggregated",
                affinity="low", prefill=InstanceSpec(1, 1, 2), decode=InstanceSpec(1, 1, 1),
                units=1, placement=tuple(groups))
    before = free_cpus()
    t0 = time.monotonic()
    with pytest.raises(PlacementError, match=r"placement group 0 \(prefill-0, prefill-1, "
                                             r"decode-0\): it asks for 1 node-sized unit x "
                                             r"\{CPU: 3, GPU: 3\}, and no node can hold one"):
        launch_plan(plan, engine_config(demo_model_dir), KVTransferConfig(backend="shm"),
                    router(demo_model_dir), placement_timeout_s=1.0, torch_threads=1)
    assert time.monotonic() - t0 < 10
    assert free_cpus() == before
