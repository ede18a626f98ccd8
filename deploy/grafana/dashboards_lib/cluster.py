"""The "pdserve / Cluster" dashboard: per-pool and per-worker state of one deployment
(workers, load, model steps, KV cache, KV transfer), one function per dashboard row.

Panels read the workers' raw series (``pdserve_...``, filtered by the model, pool and
worker variables) and the per-pool recorded ones; a row's panels are laid out in the
order listed here.
"""

from __future__ import annotations

from .board import MODEL_VAR, POOL_VAR, WORKER_VAR, dashboard, link
from .panels import MP, MPW, MW, PCT, RI, M, quantiles, row, stat, state_timeline, timeseries


def workers_row() -> list[dict]:
    """Workers up and down, fullest KV cache, transfer failures; up timeline."""
    return [
        row("Workers"),
        stat("Workers up", [(f"sum by (pool) (pdserve_worker_up{{{MP}}})", "{{pool}}")],
             "short", "Workers answering the router, per pool.", [(None, "red"), (1, "green")],
             w=6),
        stat("Workers down", [(f"sum by (pool) (1 - pdserve_worker_up{{{MP}}})", "{{pool}}")],
             "short", "Workers that stopped answering the router (dead or hung).",
             [(None, "green"), (1, "red")], w=6),
        stat("KV cache usage (max)",
             [(f"pdserve:kv_cache_usage_perc:max_by_pool{{{MP}}}", "{{pool}}")], PCT,
             "Fullest worker's KV cache per pool.",
             [(None, "green"), (0.8, "orange"), (0.95, "red")], w=6, decimals=0),
        stat("KV transfer failures (1h)",
             [(f"sum by (backend, reason) "
               f"(increase(pdserve_kv_transfer_failures_total{{{M}}}[1h]))",
               "{{backend}} {{reason}}")], "short",
             "KV transfers that failed over the last hour, by reason: error (the link or "
             "peer failed), stale_incarnation (reserved on a decode worker that restarted), "
             "checksum (decode read other bytes than prefill wrote). Each is retried.",
             [(None, "green"), (1, "red")], w=6, decimals=0),
        state_timeline("Worker up", [(f"pdserve_worker_up{{{MPW}}}", "{{worker}}")],
                       "1 while the worker answers the router's metrics pull."),
    ]


def load_row() -> list[dict]:
    """Running and waiting requests per pool and worker, queue time, preemptions."""
    return [
        row("Load"),
        timeseries("Running requests by pool", [
            (f"pdserve:num_requests_running:sum_by_pool{{{MP}}}", "{{pool}}")],
            "short", "Requests in the workers' running batches."),
        timeseries("Waiting requests by pool", [
            (f"pdserve:num_requests_waiting:sum_by_pool{{{MP}}}", "{{pool}}")],
            "short", "Prefill: prompts not yet run. Decode: reserved, waiting for their KV; "
            "or preempted."),
        timeseries("Running requests per worker", [
            (f"pdserve_num_requests_running{{{MPW}}}", "{{worker}}")], "short",
            "Running batch size of each worker."),
        timeseries("Waiting requests per worker", [
            (f"pdserve_num_requests_waiting{{{MPW}}}", "{{worker}}")], "short",
            "Queue length of each worker."),
        timeseries("Queue time by pool",
                   quantiles("pdserve_request_queue_time_seconds", "pool", MP,
                             legend="{{pool}}"),
                   "s", "Time in the prefill worker's queue (prefill), or from decode start "
                   "to the first decode token (decode)."),
        timeseries("Preemptions", [
            (f"sum by (worker) (rate(pdserve_num_preemptions_total{{{MPW}}}[{RI}]))",
             "{{worker}}")], "ops", "Requests preempted per second (their KV is recomputed "
            "later): the KV cache is too small for the batch."),
    ]


def steps_row() -> list[dict]:
    """Batch size, tokens per step, step duration, steps and tokens per second."""
    return [
        row("Model steps"),
        timeseries("Batch size (requests per step)", [
            *quantiles("pdserve_step_batch_size", "pool", MPW, (0.5, 0.9), "{{pool}}"),
            (f"sum by (pool) (rate(pdserve_step_batch_size_sum{{{MPW}}}[{RI}])) / "
             f"sum by (pool) (rate(pdserve_step_batch_size_count{{{MPW}}}[{RI}]))",
             "mean {{pool}}"),
        ], "short", "Requests per model step.", w=8),
        timeseries("Tokens per step", [
            *quantiles("pdserve_step_tokens", "pool", MPW, (0.5, 0.9), "{{pool}}"),
            (f"sum by (pool) (rate(pdserve_step_tokens_sum{{{MPW}}}[{RI}])) / "
             f"sum by (pool) (rate(pdserve_step_tokens_count{{{MPW}}}[{RI}]))",
             "mean {{pool}}"),
        ], "short", "Tokens per model step (prefill: prompt tokens in the batch).", w=8),
        timeseries("Step duration",
                   quantiles("pdserve_step_duration_seconds", "pool", MPW, legend="{{pool}}"),
                   "s", "Wall time of one model step.", w=8),
        timeseries("Steps per second", [
            (f"sum by (worker) (rate(pdserve_step_duration_seconds_count{{{MPW}}}[{RI}]))",
             "{{worker}}")], "short", "Model steps per second of each worker."),
        timeseries("Tokens per second by pool", [
            (f"sum by (pool) (rate(pdserve_step_tokens_sum{{{MPW}}}[{RI}]))", "{{pool}}")],
            "short", "Tokens processed per second: prompt tokens (prefill), generated "
            "tokens (decode)."),
    ]


def kv_cache_row() -> list[dict]:
    """KV usage per worker and pool, capacity, prefix-cache hit rate."""
    return [
        row("KV cache"),
        timeseries("KV cache usage per worker", [
            (f"pdserve_kv_cache_usage_perc{{{MPW}}}", "{{worker}}")], PCT,
            "Fraction of each worker's KV blocks in use.", max_=1),
        timeseries("KV cache usage by pool", [
            (f"pdserve:kv_cache_usage_perc:avg_by_pool{{{MP}}}", "{{pool}} avg"),
            (f"pdserve:kv_cache_usage_perc:max_by_pool{{{MP}}}", "{{pool}} max"),
        ], PCT, "Average and fullest worker per pool; PdserveKVCacheExhausted fires when the "
            "decode average stays over 95%.", max_=1),
        timeseries("KV cache capacity per worker", [
            (f"pdserve_kv_cache_capacity_blocks{{{MPW}}} * "
             f"pdserve_kv_cache_block_size_tokens{{{MPW}}}", "{{worker}}")], "short",
            "Tokens each worker's KV cache holds (blocks x block size)."),
        timeseries("Prefix cache hit rate", [
            (f"sum by (pool) (rate(pdserve_prefix_cache_hits_total{{{MPW}}}[{RI}])) / "
             f"sum by (pool) (rate(pdserve_prefix_cache_queries_total{{{MPW}}}[{RI}]))",
             "{{pool}}")], PCT, "Share of looked-up prompt tokens found in the prefix "
            "cache.", max_=1),
    ]


def kv_transfer_row() -> list[dict]:
    """KV transfer bandwidth, latency and failures by backend."""
    return [
        row("KV transfer"),
        timeseries("Transfer bandwidth by backend", [
            (f"sum by (backend) (rate(pdserve_kv_transfer_bytes_total{{{MW}}}[{RI}]))",
             "{{backend}}")], "Bps", "KV bytes per second sent by prefill workers.", w=8),
        timeseries("Transfer latency by backend",
                   quantiles("pdserve_kv_transfer_duration_seconds", "backend", MW,
                             legend="{{backend}}"),
                   "s", "Begin to finish of one request's KV transfer.", w=8),
        timeseries("Transfer failures by backend and reason", [
            (f"sum by (backend, reason) "
             f"(rate(pdserve_kv_transfer_failures_total{{{MW}}}[{RI}]))",
             "{{backend}} {{reason}}")], "ops", "Failed KV transfers per second, by reason "
            "(error, stale_incarnation, checksum); the router retries each request, and "
            "answers UNAVAILABLE only once its retries are spent.", w=8),
    ]


def autoscaler_row() -> list[dict]:
    """Pool sizes (in service, leaving, asked for) and the autoscaler's decisions."""
    return [
        row("Pool sizes (autoscaler)"),
        timeseries("Workers per pool", [
            (f"sum by (pool, state) (pdserve_router_pool_workers{{{M}}})", "{{pool}} {{state}}"),
            (f"sum by (pool) (pdserve_autoscaler_target_workers{{{M}}})", "{{pool}} target"),
        ], "short", "Workers in service (active) and draining (taking no new request, leaving "
            "once they hold nothing) in each pool, and the size the autoscaler last asked "
            "for (docs/placement.md, SLO autoscaling); a target above active is workers "
            "still loading.", w=12),
        timeseries("Autoscaler decisions", [
            (f"sum by (pool, direction, reason) "
             f"(increase(pdserve_autoscaler_decisions_total{{{M}}}[{RI}]))",
             "{{pool}} {{direction}}: {{reason}}"),
        ], "short", "Pool resizes by reason: rate_up / rate_down (the arrival rate against "
            "the profile's per-instance capacity), ttft_miss / tpot_miss (attainment under "
            "target), prefill_queue / kv_load (leading signals), bounds.", w=12),
    ]


def cluster_dashboard() -> dict:
    return dashboard(
        "pdserve-cluster", "pdserve / Cluster",
        "Per-pool and per-worker state of a pdserve deployment: load, queues, model steps, "
        "KV cache, KV transfer, worker health.",
        [MODEL_VAR, POOL_VAR, WORKER_VAR],
        [*workers_row(), *autoscaler_row(), *load_row(), *steps_row(), *kv_cache_row(),
         *kv_transfer_row()],
        [link("pdserve / SLO", "pdserve-slo")])
