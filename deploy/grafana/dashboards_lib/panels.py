"""Panel builders: the JSON of one Grafana panel (time series, stat, state timeline, row)
and of its PromQL targets, plus the label selectors every dashboard query uses.

Each builder returns a plain dict with a private ``_size`` entry, ``(width, height)`` in
grid units; ``board.layout`` removes it when it places the panels, so a panel dict is
complete only once it has gone through ``board.dashboard``. Every template variable is
used as a regex matcher (``label=~"$var"``), which ``queries.substitute`` relies on.
"""

from __future__ import annotations

DS = {"type": "prometheus", "uid": "${datasource}"}
# Selectors: model; model+pool; model+pool+worker; model+worker (KV transfer metrics).
M = 'model=~"$model"'
MP = 'model=~"$model", pool=~"$pool"'
MPW = 'model=~"$model", pool=~"$pool", worker=~"$worker"'
MW = 'model=~"$model", worker=~"$worker"'
RI = "$__rate_interval"

PCT = "percentunit"


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
