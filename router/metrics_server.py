"""One Prometheus endpoint for the whole cluster, served by the router.

Lifecycle: ``MetricsAggregator`` is registered in the router's ``CollectorRegistry``
next to the router's own metrics; ``refresh()`` (called periodically by the router's
event loop) pulls each worker's exposition text over the same channel the router
already uses for that worker (a Ray actor call or an in-process call) and keeps the
latest copy; ``collect()`` merges those texts with the router's metrics, one family per
metric name, when Prometheus scrapes. A worker that cannot be reached is reported as
``pdserve_worker_up 0`` with the labels it last had, and its stale series are dropped.
``start_http_server`` exposes the registry on ``host:port``/metrics.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)

Fetch = Callable[[], Awaitable[str]]


class MetricsAggregator:
    def __init__(self, sources: dict[str, Fetch], timeout_s: float = 2.0):
        self.sources = sources
        self.timeout_s = timeout_s
        self._texts: dict[str, str] = {}
        self._labels: dict[str, dict[str, str]] = {}
        self._down: set[str] = set()

    def forget(self, worker: str) -> None:
        """A worker that left its pool: no longer pulled, nor reported down."""
        self.sources.pop(worker, None)
        self._texts.pop(worker, None)
        self._labels.pop(worker, None)
        self._down.discard(worker)

    async def refresh(self) -> None:
        async def one(worker: str, fetch: Fetch) -> None:
            try:
                text = await asyncio.wait_for(fetch(), self.timeout_s)
            except Exception:  # dead, hung or restarting: report it down
                self._texts.pop(worker, None)
                self._down.add(worker)
                return
            if worker not in self.sources:  # left its pool while being pulled
                return
            self._texts[worker] = text
            self._down.discard(worker)
            if worker not in self._labels:
                self._labels[worker] = _worker_labels(text)

        await asyncio.gather(*(one(w, f) for w, f in self.sources.items()))

    def collect(self):
        merged: dict[str, Metric] = {}
        for text in list(self._texts.values()):
            for fam in text_string_to_metric_families(text):
                have = merged.get(fam.name)
                if have is None:
                    merged[fam.name] = fam
                else:
                    have.samples.extend(fam.samples)
        if self._down:
            names = ["model", "pool", "worker", "node"]
            up = GaugeMetricFamily("pdserve_worker_up", "1 while the worker answers", labels=names)
            for worker in sorted(self._down):
                labels = self._labels.get(worker) or {"worker": worker}
                up.add_metric([labels.get(n, "") for n in names], 0.0)
            have = merged.get("pdserve_worker_up")
            if have is None:
                merged["pdserve_worker_up"] = up
            else:
                have.samples.extend(up.samples)
        yield from merged.values()


def _worker_labels(text: str) -> dict[str, str]:
    for fam in text_string_to_metric_families(text):
        if fam.name == "pdserve_worker_up" and fam.samples:
            return dict(fam.samples[0].labels)
    return {}


def serve_metrics(registry: CollectorRegistry, host: str, port: int):
    """Start the /metrics HTTP server in a background thread; returns (server, thread)."""
    return start_http_server(port, addr=host, registry=registry)
