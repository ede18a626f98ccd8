"""Launching a ``Plan`` (``pdserve serve --plan``) on Ray placement groups.

Lifecycle: every ``PlacementGroupSpec`` of the plan becomes one Ray placement group
(STRICT_PACK for a low-affinity group, whose prefill and decode segments must share a
node so KV moves over the node's fast link; PACK otherwise); once all are ready, each
worker actor is created in its bundle with ``PlacementGroupSchedulingStrategy``, then
the router, exactly as ``launcher.launch`` does for plain pools. Low-affinity plans are
made of identical units: the router is told each worker's unit, so a request's prefill
worker and decode worker always come from the same unit.

An instance of tp > 1 is tp rank actors in its bundle (which holds its tp GPUs):
rank 0 is the pool's worker, the others ``TPRankActor``s it starts in the same bundle
(``tp_ranks.py``). Pipeline parallelism is not built: a plan with pp > 1 is refused with
a clear error instead of being launched wrongly. A plan the
cluster cannot hold is refused too, before anything is created (``placement_check``: a
STRICT_PACK group must fit on one node, every bundle on some node, all of them in the
cluster's free resources), and the waits for the groups and the workers are bounded; a
failed launch removes what it created.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from pdserve.cluster.launch.launcher import (
    LOCAL_GRACE_S,
    Cluster,
    ClusterSpec,
    PoolSpec,
    abandon,
    init_ray,
    kv_between_degrees,
    local_ray_cpus,
    shm_segments_of,
    start_router,
)
from pdserve.cluster.launch.placement_check import (
    DEFAULT_PLACEMENT_TIMEOUT_S,
    DEFAULT_READY_TIMEOUT_S,
    Demand,
    PlacementError,
    describe_cluster,
    wait_ready,
    wait_until_placeable,
)
from pdserve.cluster.launch.tp_ranks import RayRankLauncher
from pdserve.cluster.planning.plan import PlacementGroupSpec, Plan
from pdserve.engine.config import EngineConfig
from pdserve.kv_transfer.backend_config import KVTransferConfig
from pdserve.router.config import RouterConfig

log = logging.getLogger(__name__)


def check_launchable(plan: Plan) -> None:
    for name in ("prefill", "decode", "colocated"):
        spec = getattr(plan, name)
        if spec is not None and spec.pp > 1:
            raise ValueError(
                f"the plan's {name} instances use pp={spec.pp}; pdserve workers have no "
                "pipeline parallelism yet (tensor parallelism is supported). Plan with "
                "--max-pp 1.")
        if spec is not None and name == "colocated" and spec.tp > 1:
            raise ValueError(
                f"the plan's colocated instances use tp={spec.tp}; colocated workers run at "
                "tp 1 (tensor parallelism is for the prefill and decode pools).")
    if not plan.placement:
        raise ValueError("the plan has no placement groups")


def degrees(plan: Plan) -> dict[str, int]:
    """Tensor parallel ranks per instance, by role."""
    return {role: getattr(plan, role).tp for role in ("prefill", "decode", "colocated")
            if getattr(plan, role) is not None}


def unit_of(plan: Plan, role: str, instance: int) -> int | None:
    if plan.mode == "colocated" or plan.units == 1:
        return None
    per_unit = (plan.prefill.count if role == "prefill" else plan.decode.count) // plan.units
    return instance // per_unit


def group_demands(pg_specs: list[PlacementGroupSpec]) -> list[Demand]:
    """What each placement group asks of the cluster: a STRICT_PACK group is one unit that
    must fit on a single node; the bundles of any other group may land on different nodes."""
    out = []
    for i, spec in enumerate(pg_specs):
        name = f"placement group {i} ({', '.join(f'{r}-{n}' for r, n, _ in spec.roles)})"
        if spec.strategy == "STRICT_PACK":
            total: dict[str, float] = {}
            for bundle in spec.bundles:
                for key, value in bundle:
                    total[key] = total.get(key, 0.0) + value
            out.append(Demand(name, 1, tuple((k, v) for k, v in total.items() if v > 0),
                              unit="node-sized unit"))
            continue
        shapes: dict[tuple[tuple[str, float], ...], int] = {}
        for bundle in spec.bundles:
            shape = tuple((k, v) for k, v in bundle if v > 0)
            shapes[shape] = shapes.get(shape, 0) + 1
        out.extend(Demand(name, n, shape, unit="bundle") for shape, n in shapes.items())
    return out


def launch_plan(plan: Plan, engine: EngineConfig, kv: KVTransferConfig, router: RouterConfig,
                address: str | None = None, cpus_per_bundle: float = 1.0,
                torch_threads: int | None = None,
                placement_timeout_s: float = DEFAULT_PLACEMENT_TIMEOUT_S,
                ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S) -> Cluster:
    """``placement_timeout_s`` and ``ready_timeout_s`` mean what they mean for
    ``launcher.launch``; the placement groups themselves get ``placement_timeout_s`` (at
    least 10 s) to be reserved once the cluster has room for them."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from pdserve.decode_worker.actor import DecodeWorkerActor
    from pdserve.prefill_worker.actor import PrefillWorkerActor
    from pdserve.router.actor import RouterActor
    from pdserve.router.build import check_profile

    check_launchable(plan)
    tp = degrees(plan)
    router = dataclasses.replace(router, decode_tp=tp.get("decode", 1))
    check_profile(router)
    kv = kv_between_degrees(kv, tp.get("prefill", 1), tp.get("decode", 1))
    pg_specs = plan.placement_groups(cpus_per_bundle)
    demands = group_demands(pg_specs)
    started = init_ray(address, num_cpus=local_ray_cpus(
        sum(dict(b).get("CPU", 0.0) for s in pg_specs for b in s.bundles)))
    pgs: list[Any] = []
    workers: list[tuple[str, Any]] = []
    try:
        wait_until_placeable(demands, min(placement_timeout_s, LOCAL_GRACE_S) if started
                             else placement_timeout_s)
        pgs = [placement_group(s.bundle_dicts(), strategy=s.strategy) for s in pg_specs]
        wait_for_groups(pgs, max(placement_timeout_s, 10.0), demands)
        prefills, decodes, units = [], [], {}
        for pg, spec in zip(pgs, pg_specs, strict=True):
            for bundle, (role, instance, _stage) in enumerate(spec.roles):
                # an instance's bundle holds its tp GPUs: one rank actor on each
                n = tp[role]
                gpus = dict(spec.bundles[bundle]).get("GPU", 0.0) / n
                # restarted in place after a crash, like the launcher's pools (PoolSpec)
                opts = dict(num_cpus=cpus_per_bundle / n, num_gpus=gpus,
                            max_restarts=PoolSpec().max_restarts,
                            scheduling_strategy=PlacementGroupSchedulingStrategy(
                                pg, placement_group_bundle_index=bundle))
                ranks = RayRankLauncher(role, kv, cpus_per_bundle / n, gpus,
                                        torch_threads=torch_threads,
                                        bundle_index=bundle) if n > 1 else None
                wid = f"{role}-{instance}"
                role_engine = dataclasses.replace(engine, tensor_parallel_size=n)
                if role == "prefill":
                    prefills.append((wid, PrefillWorkerActor.options(**opts).remote(
                        wid, role_engine, kv, torch_threads, ranks)))
                else:
                    decodes.append((wid, DecodeWorkerActor.options(**opts).remote(
                        wid, role_engine, None if role == "colocated" else kv, torch_threads,
                        ranks)))
                workers.append((prefills if role == "prefill" else decodes)[-1])
                unit = unit_of(plan, role, instance)
                if unit is not None:
                    units[wid] = unit
        wait_ready(workers, ready_timeout_s=ready_timeout_s,
                   placement_timeout_s=placement_timeout_s, demands=demands)
        prefills.sort(key=lambda x: int(x[0].rsplit("-", 1)[1]))
        decodes.sort(key=lambda x: int(x[0].rsplit("-", 1)[1]))
        router = dataclasses.replace(router, units=tuple(sorted(units.items())))
        handle = RouterActor.options(num_cpus=0).remote(router, prefills, decodes)
        workers.append(("router", handle))
        endpoints = start_router(handle)
    except BaseException:
        for pg in pgs:
            remove_placement_group(pg)
        abandon(workers, started)
        raise
    log.info("plan launched: %d prefill, %d decode/colocated workers in %d placement groups; "
             "router on %s", len(prefills), len(decodes), len(pgs), endpoints["address"])
    spec = ClusterSpec(engine=engine, kv=kv, router=router)
    cluster = Cluster(spec, router=handle, prefills=prefills, decodes=decodes,
                      started_ray=started, shm_segments=shm_segments_of(decodes), **endpoints)
    cluster.placement_groups = pgs
    return cluster


def wait_for_groups(pgs: list[Any], timeout_s: float, demands: list[Demand]) -> None:
    """Until every placement group is reserved; else name the ones that are not."""
    import ray

    refs = {pg.ready(): i for i, pg in enumerate(pgs)}
    ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout_s)
    ray.get(ready)
    if pending:
        names = ", ".join(str(refs[r]) for r in sorted(pending, key=refs.__getitem__))
        raise PlacementError(
            f"placement group(s) {names} not reserved after {timeout_s:g} s (a STRICT_PACK "
            "group needs one node with room for all its bundles); asked for "
            + ", ".join(f"{d.name}: {d.describe()}" for d in demands) + "; "
            + describe_cluster(demands))
