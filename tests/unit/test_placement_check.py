"""placement_check: an impossible placement is named at once (which pool, what it asks for,
what the cluster has); a possible one passes; a growing cluster is waited for. No Ray: the
cluster is given as ``ray.nodes()``-style dicts."""

from __future__ import annotations

import pytest

from pdserve.cluster.launch.launcher import ClusterSpec, PoolSpec, local_ray_cpus, pool_demands
from pdserve.cluster.launch.placement_check import (
    Demand,
    PlacementError,
    check_fits,
    wait_until_placeable,
)
from pdserve.cluster.launch.plan_launcher import group_demands
from pdserve.cluster.planning.plan import PlacementGroupSpec
from pdserve.engine.config import EngineConfig


def node(alive=True, **resources):
    return {"NodeID": "n", "Alive": alive,
            "Resources": {"memory": 8e9, "object_store_memory": 1e9, **resources}}


ONE = PoolSpec(1)


def pools(prefill=ONE, decode=ONE, colocated=None):
    return pool_demands(ClusterSpec(engine=EngineConfig(model="m"), prefill=prefill,
                                    decode=decode, colocated=colocated))


def test_demand_of_pool_keeps_what_a_worker_asks_for():
    d = Demand.of_pool("decode", PoolSpec(2, num_cpus=1, num_gpus=0.5,
                                          resources=(("decode", 1.0),)))
    assert d.name == "decode pool" and d.count == 2
    assert d.needs == {"CPU": 1.0, "GPU": 0.5, "decode": 1.0}
    assert d.describe() == "2 workers x {CPU: 1, GPU: 0.5, decode: 1}"
    assert Demand.of_pool("p", PoolSpec(1, num_cpus=1)).needs == {"CPU": 1.0}  # no GPU 0


def test_fitting_pools_pass():
    check_fits(pools(PoolSpec(2), PoolSpec(2)), [node(CPU=5.0)])
    check_fits(pools(PoolSpec(2, num_gpus=1), PoolSpec(2, num_gpus=1)),
               [node(CPU=0.0), node(CPU=4.0, GPU=2.0), node(CPU=4.0, GPU=2.0)])
    check_fits(pools(colocated=PoolSpec(4)), [node(CPU=4.0)], {"CPU": 4.0})


def test_gpu_pool_on_a_cpu_only_cluster_names_pool_and_gpu():
    with pytest.raises(PlacementError) as err:
        check_fits(pools(PoolSpec(2, num_gpus=1), PoolSpec(2, num_gpus=1)), [node(CPU=2.0)])
    assert str(err.value) == (
        "cannot place the prefill pool: it asks for 2 workers x {CPU: 1, GPU: 1}, and no node "
        "can hold one; the cluster has CPU 2, GPU 0 on 1 node")


def test_pools_together_over_the_cluster_name_the_shortfall():
    with pytest.raises(PlacementError) as err:
        check_fits(pools(PoolSpec(2), PoolSpec(2)), [node(CPU=2.0)])
    msg = str(err.value)
    assert msg.startswith("cannot place the prefill pool and decode pool together: "
                          "prefill pool 2 workers x {CPU: 1} + decode pool 2 workers x {CPU: 1}")
    assert "= CPU 4, CPU 2 more than the cluster has free" in msg
    assert msg.endswith("the cluster has CPU 2 on 1 node")


def test_free_resources_count_not_just_totals():
    with pytest.raises(PlacementError, match=r"CPU 1 more than the cluster has free; the "
                                             r"cluster has CPU 4 \(1 free\) on 1 node"):
        check_fits(pools(colocated=PoolSpec(2)), [node(CPU=4.0)], {"CPU": 1.0})


def test_a_worker_must_fit_on_one_node_not_just_in_the_sum():
    with pytest.raises(PlacementError) as err:
        check_fits(pools(decode=PoolSpec(1, num_cpus=3)), [node(CPU=2.0), node(CPU=2.0)])
    assert "decode pool: it asks for 1 worker x {CPU: 3}, and no node can hold one" in str(err.value)
    assert "CPU 4, GPU 0 on 2 nodes: {CPU: 2}, {CPU: 2}" not in str(err.value)  # GPU not asked
    assert "the cluster has CPU 4 on 2 nodes: {CPU: 2}, {CPU: 2}" in str(err.value)


def test_custom_resource_missing_and_dead_nodes_ignored():
    with pytest.raises(PlacementError, match="decode pool.*decode: 1.*decode 0"):
        check_fits(pools(decode=PoolSpec(1, resources=(("decode", 1.0),))),
                   [node(CPU=8.0, prefill=1.0), node(alive=False, CPU=8.0, decode=1.0)])
    with pytest.raises(PlacementError, match="on 0 nodes"):
        check_fits(pools(), [node(alive=False, CPU=8.0)])


def test_fractional_gpus_add_up_without_float_noise():
    check_fits([Demand("decode pool", 10, (("GPU", 0.1),))], [node(CPU=1.0, GPU=1.0)])


def test_strict_pack_group_must_fit_one_node():
    bundle = (("CPU", 1.0), ("GPU", 1.0))
    strict = PlacementGroupSpec((bundle, bundle), "STRICT_PACK",
                                (("prefill", 0, 0), ("decode", 0, 0)))
    pack = PlacementGroupSpec((bundle, bundle), "PACK", (("prefill", 1, 0), ("decode", 1, 0)))
    two_nodes = [node(CPU=4.0, GPU=1.0), node(CPU=4.0, GPU=1.0)]
    check_fits(group_demands([pack]), two_nodes)  # PACK may spread over both nodes
    with pytest.raises(PlacementError, match=r"placement group 0 \(prefill-0, decode-0\): it "
                                             r"asks for 1 node-sized unit x \{CPU: 2, GPU: 2\}"):
        check_fits(group_demands([strict]), two_nodes)


def test_wait_until_placeable_waits_for_a_node_to_join():
    clock = [0.0]
    views = iter([([node(CPU=2.0)], {"CPU": 2.0})] * 3
                 + [([node(CPU=2.0), node(CPU=4.0)], {"CPU": 6.0})])
    wait_until_placeable(pools(PoolSpec(2), PoolSpec(2)), timeout_s=30, view=lambda: next(views),
                         clock=lambda: clock[0],
                         sleep=lambda s: clock.__setitem__(0, clock[0] + s))
    assert clock[0] == 1.5  # three failed looks, half a second apart


def test_wait_until_placeable_gives_up_with_the_last_reason():
    clock = [0.0]
    with pytest.raises(PlacementError, match=r"prefill pool.*GPU 0 on 1 node \(after waiting "
                                             r"5 s\)$"):
        wait_until_placeable(pools(PoolSpec(1, num_gpus=1)), timeout_s=5,
                             view=lambda: ([node(CPU=2.0)], {"CPU": 2.0}),
                             clock=lambda: clock[0],
                             sleep=lambda s: clock.__setitem__(0, clock[0] + s))
    assert clock[0] == 5.0
    with pytest.raises(PlacementError, match=r"GPU 0 on 1 node$"):  # no wait: no suffix
        wait_until_placeable(pools(PoolSpec(1, num_gpus=1)), timeout_s=0,
                             view=lambda: ([node(CPU=2.0)], {"CPU": 2.0}))


def test_local_ray_is_sized_for_what_it_launches(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert local_ray_cpus(4.0) == 5  # 2 prefill + 2 decode workers on a 2-core machine
    assert local_ray_cpus(1.5) == 3
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert local_ray_cpus(2.0) == 16


def test_auto_device_on_a_local_cluster_does_not_start_ray(monkeypatch):
    """The root cause of the 2-core hang: deciding GPUs started a 2-CPU Ray first."""
    import ray

    from pdserve.cluster.cli import serve_commands as commands

    def no_ray(*a, **k):
        raise AssertionError("worker_gpus started Ray")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr(commands, "local_gpu_count", lambda: 0)
    assert commands.worker_gpus("auto", None, None) == 0.0
    monkeypatch.setattr(commands, "local_gpu_count", lambda: 2)
    assert commands.worker_gpus("auto", None, None) == 1.0
    assert commands.worker_gpus("cpu", None, None) == 0.0
    assert commands.worker_gpus("auto", 0.25, None) == 0.25


def test_serve_flags_and_their_checks():
    from pdserve.cluster.cli.main import build_parser, main

    args = build_parser().parse_args(["serve"])
    assert args.placement_timeout == 10.0 and args.ready_timeout == 600.0
    args = build_parser().parse_args(["serve", "--placement-timeout", "300",
                                      "--ready-timeout", "1800"])
    assert (args.placement_timeout, args.ready_timeout) == (300.0, 1800.0)
    assert main(["serve", "--placement-timeout", "-1"]) == 2
