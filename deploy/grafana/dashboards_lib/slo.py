"""The "pdserve / SLO" dashboard: TTFT and TPOT against the SLO, attainment, error budget
and goodput of one deployment, one function per dashboard row.

Queries read mostly the recorded series of deploy/prometheus/rules/pdserve-recording.yml
(``pdserve:...``), which tests/unit/test_deploy_grafana.py checks exist; a row's panels
are laid out in the order listed here.
"""

from __future__ import annotations

from .board import MODEL_VAR, POOL_VAR, dashboard, link
from .panels import MP, PCT, RI, M, recorded, row, stat, timeseries

GOOD_HIGH = [(None, "red"), (0.85, "orange"), (0.9, "green")]
TARGET_ATT = f"max by (model) (pdserve_slo_attainment_target{{{M}}})"


def overview_row() -> list[dict]:
    """Attainment, its target, error budget left, burn rate, goodput (stats)."""
    return [
        row("SLO overview"),
        stat("Attainment (1h)", [(f"pdserve:slo_attainment:ratio_rate1h{{{M}}}", "{{model}}")],
             PCT, "Share of finished requests (rejected ones included) that met both the TTFT "
             "and the TPOT target over the last hour.", GOOD_HIGH, decimals=1),
        stat("Attainment target", [(TARGET_ATT, "{{model}}")], PCT,
             "The attainment target pdserve serve was started with (--attainment).",
             [(None, "blue")], decimals=1),
        stat("Error budget left (1d)",
             [(f"1 - pdserve:slo_error_ratio:rate1d{{{M}}} / on (model) "
               f"pdserve:slo_error_budget:ratio{{{M}}}", "{{model}}")],
             PCT, "Share of the error budget (1 - target) not spent over the last day. "
             "Negative: the SLO was missed over that window.",
             [(None, "red"), (0, "orange"), (0.5, "green")], decimals=0),
        stat("Error budget left (30d)",
             [(f"1 - pdserve:slo_error_ratio:rate30d{{{M}}} / on (model) "
               f"pdserve:slo_error_budget:ratio{{{M}}}", "{{model}}")],
             PCT, "Share of the error budget not spent over the last 30 days (the budget "
             "period the burn-rate alerts are sized for).",
             [(None, "red"), (0, "orange"), (0.5, "green")], decimals=0),
        stat("Burn rate (1h)", [(f"pdserve:slo_burn_rate:rate1h{{{M}}}", "{{model}}")], "none",
             "Error ratio over the last hour divided by the error budget; 1 spends the budget "
             "exactly as fast as the target allows.",
             [(None, "green"), (1, "orange"), (6, "red")], decimals=2),
        stat("Goodput (5m)", [(f"pdserve:goodput:rate5m{{{M}}}", "{{model}}")], "reqps",
             "Requests per second that finished OK within both SLO targets.",
             [(None, "blue")], decimals=2),
    ]


def attainment_row() -> list[dict]:
    """Attainment vs target, burn rates vs the page thresholds, by class, misses."""
    return [
        row("Attainment and error budget"),
        timeseries("SLO attainment vs target", [
            (f"pdserve:slo_attainment:ratio_rate5m{{{M}}}", "{{model}} 5m"),
            (f"pdserve:slo_attainment:ratio_rate1h{{{M}}}", "{{model}} 1h"),
            (TARGET_ATT, "{{model}} target"),
        ], PCT, "Attainment over 5 minutes and 1 hour against the target (dashed).",
            max_=1, dashed=".*target"),
        timeseries("Error budget burn rate", [
            (f"pdserve:slo_burn_rate:rate5m{{{M}}}", "{{model}} 5m"),
            (f"pdserve:slo_burn_rate:rate1h{{{M}}}", "{{model}} 1h"),
            (f"pdserve:slo_burn_rate:rate6h{{{M}}}", "{{model}} 6h"),
            (f"pdserve:slo_burn_rate_threshold:page_1h{{{M}}}", "{{model}} page threshold 1h"),
            (f"pdserve:slo_burn_rate_threshold:page_6h{{{M}}}", "{{model}} page threshold 6h"),
        ], "none", "Burn rates of the multi-window alerts with their page thresholds "
            "(dashed): the fast page needs the 1h and the 5m rate above the 1h threshold, "
            "the slow page the 6h and the 30m rate above the 6h threshold.",
            dashed=".*threshold.*"),
        timeseries("SLO attainment by class (5m)", [
            (f"pdserve:slo_attainment_by_class:ratio_rate5m{{{M}}}", "{{model}} {{slo_class}}"),
        ], PCT, "Requests with the deployment's targets (default) and with per-request "
            "targets (custom).", max_=1),
        timeseries("SLO misses by reason", [
            (f"pdserve:slo_missed_by_reason:rate5m{{{M}}}", "{{model}} {{reason}}"),
        ], "reqps", "Requests per second that missed: ttft, tpot, error (not OK), rejected "
            "(RESOURCE_EXHAUSTED at admission).", stack=True),
    ]


def latency_row() -> list[dict]:
    """TTFT and TPOT percentiles vs their targets; ITL, end-to-end, queue time."""
    return [
        row("Latency vs SLO"),
        timeseries("Time to first token vs SLO", [
            *recorded("time_to_first_token_seconds", M, "1m", "{{model}} {{slo_class}}"),
            (f"max by (model) (pdserve_slo_ttft_target_seconds{{{M}}})", "{{model}} SLO"),
        ], "s", "TTFT percentiles (1m) from arrival at the router to the first token sent, "
            "and the TTFT target (dashed).", dashed=".*SLO"),
        timeseries("Time per output token vs SLO", [
            *recorded("time_per_output_token_seconds", M, "1m", "{{model}} {{slo_class}}"),
            (f"max by (model) (pdserve_slo_tpot_target_seconds{{{M}}})", "{{model}} SLO"),
        ], "s", "Per-request TPOT percentiles (1m): (last token - first token) / "
            "(tokens - 1); the TPOT target dashed.", dashed=".*SLO"),
        timeseries("Inter-token latency", recorded("inter_token_latency_seconds", M, "5m",
                                                   "{{model}}"),
                   "s", "Time between consecutive streamed tokens (5m).", w=8),
        timeseries("End-to-end latency", recorded("e2e_request_latency_seconds", M, "5m",
                                                  "{{model}}"),
                   "s", "Arrival to the last token (5m).", w=8),
        timeseries("Queue time by pool", [
            (f"pdserve:request_queue_time_seconds:p50_5m{{{MP}}}", "p50 {{pool}}"),
            (f"pdserve:request_queue_time_seconds:p90_5m{{{MP}}}", "p90 {{pool}}"),
        ], "s", "Prefill: waiting in the prefill worker's queue (the part of TTFT that "
            "more prefill workers remove). Decode: decode start to the first decode token.",
            w=8),
    ]


def traffic_row() -> list[dict]:
    """Goodput, admissions, status codes, in flight, retries, prefill placement, request
    lengths."""
    return [
        row("Traffic"),
        timeseries("Goodput vs throughput", [
            (f"pdserve:goodput:rate1m{{{M}}}", "{{model}} goodput"),
            (f"pdserve:requests:rate1m{{{M}}}", "{{model}} finished"),
        ], "reqps", "Finished requests per second, and those of them that met the SLO.", w=8),
        timeseries("Admitted vs rejected", [
            (f"pdserve:requests_admitted:rate5m{{{M}}}", "{{model}} admitted"),
            (f"pdserve:admission_rejected:rate5m{{{M}}}", "{{model}} rejected: {{reason}}"),
        ], "reqps", "Requests admitted, and answered RESOURCE_EXHAUSTED at admission by "
            "reason (ttft_slo: the TTFT target cannot be met; kv_full; queue_full: the router's bounded queues).", w=8, stack=True),
        timeseries("Requests by gRPC status", [
            (f"sum by (code) (rate(pdserve_requests_total{{{M}}}[{RI}]))", "{{code}}"),
        ], "reqps", "Finished requests per second by gRPC status code.", w=8, stack=True),
        timeseries("Requests in flight", [
            (f"sum by (model) (pdserve_router_requests_in_flight{{{M}}})", "{{model}}"),
        ], "short", "Requests the router is streaming right now."),
        timeseries("Retries after failures", [
            (f"sum by (cause) (rate(pdserve_request_retries_total{{{M}}}[{RI}]))", "{{cause}}"),
        ], "reqps", "Attempts beyond a request's first: a prefill or decode worker died or "
            "missed its heartbeats, or a KV transfer broke. Resumed requests lose no token.",
            stack=True),
        timeseries("Where prompts are prefilled", [
            (f"sum by (decision, reason) "
             f"(rate(pdserve_router_prefill_decisions_total{{{M}}}[{RI}]))",
             "{{decision}}: {{reason}}"),
        ], "reqps", "Conditional disaggregation, per attempt: local = prefilled on its decode "
            "worker (short: few tokens to compute; queue: the prefill pool's predicted wait "
            "exceeds the local cost), remote = on the prefill pool (decode_full: the rule "
            "said local and no decode worker took it; off: the rule is off).", stack=True),
        timeseries("Prompt and generated tokens", [
            (f"histogram_quantile(0.5, sum by (le) "
             f"(rate(pdserve_request_prompt_tokens_bucket{{{M}}}[{RI}])))", "prompt p50"),
            (f"histogram_quantile(0.9, sum by (le) "
             f"(rate(pdserve_request_prompt_tokens_bucket{{{M}}}[{RI}])))", "prompt p90"),
            (f"histogram_quantile(0.5, sum by (le) "
             f"(rate(pdserve_request_generation_tokens_bucket{{{M}}}[{RI}])))", "generated p50"),
            (f"histogram_quantile(0.9, sum by (le) "
             f"(rate(pdserve_request_generation_tokens_bucket{{{M}}}[{RI}])))", "generated p90"),
        ], "short", "Request length distribution (power-of-two buckets)."),
    ]


def slo_dashboard() -> dict:
    return dashboard(
        "pdserve-slo", "pdserve / SLO",
        "TTFT/TPOT against the SLO, attainment, error budget and goodput of a pdserve "
        "deployment (recording rules: deploy/prometheus/rules/pdserve-recording.yml).",
        [MODEL_VAR, POOL_VAR],
        [*overview_row(), *attainment_row(), *latency_row(), *traffic_row()],
        [link("pdserve / Cluster", "pdserve-cluster")])
