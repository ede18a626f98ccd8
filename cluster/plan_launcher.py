"""Launching a ``Plan`` (``pdserve serve --plan``) on Ray placement groups.

Lifecycle: every ``PlacementGroupSpec`` of the plan becomes one Ray placement group
(STRICT_PACK for a low-affinity group, whose prefill and decode segments must share a
node so KV moves over the node's fast link; PACK otherwise); once all are ready, each
worker actor is created in its bundle with ``PlacementGroupSchedulingStrategy``, then
the router, exactly as ``launcher.launch`` does for plain pools. Low-affinity plans are
made of identical units: the router is told each worker's unit, so a request's prefill
worker and decode worker always come from the same unit.

pdserve workers are single-device today: a plan whose instances need tensor or pipeline
parallelism is refused with a clear error instead of being launched wrongly.
"""

from __future__ import annotations

import dataclasses
import logging

from pdserve.cluster.launcher import Cluster, ClusterSpec, PoolSpec, init_ray, shm_segments_of
from pdserve.cluster.plan import Plan
from pdserve.engine.config import EngineConfig
from pdserve.kv_transfer.backend_config import KVTransferConfig
from pdserve.router.actor import RouterConfig

log = logging.getLogger(__name__)


def check_launchable(plan: Plan) -> None:
    for name in ("prefill", "decode", "colocated"):
        spec = getattr(plan, name)
        if spec is not None and (spec.tp > 1 or spec.pp > 1):
            raise ValueError(
                f"the plan's {name} instances use tp={spec.tp}, pp={spec.pp}; pdserve workers "
                "run one device each (no tensor/pipeline parallelism yet). Plan with a profile "
                "that has only tp=1 entries and --max-pp 1.")
    if not plan.placement:
        raise ValueError("the plan has no placement groups")


def unit_of(plan: Plan, role: str, instance: int) -> int | None:
    if plan.mode == "colocated" or plan.units == 1:
        return None
    per_unit = (plan.prefill.count if role == "prefill" else plan.decode.count) // plan.units
    return instance // per_unit


def launch_plan(plan: Plan, engine: EngineConfig, kv: KVTransferConfig, router: RouterConfig,
                address: str | None = None, cpus_per_bundle: float = 1.0,
                torch_threads: int | None = None, ready_timeout_s: float = 120.0) -> Cluster:
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from pdserve.decode_worker.actor import DecodeWorkerActor
    from pdserve.prefill_worker.actor import PrefillWorkerActor
    from pdserve.router.actor import RouterActor

    check_launchable(plan)
    started = init_ray(address)
    pg_specs = plan.placement_groups(cpus_per_bundle)
    pgs = [placement_group(s.bundle_dicts(), strategy=s.strategy) for s in pg_specs]
    ray.get([pg.ready() for pg in pgs], timeout=ready_timeout_s)
    prefills, decodes, units = [], [], {}
    for pg, spec in zip(pgs, pg_specs, strict=True):
        for bundle, (role, instance, _stage) in enumerate(spec.roles):
            gpus = dict(spec.bundles[bundle]).get("GPU", 0.0)
            # restarted in place after a crash, like the launcher's pools (PoolSpec)
            opts = dict(num_cpus=cpus_per_bundle, num_gpus=gpus,
                        max_restarts=PoolSpec().max_restarts,
                        scheduling_strategy=PlacementGroupSchedulingStrategy(
                            pg, placement_group_bundle_index=bundle))
            wid = f"{role}-{instance}"
            if role == "prefill":
                prefills.append((wid, PrefillWorkerActor.options(**opts).remote(
                    wid, engine, kv, torch_threads)))
            else:
                decodes.append((wid, DecodeWorkerActor.options(**opts).remote(
                    wid, engine, None if role == "colocated" else kv, torch_threads)))
            unit = unit_of(plan, role, instance)
            if unit is not None:
                units[wid] = unit
    ray.get([h.ready.remote() for _, h in (*prefills, *decodes)])
    prefills.sort(key=lambda x: int(x[0].rsplit("-", 1)[1]))
    decodes.sort(key=lambda x: int(x[0].rsplit("-", 1)[1]))
    router = dataclasses.replace(router, units=tuple(sorted(units.items())))
    handle = RouterActor.options(num_cpus=0).remote(router, prefills, decodes)
    endpoint = ray.get(handle.start.remote())
    metrics = ray.get(handle.metrics_address.remote())
    log.info("plan launched: %d prefill, %d decode/colocated workers in %d placement groups; "
             "router on %s", len(prefills), len(decodes), len(pgs), endpoint)
    spec = ClusterSpec(engine=engine, kv=kv, router=router)
    cluster = Cluster(spec, endpoint, handle, prefills, decodes, started_ray=started,
                      metrics_address=metrics, shm_segments=shm_segments_of(decodes))
    cluster.placement_groups = pgs
    return cluster
