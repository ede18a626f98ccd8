"""The SLO autoscaler on a running cluster: a Ray actor beside the router.

Every ``interval_s`` it asks the router for the last window's load (``load_report``),
turns it into an ``Observation`` (``observe.py``), asks ``Autoscaler.decide`` and, on a
decision, tells the router (the ``pdserve_autoscaler_*`` metrics, next to the SLOs they
serve) and resizes the pools in the background (``ray_pools.py``: add, or drain then
remove). Every decision is logged with its reason and detail; ``history`` returns one
row per evaluation (pool sizes, rate, attainment, queue, decision), which the
benchmarks plot. ``stop`` ends the loop and returns every worker the pools hold, so that
whoever shuts the cluster down stops the ones the autoscaler added too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import ray

from pdserve.cluster.autoscale.capacity import CapacityModel, ProfileCapacity
from pdserve.cluster.autoscale.config import AutoscaleConfig
from pdserve.cluster.autoscale.decide import Autoscaler
from pdserve.cluster.autoscale.observe import Observer
from pdserve.cluster.autoscale.ray_pools import POOLS, RayPools
from pdserve.cluster.launch.launcher import ClusterSpec

log = logging.getLogger(__name__)


@ray.remote(num_cpus=0, max_concurrency=64)
class AutoscalerActor:
    def __init__(self, config: AutoscaleConfig, spec: ClusterSpec, router: Any,
                 prefills: list[tuple[str, Any]], decodes: list[tuple[str, Any]],
                 threads: int, window_s: float | None = None,
                 capacity: CapacityModel | None = None):
        """``window_s``: the load window observed (default ``interval_s``); ``capacity``:
        per-instance rates (default from the profile, ``ProfileCapacity``)."""
        logging.basicConfig(level=logging.INFO)
        self.config = config
        self.window_s = window_s or config.interval_s
        self.autoscaler = Autoscaler(config, capacity or ProfileCapacity.from_config(config))
        self.pools = RayPools(spec, router, prefills, decodes, threads)
        self.router = router
        self.observer = Observer()
        self.rows: list[dict] = []
        self.t0 = time.monotonic()
        self._loop: asyncio.Task | None = None
        self._resizes: set[asyncio.Task] = set()

    async def start(self) -> None:
        if self._loop is None:
            self._loop = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.config.interval_s)
            try:
                await self.step()
            except Exception:
                log.exception("autoscaler step failed; trying again next interval")

    async def step(self) -> dict:
        """One evaluation (the loop's body; callable directly)."""
        report = await self.router.load_report.remote(self.window_s)
        now = time.monotonic()
        obs = self.observer.observe(report, now, self.pools.count("prefill"),
                                    self.pools.count("decode"))
        decision = self.autoscaler.decide(obs)
        row = {"t": now - self.t0, "t_monotonic": now, "prefill": obs.prefill, "decode": obs.decode,
               "in_service": report["pools"], "arrival_rate": obs.arrival_rate,
               "ttft_attainment": obs.ttft_attainment, "tpot_attainment": obs.tpot_attainment,
               "prefill_queue_tokens": obs.prefill_queue, "decode_kv_usage": obs.decode_load,
               "finished": report["finished"], "errors": report["errors"],
               "decision": None}
        if decision is not None:
            log.info("autoscaler: %s: %s", decision.reason, decision.detail)
            row["decision"] = {"prefill": decision.prefill, "decode": decision.decode,
                               "reason": decision.reason, "detail": decision.detail}
            for pool, target in zip(POOLS, (decision.prefill, decision.decode), strict=True):
                before = self.pools.count(pool)
                await self.router.record_scaling.remote(pool, before, target, decision.reason)
                if target != before:
                    task = asyncio.create_task(self.pools.resize(pool, target))
                    self._resizes.add(task)
                    task.add_done_callback(self._resizes.discard)
        self.rows.append(row)
        return row

    async def history(self) -> dict:
        """Every evaluation (``rows``) and every worker event (``events``), times in
        seconds since the actor started."""
        return {"rows": list(self.rows),
                "events": [{**e, "t": e["t"] - self.t0} for e in self.pools.events]}

    async def settle(self, timeout_s: float = 600.0) -> None:
        """Wait for the resizes under way (workers starting or draining)."""
        if self._resizes:
            await asyncio.wait(set(self._resizes), timeout=timeout_s)

    async def stop(self) -> dict[str, list[tuple[str, Any]]]:
        """End the loop, cancel resizes under way (a drain cancelled leaves its worker in
        service) and return every worker of both pools."""
        tasks = [t for t in (self._loop, *self._resizes) if t is not None]
        for t in tasks:
            t.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*tasks, return_exceptions=True)
        return self.pools.workers()
