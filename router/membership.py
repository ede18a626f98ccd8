"""Workers joining and leaving a running router's pools (what the autoscaler drives).

``Membership`` wraps the orchestrator's ``attach`` / ``drain`` with what else must follow a
worker: the client the router talks to it through (built as ``build_router`` builds the
first ones), the metrics aggregator that pulls its metrics text, and the pool-size gauges.
It takes worker handles, never creates or kills workers: who made a worker stops it after
``drain`` returns (``cluster/autoscale/actor.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pdserve.router.clients import DecodeClient, PrefillClient
from pdserve.router.metrics import RouterMetrics
from pdserve.router.metrics_server import MetricsAggregator
from pdserve.router.orchestrator import Orchestrator

log = logging.getLogger(__name__)

# Long enough for the longest request a pool serves to finish (minutes of generation at
# most); a drain that needs more keeps the worker rather than cutting requests off.
DEFAULT_DRAIN_TIMEOUT_S = 600.0


class Membership:
    def __init__(self, orchestrator: Orchestrator, make_prefill: Callable[[str, Any], PrefillClient],
                 aggregator: MetricsAggregator | None = None,
                 metrics: RouterMetrics | None = None):
        self.orch = orchestrator
        self.make_prefill = make_prefill
        self.aggregator = aggregator
        self.metrics = metrics
        self._publish()

    async def add(self, role: str, worker_id: str, handle: Any) -> None:
        """Put a ready worker (its model loaded) into the ``role`` pool."""
        client = (self.make_prefill(worker_id, handle) if role == "prefill"
                  else DecodeClient(worker_id, handle))
        self.orch.attach(client, role)
        if self.aggregator is not None:
            self.aggregator.sources[worker_id] = client.metrics_text
        log.info("worker %s joined the %s pool", worker_id, role)
        self._publish()

    async def drain(self, worker_id: str, timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S) -> None:
        """Stop sending ``worker_id`` requests and return once it has left its pool holding
        nothing (``Orchestrator.begin_drain`` / ``finish_drain``; ``DrainTimeout`` leaves it
        in service)."""
        self.orch.begin_drain(worker_id)
        self._publish()
        try:
            await self.orch.finish_drain(worker_id, timeout_s)
        finally:
            self._publish()
        if self.aggregator is not None:
            self.aggregator.forget(worker_id)
        log.info("worker %s drained and left its pool", worker_id)

    def sizes(self) -> dict[str, dict[str, int]]:
        return self.orch.pool_sizes()

    def _publish(self) -> None:
        if self.metrics is not None:
            self.metrics.set_pool_sizes(self.orch.pool_sizes())
