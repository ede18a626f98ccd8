"""Per-worker Prometheus metrics (names and labels in docs/metrics.md).

Each worker owns one ``WorkerMetrics`` with its own ``CollectorRegistry`` (a process
may host several workers in tests or on Ray-less hosts). The worker records a step with
``observe_step`` and its state with ``set_state``; the router pulls ``text()`` and serves
every worker's series from one endpoint. prometheus-client metrics are thread-safe, so
the step-loop thread records while another thread renders.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Geometric, ratio 1.25, 1 ms .. ~65 s: a percentile interpolated inside one bucket is off by
# at most ~12%, so dashboards agree with client-side measurements (coarser vLLM-style buckets
# can be off by 50% in the 20-40 ms range that matters for TTFT and TPOT).
LATENCY_BUCKETS = tuple(round(0.001 * 1.25 ** i, 6) for i in range(50))
COUNT_BUCKETS = tuple(float(2 ** i) for i in range(15))  # 1 .. 16384
WORKER_LABELS = ("model", "pool", "worker", "node")
TRANSFER_FAILURE_REASONS = ("error", "stale_incarnation", "checksum")


def model_label(model_path: str) -> str:
    """A short, stable model label: the checkpoint directory's name."""
    return model_path.rstrip("/").rsplit("/", 1)[-1] or model_path


def node_label() -> str:
    """The host name: the node label of a worker that is not told its Ray node address
    (Ray-less hosts; the Ray actors pass theirs)."""
    import socket

    return socket.gethostname()


class WorkerMetrics:
    def __init__(self, model: str, pool: str, worker: str, node: str = "local"):
        self.registry = CollectorRegistry()
        self._labels = {"model": model, "pool": pool, "worker": worker, "node": node}
        r = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, WORKER_LABELS, registry=r).labels(**self._labels)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, WORKER_LABELS, registry=r).labels(**self._labels)

        def hist(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, WORKER_LABELS, buckets=buckets,
                             registry=r).labels(**self._labels)

        self.up = gauge("pdserve_worker_up", "1 while the worker answers")
        self.up.set(1)
        self.running = gauge("pdserve_num_requests_running", "Requests in the running batch")
        self.waiting = gauge("pdserve_num_requests_waiting", "Requests queued or preempted")
        self.kv_usage = gauge("pdserve_kv_cache_usage_perc", "Fraction of KV blocks in use")
        self.kv_capacity = gauge("pdserve_kv_cache_capacity_blocks", "KV blocks in the cache")
        self.block_size = gauge("pdserve_kv_cache_block_size_tokens", "Tokens per KV block")
        self.step_batch = hist("pdserve_step_batch_size", "Requests per model step", COUNT_BUCKETS)
        self.step_tokens = hist("pdserve_step_tokens", "Tokens per model step", COUNT_BUCKETS)
        self.step_duration = hist("pdserve_step_duration_seconds", "Wall time of a model step",
                                  LATENCY_BUCKETS)
        self.prefix_queries = counter("pdserve_prefix_cache_queries",
                                      "Prompt tokens looked up in the prefix cache")
        self.prefix_hits = counter("pdserve_prefix_cache_hits", "Prompt tokens found in it")
        self.preemptions = counter("pdserve_num_preemptions", "Requests preempted")
        labels = (*WORKER_LABELS, "backend")
        self._t_bytes = Counter("pdserve_kv_transfer_bytes", "KV bytes sent", labels, registry=r)
        self._t_dur = Histogram("pdserve_kv_transfer_duration_seconds",
                                "Begin to finish of one request's KV transfer", labels,
                                buckets=LATENCY_BUCKETS, registry=r)
        self._t_fail = Counter("pdserve_kv_transfer_failures", "Failed KV transfers by reason "
                               "(error, stale_incarnation, checksum)", (*labels, "reason"),
                               registry=r)
        self._prefix_seen = (0, 0)

    def observe_step(self, batch_size: int, tokens: int, duration_s: float,
                     preempted: int = 0) -> None:
        self.step_batch.observe(batch_size)
        self.step_tokens.observe(tokens)
        self.step_duration.observe(duration_s)
        if preempted:
            self.preemptions.inc(preempted)

    def set_state(self, running: int, waiting: int, kv_usage: float, capacity_blocks: int,
                  block_size: int, prefix_queries: int = 0, prefix_hits: int = 0) -> None:
        """Gauges from the worker's state; prefix totals are cumulative (deltas are counted)."""
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_usage.set(kv_usage)
        self.kv_capacity.set(capacity_blocks)
        self.block_size.set(block_size)
        q0, h0 = self._prefix_seen
        if prefix_queries > q0:
            self.prefix_queries.inc(prefix_queries - q0)
        if prefix_hits > h0:
            self.prefix_hits.inc(prefix_hits - h0)
        self._prefix_seen = (max(q0, prefix_queries), max(h0, prefix_hits))

    def init_backend(self, backend: str) -> None:
        """Create the transfer series at zero, so rates and alerts see 0 rather than nothing."""
        labels = {**self._labels, "backend": backend}
        self._t_bytes.labels(**labels)
        self._t_dur.labels(**labels)
        for reason in TRANSFER_FAILURE_REASONS:
            self._t_fail.labels(**labels, reason=reason)

    def observe_transfer(self, backend: str, nbytes: int, duration_s: float, ok: bool,
                         reason: str = "error") -> None:
        """One request's transfer; a failed one counts under ``reason`` (a
        ``TransferError.reason``: the prefill side sees errors and stale destinations, the
        decode side checksum mismatches)."""
        labels = {**self._labels, "backend": backend}
        if ok:
            self._t_bytes.labels(**labels).inc(nbytes)
            self._t_dur.labels(**labels).observe(duration_s)
        else:
            self._t_fail.labels(**labels, reason=reason).inc()

    @property
    def labels(self) -> dict[str, str]:
        return dict(self._labels)

    def text(self) -> str:
        return generate_latest(self.registry).decode()
