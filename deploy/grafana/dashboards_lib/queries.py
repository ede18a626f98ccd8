"""Reading the committed dashboards back: every PromQL query they run, ready to send to
Prometheus, and the names the recording rules define (for tests; see generate.py).

Queries come from the JSON files in ``deploy/grafana/dashboards`` (what Grafana
provisions), not from the builders, so a test checks what is actually deployed.
``substitute`` replaces template variables the way a dashboard showing "All" does.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

GRAFANA_DIR = Path(__file__).resolve().parents[1]
DASHBOARDS_DIR = GRAFANA_DIR / "dashboards"
RULES_DIR = GRAFANA_DIR.parent / "prometheus" / "rules"

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
    with template variables substituted (see generate.py's docstring)."""
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
