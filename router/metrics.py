"""Request-level Prometheus metrics recorded by the router (names in docs/metrics.md).

The router sees every request from arrival to its last token, so TTFT, inter-token
latency, TPOT, end-to-end latency, SLO outcome and the gRPC status are recorded here,
once per request, when its stream ends (``RequestTimeline.finish``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from pdserve.engine.metrics import COUNT_BUCKETS, LATENCY_BUCKETS
from pdserve.router.load_window import LoadWindow
from pdserve.router.prefill_placement import OUTCOMES as PREFILL_OUTCOMES
from pdserve.router.slo import SloConfig, tpot

# The SLO autoscaler's decision reasons (cluster/autoscale/decide.py), most urgent first:
# the label values of pdserve_autoscaler_decisions_total, created at zero with the router.
AUTOSCALER_REASONS = ("bounds", "ttft_miss", "tpot_miss", "prefill_queue", "kv_load",
                      "rate_up", "rate_down")


class RouterMetrics:
    def __init__(self, model: str, slo: SloConfig, registry: CollectorRegistry | None = None):
        self.registry = r = registry or CollectorRegistry()
        self.model = model
        self.window = LoadWindow()  # what the autoscaler reads (router/load_window.py)
        self.slo = slo
        m, ms = ("model",), ("model", "slo_class")
        self.ttft = Histogram("pdserve_time_to_first_token_seconds", "Time to first token", ms,
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("pdserve_inter_token_latency_seconds", "Time between streamed tokens",
                             m, buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("pdserve_time_per_output_token_seconds", "Per-request TPOT", ms,
                              buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("pdserve_e2e_request_latency_seconds", "Arrival to last token", m,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("pdserve_request_queue_time_seconds", "Queue time per pool",
                               ("model", "pool"), buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Histogram("pdserve_request_prompt_tokens", "Prompt length", m,
                                       buckets=COUNT_BUCKETS, registry=r)
        self.gen_tokens = Histogram("pdserve_request_generation_tokens", "Generated tokens", m,
                                    buckets=COUNT_BUCKETS, registry=r)
        self.requests = Counter("pdserve_requests", "Finished requests by gRPC status",
                                ("model", "code"), registry=r)
        self.slo_met = Counter("pdserve_slo_met", "Requests meeting both SLOs", ms, registry=r)
        self.slo_missed = Counter("pdserve_slo_missed", "Requests missing an SLO",
                                  ("model", "slo_class", "reason"), registry=r)
        self.rejected = Counter("pdserve_admission_rejected", "Rejected at admission",
                                ("model", "reason"), registry=r)
        self.retries = Counter("pdserve_request_retries", "Attempts beyond a request's first, "
                               "by what failed", ("model", "cause"), registry=r)
        self.prefill_decisions = Counter(
            "pdserve_router_prefill_decisions", "Where attempts' prompts were prefilled "
            "(conditional disaggregation): local (decode worker) or remote (prefill pool), "
            "by the rule's reason", ("model", "decision", "reason"), registry=r)
        self.in_flight = Gauge("pdserve_router_requests_in_flight", "Requests being streamed", m,
                               registry=r).labels(model)
        # Pool membership (router/membership.py) and the autoscaler's decisions, which it
        # reports here so that one scrape target shows them beside the SLOs they serve.
        self.pool_workers = Gauge("pdserve_router_pool_workers", "Workers in each pool, in "
                                  "service (active) or leaving (draining)",
                                  ("model", "pool", "state"), registry=r)
        self.scaling = Counter("pdserve_autoscaler_decisions", "Pool resizes the autoscaler "
                               "made, by pool, direction and reason",
                               ("model", "pool", "direction", "reason"), registry=r)
        self.scaling_target = Gauge("pdserve_autoscaler_target_workers", "Workers the "
                                    "autoscaler last asked each pool for", ("model", "pool"),
                                    registry=r)
        self._targets_set: set[str] = set()  # pools the autoscaler has decided for
        for name, value in (("pdserve_slo_ttft_target_seconds", slo.ttft_s),
                            ("pdserve_slo_tpot_target_seconds", slo.tpot_s),
                            ("pdserve_slo_attainment_target", slo.attainment)):
            Gauge(name, "Deployment SLO target", m, registry=r).labels(model).set(value)
        # Children exist from the start so dashboards and rules see zeros, not "no data".
        for cls in ("default", "custom"):
            self.slo_met.labels(model, cls)
            for reason in ("ttft", "tpot", "error", "rejected"):
                self.slo_missed.labels(model, cls, reason)
        self.requests.labels(model, "OK")
        for reason in ("ttft_slo", "kv_full", "queue_full"):
            self.rejected.labels(model, reason)
        for cause in ("prefill_failed", "decode_failed", "transfer_failed"):
            self.retries.labels(model, cause)
        for decision, reason in PREFILL_OUTCOMES:
            self.prefill_decisions.labels(model, decision, reason)
        for pool in ("prefill", "decode"):
            for reason in AUTOSCALER_REASONS:
                direction = "down" if reason == "rate_down" else "up"
                self.scaling.labels(model, pool, direction, reason)
            self.scaling.labels(model, pool, "down", "bounds")

    def set_pool_sizes(self, sizes: dict[str, dict[str, int]]) -> None:
        """Workers per pool and state; a pool no autoscaler has resized yet is asked for
        the size it has (its target gauge starts there)."""
        for pool, states in sizes.items():
            for state, n in states.items():
                self.pool_workers.labels(self.model, pool, state).set(n)
            if pool not in self._targets_set:
                self.scaling_target.labels(self.model, pool).set(states.get("active", 0))

    def record_scaling(self, pool: str, before: int, after: int, reason: str) -> None:
        """One pool's resize (``after`` workers asked for, ``before`` in service)."""
        self._targets_set.add(pool)
        self.scaling_target.labels(self.model, pool).set(after)
        if after != before:
            self.scaling.labels(self.model, pool, "up" if after > before else "down",
                                reason).inc()

    def timeline(self, slo: SloConfig, custom: bool) -> RequestTimeline:
        self.in_flight.inc()
        self.window.arrived()
        return RequestTimeline(self, slo, "custom" if custom else "default")


@dataclass
class RequestTimeline:
    metrics: RouterMetrics
    slo: SloConfig
    slo_class: str
    start: float = field(default_factory=time.monotonic)
    first: float | None = None
    last: float | None = None
    tokens: int = 0
    prompt_tokens: int = 0
    done: bool = False

    def tokens_sent(self, n: int) -> None:
        now = time.monotonic()
        if n <= 0:
            return
        if self.first is None:
            self.first = now
        elif self.last is not None:
            self.metrics.itl.labels(self.metrics.model).observe((now - self.last) / n)
        self.last = now
        self.tokens += n

    def queue_time(self, pool: str, seconds: float) -> None:
        self.metrics.queue.labels(self.metrics.model, pool).observe(max(0.0, seconds))

    def finish(self, code: str, rejected_reason: str | None = None) -> None:
        """Record the outcome once (``code`` is the gRPC status name)."""
        if self.done:
            return
        self.done = True
        m, model = self.metrics, self.metrics.model
        m.in_flight.dec()
        m.requests.labels(model, code).inc()
        if rejected_reason is not None:
            m.rejected.labels(model, rejected_reason).inc()
            m.slo_missed.labels(model, self.slo_class, "rejected").inc()
            m.window.finished(self.prompt_tokens, 0, False, True, False)
            return
        if code != "OK" or self.first is None:
            m.slo_missed.labels(model, self.slo_class, "error").inc()
            m.window.finished(self.prompt_tokens, self.tokens, False, False, False)
            return
        ttft = self.first - self.start
        per_token = tpot(self.first, self.last, self.tokens)
        m.window.finished(self.prompt_tokens, self.tokens, ttft <= self.slo.ttft_s,
                          per_token is None or per_token <= self.slo.tpot_s, True)
        m.ttft.labels(model, self.slo_class).observe(ttft)
        if per_token is not None:
            m.tpot.labels(model, self.slo_class).observe(per_token)
        m.e2e.labels(model).observe(self.last - self.start)
        m.prompt_tokens.labels(model).observe(self.prompt_tokens)
        m.gen_tokens.labels(model).observe(self.tokens)
        if ttft > self.slo.ttft_s:
            m.slo_missed.labels(model, self.slo_class, "ttft").inc()
        elif per_token is not None and per_token > self.slo.tpot_s:
            m.slo_missed.labels(model, self.slo_class, "tpot").inc()
        else:
            m.slo_met.labels(model, self.slo_class).inc()
