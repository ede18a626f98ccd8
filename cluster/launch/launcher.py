"""Launching a disaggregated cluster on Ray: decode pool, prefill pool, router.

Lifecycle: ``launch(spec)`` resolves the KV shared secret (``with_cluster_secret``: the
configured one, else ``$PDSERVE_KV_SECRET``, else a random one for this cluster when the
backend is tcp), connects to (``address``) or starts a local Ray cluster, creates the
decode workers first (each publishes where its KV cache can be written), then the prefill
workers, waits until every worker has loaded its model, creates the
router actor with handles to both pools and starts its gRPC server. A local Ray is sized
for the workers it will hold. Before any actor exists, ``placement_check`` makes sure the
cluster can hold every pool (retrying up to ``placement_timeout_s`` for nodes that join
late) and otherwise raises at once, naming the pool and what is missing; the wait for the
workers is bounded too (``ready_timeout_s``), and a failed launch stops what it started.
The returned
``Cluster`` knows the endpoint and every handle; ``shutdown()`` stops the router
(in-flight streams get a grace period), then the workers, then Ray if it started it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

from pdserve.cluster.autoscale.config import AutoscaleConfig
from pdserve.cluster.launch.placement_check import (
    DEFAULT_PLACEMENT_TIMEOUT_S,
    DEFAULT_READY_TIMEOUT_S,
    Demand,
    wait_ready,
    wait_until_placeable,
)
from pdserve.engine.config import EngineConfig
from pdserve.kv_transfer.backend_config import KVTransferConfig
from pdserve.router.config import RouterConfig

log = logging.getLogger(__name__)

# Nothing joins a local Ray that launch() started, so its check is not retried for long.
LOCAL_GRACE_S = 2.0


@dataclass(frozen=True)
class PoolSpec:
    """One pool's size and where its actors may go (Ray resources / node labels)."""

    count: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: tuple[tuple[str, float], ...] = ()
    label_selector: tuple[tuple[str, str], ...] = ()
    # Ray restarts a worker whose process dies this many times (-1: always); the router's
    # heartbeat sees it back and returns it to the pool. 0 leaves a dead worker dead.
    max_restarts: int = 10
    # Tensor parallel ranks per worker: one actor each, each asking num_cpus/num_gpus and
    # resources, all on one node (docs/tensor_parallel.md).
    tp: int = 1

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError("a pool needs at least one worker")
        if self.tp < 1:
            raise ValueError(f"tp must be >= 1, got {self.tp}")
        if self.max_restarts < -1:
            raise ValueError("max_restarts must be >= -1")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError("num_cpus and num_gpus must be >= 0")

    def engine(self, engine: EngineConfig) -> EngineConfig:
        """The engine configuration of this pool's workers (its tensor parallel degree)."""
        return dataclasses.replace(engine, tensor_parallel_size=self.tp)

    def rank_launcher(self, role: str, kv: KVTransferConfig, torch_threads: int | None):
        """What starts ranks 1 .. tp-1 of each worker (None at tp 1)."""
        if self.tp == 1:
            return None
        from pdserve.cluster.launch.tp_ranks import RayRankLauncher

        return RayRankLauncher(role, kv, self.num_cpus, self.num_gpus, dict(self.resources),
                               torch_threads)

    def actor_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus,
                                "max_restarts": self.max_restarts}
        if self.resources:
            opts["resources"] = dict(self.resources)
        if self.label_selector:
            opts["label_selector"] = dict(self.label_selector)
        return opts


def kv_between_degrees(kv: KVTransferConfig, prefill_tp: int, decode_tp: int
                       ) -> KVTransferConfig:
    """``kv`` for prefill and decode instances of these TP degrees: between different
    degrees a receiver's KV heads come from several senders, and a digest of part of a
    receiver's heads is not built, so ``auto`` checksums are off there and an explicit
    mode is refused. (At equal degrees rank 0's transfer carries the digest of rank 0's
    share: the check covers that share.)"""
    if prefill_tp == decode_tp or kv.checksum == "off":
        return kv
    if kv.checksum != "auto":
        raise ValueError(
            f"KV checksum {kv.checksum!r} needs equal prefill and decode tp (got {prefill_tp} "
            f"and {decode_tp}): a digest of part of a receiver's KV heads is not built; use "
            "--kv-checksum off or auto")
    return dataclasses.replace(kv, checksum="off")


@dataclass(frozen=True)
class ClusterSpec:
    engine: EngineConfig
    prefill: PoolSpec = PoolSpec()
    decode: PoolSpec = PoolSpec()
    kv: KVTransferConfig = KVTransferConfig()
    router: RouterConfig | None = None
    torch_threads: int | None = None  # per worker; default: cores / workers, at least 1
    # Colocated baseline: this pool's workers each do both phases; prefill/decode unused.
    colocated: PoolSpec | None = None
    # The SLO autoscaler (cluster/autoscale/): resizes both pools within its bounds;
    # prefill.count and decode.count are the sizes it starts from.
    autoscale: AutoscaleConfig | None = None

    def __post_init__(self) -> None:
        if self.colocated is not None and self.colocated.tp > 1:
            raise ValueError("colocated workers run at tp 1")
        if self.colocated is None:
            kv_between_degrees(self.kv, self.prefill.tp, self.decode.tp)  # fails early
        if self.autoscale is not None:
            self._check_autoscale(self.autoscale)

    def _check_autoscale(self, a: AutoscaleConfig) -> None:
        if self.colocated is not None:
            raise ValueError("the autoscaler resizes prefill and decode pools, not a "
                             "colocated one")
        for role, pool, bounds, tp in (("prefill", self.prefill, a.prefill, a.prefill_tp),
                                       ("decode", self.decode, a.decode, a.decode_tp)):
            if bounds.min < 1:
                raise ValueError(f"{role} pool bounds: min must be >= 1 on a cluster (the "
                                 f"router needs a worker in each pool), got {bounds.min}")
            if not bounds.min <= pool.count <= bounds.max:
                raise ValueError(f"the {role} pool starts with {pool.count} workers, outside "
                                 f"the autoscaler's bounds {bounds.min}..{bounds.max}")
            if tp != pool.tp:
                raise ValueError(f"the autoscaler sizes {role} instances of tp {tp}, but the "
                                 f"pool runs tp {pool.tp}")

    @property
    def num_workers(self) -> int:
        if self.colocated is not None:
            return self.colocated.count
        return self.prefill.count + self.decode.count

    @property
    def num_ranks(self) -> int:
        """Processes that run model code: every rank of every worker."""
        if self.colocated is not None:
            return self.colocated.count
        return self.prefill.count * self.prefill.tp + self.decode.count * self.decode.tp

    def kv_config(self) -> KVTransferConfig:
        if self.colocated is not None:
            return self.kv
        return kv_between_degrees(self.kv, self.prefill.tp, self.decode.tp)

    def router_config(self) -> RouterConfig:
        router = self.router or RouterConfig(model=self.engine.model,
                                             max_model_len=self.engine.max_model_len)
        if self.colocated is None and router.decode_tp != self.decode.tp:
            # a local prefill's predicted time is the decode pool's
            router = dataclasses.replace(router, decode_tp=self.decode.tp)
        return router

    def threads_per_worker(self) -> int:
        if self.torch_threads:
            return self.torch_threads
        return max(1, (os.cpu_count() or 1) // self.num_ranks)


@dataclass
class Cluster:
    spec: ClusterSpec
    address: str
    router: Any
    prefills: list[tuple[str, Any]]
    decodes: list[tuple[str, Any]]
    started_ray: bool = False
    metrics_address: str | None = None
    http_address: str | None = None  # the OpenAI-compatible endpoint, when it is on
    placement_groups: list = field(default_factory=list)
    autoscaler: Any = None  # the AutoscalerActor, when the spec has one
    # Shared-memory KV segments of the decode workers: unlinked at shutdown even if a worker
    # was killed before it could unlink its own (a SIGKILL skips all cleanup).
    shm_segments: list[str] = field(default_factory=list)
    _closed: bool = field(default=False, repr=False)

    def stats(self) -> dict[str, Any]:
        import ray

        return {
            **{w: ray.get(h.stats.remote()) for w, h in self.prefills},
            **{w: ray.get(h.stats.remote()) for w, h in self.decodes},
        }

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        import ray

        if self.autoscaler is not None:  # first: it owns the workers it added
            try:
                pools = ray.get(self.autoscaler.stop.remote(), timeout=60)
                self.prefills, self.decodes = pools["prefill"], pools["decode"]
            except Exception:
                log.warning("autoscaler did not stop cleanly", exc_info=True)
            ray.kill(self.autoscaler)
        try:
            ray.get(self.router.stop.remote(), timeout=30)
        except Exception:  # the router may already be gone; workers still need stopping
            log.warning("router did not stop cleanly", exc_info=True)
        for _, h in (*self.prefills, *self.decodes):
            try:
                ray.get(h.shutdown.remote(), timeout=30)
            except Exception:
                log.warning("worker did not shut down cleanly", exc_info=True)
            ray.kill(h)
        ray.kill(self.router)
        unlink_shm_segments(self.shm_segments)
        from ray.util.placement_group import remove_placement_group

        for pg in self.placement_groups:
            remove_placement_group(pg)
        if self.started_ray:
            ray.shutdown()


def unlink_shm_segments(names: list[str]) -> None:
    """Retire and remove leftover shared-memory segments on this host (others' nodes are
    theirs)."""
    from pdserve.kv_transfer.incarnation import retire_segment

    for name in names:
        with contextlib.suppress(OSError):
            retire_segment(name)


def shm_segments_of(decodes: list[tuple[str, Any]]) -> list[str]:
    import ray

    names = []
    for _, h in decodes:
        names += [ep.address for ep in ray.get(h.kv_endpoints.remote()) if ep.backend == "shm"]
    return names


def init_ray(address: str | None, num_cpus: int | None = None) -> bool:
    """Connect to ``address`` or start a local Ray; returns True if this call started it.

    ``num_cpus`` sizes a local Ray (ignored when joining a cluster or when Ray is already
    up), so it must be decided before anything else starts Ray.
    """
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    return True


def local_ray_cpus(cpus_asked: float) -> int:
    """CPUs for a local Ray holding workers that ask for ``cpus_asked`` in all: at least
    the machine's cores, and one spare. Ray CPUs are a scheduling count, not a limit, so
    a small machine may host more (mostly idle) workers than it has cores."""
    return max(math.ceil(cpus_asked - 1e-9) + 1, os.cpu_count() or 1)


def pool_demands(spec: ClusterSpec) -> list[Demand]:
    if spec.colocated is not None:
        return [Demand.of_pool("colocated", spec.colocated)]
    return [Demand.of_pool("prefill", spec.prefill), Demand.of_pool("decode", spec.decode)]


def start_router(router: Any) -> dict[str, str | None]:
    """Start a ``RouterActor``; its endpoints as ``Cluster`` fields (address: gRPC,
    http_address, metrics_address)."""
    import ray

    grpc_address = ray.get(router.start.remote())
    http, metrics = ray.get([router.http_address.remote(), router.metrics_address.remote()])
    return {"address": grpc_address, "http_address": http, "metrics_address": metrics}


def abandon(workers: list[tuple[str, Any]], started_ray: bool) -> None:
    """Undo a launch that failed half-way: stop the workers created so far (briefly, the
    ones still loading or unplaced are killed), then Ray if the launch started it."""
    import ray

    handles = [h for _, h in workers]
    calls = [h.stop.remote() if wid in ("router", "autoscaler") else h.shutdown.remote()
             for wid, h in workers]
    if calls:
        with contextlib.suppress(Exception):
            ray.wait(calls, num_returns=len(calls), timeout=5)
    for h in handles:
        with contextlib.suppress(Exception):
            ray.kill(h)
    if started_ray:
        ray.shutdown()


def create_worker(spec: ClusterSpec, role: str, index: int, threads: int
                  ) -> tuple[str, Any]:
    """``(worker id, actor handle)`` of a new worker of the ``role`` pool ("prefill",
    "decode" or "colocated"), named ``{role}-{index}``; not waited for (``wait_ready``).
    ``spec.kv`` must already hold the cluster's secret (``launch`` resolves it)."""
    from pdserve.decode_worker.actor import DecodeWorkerActor
    from pdserve.prefill_worker.actor import PrefillWorkerActor

    wid = f"{role}-{index}"
    if role == "colocated":
        return wid, DecodeWorkerActor.options(**spec.colocated.actor_options()).remote(
            wid, spec.engine, None, threads)
    pool = spec.prefill if role == "prefill" else spec.decode
    actor = PrefillWorkerActor if role == "prefill" else DecodeWorkerActor
    return wid, actor.options(**pool.actor_options()).remote(
        wid, pool.engine(spec.engine), spec.kv, threads,
        pool.rank_launcher(role, spec.kv, threads))


def launch(spec: ClusterSpec, address: str | None = None,
           placement_timeout_s: float = DEFAULT_PLACEMENT_TIMEOUT_S,
           ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S) -> Cluster:
    """Start the cluster ``spec`` describes (see the module doc). ``placement_timeout_s``:
    how long a cluster that cannot hold the pools yet may take to grow (nothing joins a
    local Ray this call starts, so that one is only checked briefly); ``ready_timeout_s``:
    how long placing the workers and loading the model may take."""

    from pdserve.router.actor import RouterActor
    from pdserve.router.build import check_profile

    check_profile(spec.router_config())
    # One secret for every worker of this cluster, resolved before any of them exists.
    spec = dataclasses.replace(spec, kv=spec.kv_config().with_cluster_secret())
    n_workers = spec.num_workers
    pools = [spec.colocated] if spec.colocated else [spec.prefill, spec.decode]
    started = init_ray(address,
                       num_cpus=local_ray_cpus(sum(p.num_cpus * p.count * p.tp for p in pools)))
    demands = pool_demands(spec)
    workers: list[tuple[str, Any]] = []
    try:
        wait_until_placeable(demands, min(placement_timeout_s, LOCAL_GRACE_S) if started
                             else placement_timeout_s)
        threads = spec.threads_per_worker()
        if spec.colocated is not None:
            log.info("launching %d colocated workers", spec.colocated.count)
            prefills = []
            decodes = [create_worker(spec, "colocated", i, threads)
                       for i in range(spec.colocated.count)]
        else:
            log.info("launching %d prefill (tp %d) + %d decode (tp %d) workers",
                     spec.prefill.count, spec.prefill.tp, spec.decode.count, spec.decode.tp)
            decodes = [create_worker(spec, "decode", i, threads)
                       for i in range(spec.decode.count)]
            prefills = [create_worker(spec, "prefill", i, threads)
                        for i in range(spec.prefill.count)]
        workers = [*decodes, *prefills]
        wait_ready(workers, ready_timeout_s=ready_timeout_s,
                   placement_timeout_s=placement_timeout_s, demands=demands)
        router = RouterActor.options(num_cpus=0).remote(spec.router_config(), prefills, decodes)
        workers.append(("router", router))
        endpoints = start_router(router)
        autoscaler = None
        if spec.autoscale is not None:
            import ray

            from pdserve.cluster.autoscale.actor import AutoscalerActor

            autoscaler = AutoscalerActor.remote(spec.autoscale, spec, router, prefills, decodes,
                                                threads)
            workers.append(("autoscaler", autoscaler))
            ray.get(autoscaler.start.remote())
    except BaseException:
        abandon(workers, started)
        raise
    log.info("router listening on %s (%d workers); HTTP on %s; metrics on %s",
             endpoints["address"], n_workers, endpoints["http_address"],
             endpoints["metrics_address"])
    return Cluster(spec, router=router, prefills=prefills, decodes=decodes, started_ray=started,
                   shm_segments=shm_segments_of(decodes), autoscaler=autoscaler, **endpoints)
