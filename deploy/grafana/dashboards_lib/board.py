"""A dashboard around its panels: template variables, links, and the grid layout.

``dashboard`` lays the panels out (``layout``: left to right in Grafana's 24-column grid,
a row panel starting a new line), numbers them from 1 in order, and wraps them with the
settings every pdserve dashboard shares (data source variable first, 10 s refresh, last
hour). The output is deterministic: the same panels give byte-identical JSON.
"""

from __future__ import annotations

from .panels import DS


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


def link(title: str, uid: str) -> dict:
    return {"title": title, "type": "link", "url": f"/d/{uid}", "icon": "dashboard",
            "keepTime": True, "includeVars": True, "asDropdown": False, "tags": [],
            "targetBlank": False, "tooltip": ""}
