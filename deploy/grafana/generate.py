"""Generate pdserve's Grafana dashboards, and list every PromQL query they run.

The dashboards in ``deploy/grafana/dashboards/*.json`` are this script's output, committed
so Grafana can provision them without running Python; a unit test checks they match.

    python deploy/grafana/generate.py           # rewrite the JSON files
    python deploy/grafana/generate.py --check   # exit 1 if a committed file is stale

Helpers for tests (load this file by path; it is not part of the ``pdserve`` package):

    import importlib.util
    spec = importlib.util.spec_from_file_location("pdserve_grafana", "deploy/grafana/generate.py")
    gen = importlib.util.module_from_spec(spec); spec.loader.exec_module(gen)

- ``all_queries(values=None)`` -> ``[(dashboard_uid, panel_title, expr), ...]`` for every
  target of every panel of the committed dashboards, ready to send to Prometheus. Template
  variables are substituted: ``$model``/``${model}``/``[[model]]`` (and ``pool``,
  ``worker``) by ``values[name]`` if given, else by ``.*``, the variables' "All" value.
  Every variable is used as a regex matcher (``label=~"$var"``), so ``.*`` matches every
  series and a plain value matches that one. Grafana's interval variables become fixed
  durations: ``$__rate_interval`` -> ``1m``, ``$__interval`` -> ``15s``,
  ``$__range`` -> ``1h``.
- ``recording_rule_names()`` -> the ``record:`` names in ``deploy/prometheus/rules/*.yml``.
- ``dashboards()`` -> ``{file name: dashboard dict}`` as generated.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DASHBOARDS_DIR = HERE / "dashboards"
RULES_DIR = HERE.parent / "prometheus" / "rules"

DS = {"type": "prometheus", "uid": "${datasource}"}
M = 'model=~"$model"'
MP = 'model=~"$model", pool=~"$pool"'
MPW = 'model=~"$model", pool=~"$pool", worker=~"$worker"'
MW = 'model=~"$model", worker=~"$worker"'
RI = "$__rate_interval"

# ---------------------------------------------------------------------------- builders


def target(expr: str, legend: str = "", ref: str = "A") -> dict:
    return {"datasource": DS, "editorMode": "code", "expr": expr, "legendFormat": legend,
            "range": True, "refId": ref}


def _targets(queries: list[tuple[str, str]]) -> list[dict]:
    return [target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(queries)]


def _thresholds(steps: list[tuple[float | None, str]]) -> dict:
    return {"mode": "absolute", "steps": [{"color": c, "value": v} for v, c in steps]}


def timeseries(title: str, queries: list[tuple[str, str]], unit: str, description: str,
               *, w: int = 12, h: int = 8, stack: bool = False, min_: float | None = 0,
               max_: float | None = None, dashed: str | None = None) -> dict:
    """A time series panel; series whose name matches the regex ``dashed`` (SLO targets,
    alert thresholds) are drawn as red dashed lines."""
    defaults: dict = {
        "unit": unit,
        "color": {"mode": "palette-classic"},
        "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10 if stack else 0,
                   "showPoints": "never", "spanNulls": False,
                   "stacking": {"mode": "normal" if stack else "none", "group": "A"}},
    }
    if min_ is not None:
        defaults["min"] = min_
    if max_ is not None:
        defaults["max"] = max_
    overrides = []
    if dashed:
        overrides.append({
            "matcher": {"id": "byRegexp", "options": dashed},
            "properties": [
                {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}},
                {"id": "color", "value": {"mode": "fixed", "fixedColor": "red"}},
                {"id": "custom.stacking", "value": {"mode": "none", "group": "A"}},
                {"id": "custom.fillOpacity", "value": 0},
            ]})
    return {"type": "timeseries", "title": title, "description": description, "datasource": DS,
            "targets": _targets(queries), "_size": (w, h),
            "fieldConfig": {"defaults": defaults, "overrides": overrides},
            "options": {"legend": {"displayMode": "list", "placement": "bottom",
                                   "showLegend": True},
                        "tooltip": {"mode": "multi", "sort": "desc"}}}


def stat(title: str, queries: list[tuple[str, str]], unit: str, description: str,
         thresholds: list[tuple[float | None, str]], *, w: int = 4, h: int = 4,
         decimals: int | None = None) -> dict:
    defaults: dict = {"unit": unit, "thresholds": _thresholds(thresholds),
                      "color": {"mode": "thresholds"}}
    if decimals is not None:
        defaults["decimals"] = decimals
    return {"type": "stat", "title": title, "description": description, "datasource": DS,
            "targets": _targets(queries), "_size": (w, h),
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {"colorMode": "value", "graphMode": "area", "justifyMode": "auto",
                        "textMode": "auto", "orientation": "auto",
                        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "",
                                          "values": False}}}


def state_timeline(title: str, queries: list[tuple[str, str]], description: str,
                   *, w: int = 24, h: int = 6) -> dict:
    return {"type": "state-timeline", "title": title, "description": description,
            "datasource": DS, "targets": _targets(queries), "_size": (w, h),
            "fieldConfig": {"defaults": {
                "color": {"mode": "thresholds"},
                "thresholds": _thresholds([(None, "red"), (1, "green")]),
                "mappings": [{"type": "value", "options": {
                    "0": {"text": "down", "color": "red", "index": 0},
                    "1": {"text": "up", "color": "green", "index": 1}}}]},
                "overrides": []},
            "options": {"showValue": "never", "mergeValues": True, "rowHeight": 0.9,
                        "legend": {"displayMode": "list", "placement": "bottom",
                                   "showLegend": False}}}


def row(title: str) -> dict:
    return {"type": "row", "title": title, "collapsed": False, "panels": [], "_size": (24, 1)}


def quantiles(metric: str, by: str, selector: str, qs=(0.5, 0.9, 0.99),
              legend: str = "") -> list[tuple[str, str]]:
    """histogram_quantile over a raw histogram, one query per quantile."""
    return [(f"histogram_quantile({q}, sum by ({by}, le) "
             f"(rate({metric}_bucket{{{selector}}}[{RI}])))",
             f"p{int(q * 100)} {legend}".strip()) for q in qs]


def recorded(metric: str, selector: str, window: str, legend: str) -> list[tuple[str, str]]:
    """The recorded p50/p90/p99 series of deploy/prometheus/rules/pdserve-recording.yml."""
    return [(f"pdserve:{metric}:{p}_{window}{{{selector}}}", f"{p} {legend}".strip())
            for p in ("p50", "p90", "p99")]


def variable(name: str, label: str, query: str) -> dict:
    return {"type": "query", "name": name, "label": label, "datasource": DS,
            "definition": query, "query": query, "refresh": 2, "regex": "", "sort": 1,
            "multi": True, "includeAll": True, "allValue": ".*", "hide": 0,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "options": [], "skipUrlSync": False}


DATASOURCE_VAR = {"type": "datasource", "name": "datasource", "label": "Data source",
                  "query": "prometheus", "refresh": 1, "regex": "", "hide": 0,
                  "current": {}, "options": [], "skipUrlSync": False}
MODEL_VAR = variable("model", "Model", "label_values(pdserve_worker_up, model)")
POOL_VAR = variable("pool", "Pool", 'label_values(pdserve_worker_up{model=~"$model"}, pool)')
WORKER_VAR = variable("worker", "Worker",
                      'label_values(pdserve_worker_up{model=~"$model", pool=~"$pool"}, worker)')


def layout(panels: list[dict]) -> list[dict]:
    """Place panels left to right in a 24-column grid; rows start a new line."""
    x = y = line_h = 0
    out = []
    for i, p in enumerate(panels, start=1):
        w, h = p.pop("_size")
        if p["type"] == "row" or x + w > 24:
            x, y, line_h = 0, y + line_h, 0
        p = {"id": i, "gridPos": {"h": h, "w": w, "x": x, "y": y}, **p}
        out.append(p)
        if p["type"] == "row":
            y += h
        else:
            x += w
            line_h = max(line_h, h)
    return out


def dashboard(uid: str, title: str, description: str, variables: list[dict],
              panels: list[dict], links: list[dict]) -> dict:
    return {
        "annotations": {"list": [{
            "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
            "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
            "name": "Annotations & Alerts", "type": "dashboard"}]},
        "description": description,
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "id": None,
        "links": links,
        "panels": layout(panels),
        "refresh": "10s",
        "schemaVersion": 39,
        "tags": ["pdserve"],
        "templating": {"list": [DATASOURCE_VAR, *variables]},
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": title,
        "uid": uid,
        "version": 1,
        "weekStart": "",
    }


def _link(title: str, uid: str) -> dict:
    return {"title": title, "type": "link", "url": f"/d/{uid}", "icon": "dashboard",
            "keepTime": True, "includeVars": True, "asDropdown": False, "tags": [],
            "targetBlank": False, "tooltip": ""}


# ---------------------------------------------------------------------------- dashboards

PCT = "percentunit"
GOOD_HIGH = [(None, "red"), (0.85, "orange"), (0.9, "green")]


def slo_dashboard() -> dict:
    target_att = f"max by (model) (pdserve_slo_attainment_target{{{M}}})"
    panels = [
        row("SLO overview"),
        stat("Attainment (1h)", [(f"pdserve:slo_attainment:ratio_rate1h{{{M}}}", "{{model}}")],
             PCT, "Share of finished requests (rejected ones included) that met both the TTFT "
             "and the TPOT target over the last hour.", GOOD_HIGH, decimals=1),
        stat("Attainment target", [(target_att, "{{model}}")], PCT,
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

        row("Attainment and error budget"),
        timeseries("SLO attainment vs target", [
            (f"pdserve:slo_attainment:ratio_rate5m{{{M}}}", "{{model}} 5m"),
            (f"pdserve:slo_attainment:ratio_rate1h{{{M}}}", "{{model}} 1h"),
            (target_att, "{{model}} target"),
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
    return dashboard(
        "pdserve-slo", "pdserve / SLO",
        "TTFT/TPOT against the SLO, attainment, error budget and goodput of a pdserve "
        "deployment (recording rules: deploy/prometheus/rules/pdserve-recording.yml).",
        [MODEL_VAR, POOL_VAR], panels, [_link("pdserve / Cluster", "pdserve-cluster")])


def cluster_dashboard() -> dict:
    panels = [
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
    return dashboard(
        "pdserve-cluster", "pdserve / Cluster",
        "Per-pool and per-worker state of a pdserve deployment: load, queues, model steps, "
        "KV cache, KV transfer, worker health.",
        [MODEL_VAR, POOL_VAR, WORKER_VAR], panels, [_link("pdserve / SLO", "pdserve-slo")])


def dashboards() -> dict[str, dict]:
    return {"pdserve-slo.json": slo_dashboard(), "pdserve-cluster.json": cluster_dashboard()}


def render(board: dict) -> str:
    return json.dumps(board, indent=2, sort_keys=False) + "\n"


# ---------------------------------------------------------------------------- query helpers

_VAR = re.compile(r"\$\{(\w+)\}|\[\[(\w+)\]\]|\$(\w+)")
_BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}


def substitute(expr: str, values: dict[str, str] | None = None) -> str:
    """Replace Grafana variables the way a dashboard showing "All" would."""
    values = values or {}

    def one(m: re.Match) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name in _BUILTINS:
            return _BUILTINS[name]
        return values.get(name, ".*")

    return _VAR.sub(one, expr)


def load_dashboards(dashboards_dir: Path | str | None = None) -> dict[str, dict]:
    folder = Path(dashboards_dir) if dashboards_dir else DASHBOARDS_DIR
    return {p.name: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def iter_panels(board: dict):
    for panel in board.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # panels inside collapsed rows


def all_queries(values: dict[str, str] | None = None,
                dashboards_dir: Path | str | None = None) -> list[tuple[str, str, str]]:
    """(dashboard uid, panel title, expr) for every panel target of the committed dashboards,
    with template variables substituted (see the module docstring)."""
    out = []
    for board in load_dashboards(dashboards_dir).values():
        for panel in iter_panels(board):
            for t in panel.get("targets", []):
                out.append((board["uid"], panel["title"], substitute(t["expr"], values)))
    return out


def recording_rule_names(rules_dir: Path | str | None = None) -> set[str]:
    import yaml

    folder = Path(rules_dir) if rules_dir else RULES_DIR
    names = set()
    for path in sorted(folder.glob("*.yml")):
        for group in (yaml.safe_load(path.read_text()) or {}).get("groups", []):
            names.update(r["record"] for r in group.get("rules", []) if "record" in r)
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if a committed dashboard differs from the generator")
    args = parser.parse_args(argv)
    stale = []
    for name, board in dashboards().items():
        path = DASHBOARDS_DIR / name
        text = render(board)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            DASHBOARDS_DIR.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    if stale:
        print(f"stale: {', '.join(stale)}; run python deploy/grafana/generate.py",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
