"""The Grafana dashboards in deploy/grafana: generated, consistent, and querying only
metrics that exist (docs/metrics.md) or are recorded (deploy/prometheus/rules)."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
NAME = re.compile(r"pdserve[_:][a-zA-Z0-9_:]*")
VAR_USE = re.compile(r"\$\{(\w+)\}|\[\[(\w+)\]\]|\$(\w+)")
BUILTIN_VARS = {"__rate_interval", "__interval", "__range", "__all"}


def load_generator():
    spec = importlib.util.spec_from_file_location("pdserve_grafana_generate",
                                                  GRAFANA / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = load_generator()


def documented_metrics() -> dict[str, str]:
    """name -> type, from the tables of docs/metrics.md."""
    rows = re.findall(r"^\|\s*`(pdserve_\w+)`\s*\|\s*(\w+)\s*\|",
                      (ROOT / "docs" / "metrics.md").read_text(), re.M)
    assert rows, "no metric table found in docs/metrics.md"
    return dict(rows)


def known_series_names() -> set[str]:
    names = set(gen.recording_rule_names())
    for name, kind in documented_metrics().items():
        names.add(name)
        if kind == "histogram":
            names.update(f"{name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
    return names


def boards() -> dict[str, dict]:
    return gen.load_dashboards()


def panels(board: dict) -> list[dict]:
    return list(gen.iter_panels(board))


def data_panels(board: dict) -> list[dict]:
    return [p for p in panels(board) if p["type"] != "row"]


def test_committed_dashboards_are_the_generators_output():
    generated = gen.dashboards()
    committed = boards()
    assert set(committed) == set(generated), "run python deploy/grafana/generate.py"
    for name, board in generated.items():
        text = (GRAFANA / "dashboards" / name).read_text()
        assert text == gen.render(board), f"{name} is stale: run python deploy/grafana/generate.py"
    assert gen.main(["--check"]) == 0


def test_expected_dashboards_exist():
    uids = {b["uid"] for b in boards().values()}
    assert {"pdserve-slo", "pdserve-cluster"} <= uids


@pytest.mark.parametrize("name", sorted(boards()))
def test_dashboard_structure(name):
    board = boards()[name]
    for key in ("uid", "title", "panels", "templating", "schemaVersion", "time"):
        assert key in board, key
    assert board["schemaVersion"] >= 36
    assert board["id"] is None  # provisioned dashboards must not carry a database id
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: set[tuple[int, int]] = set()
    for p in panels(board):
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in ("h", "w", "x", "y")), p["title"]
        assert g["w"] >= 1 and g["h"] >= 1 and g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"panel {p['title']!r} overlaps another"
        cells |= mine
        assert p["title"].strip()


def test_uids_unique():
    uids = [b["uid"] for b in boards().values()]
    assert len(uids) == len(set(uids))
    titles = [b["title"] for b in boards().values()]
    assert len(titles) == len(set(titles))


@pytest.mark.parametrize("name", sorted(boards()))
def test_every_panel_has_a_query(name):
    for p in data_panels(boards()[name]):
        assert p.get("targets"), f"panel {p['title']!r} has no target"
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert isinstance(t["expr"], str) and t["expr"].strip(), p["title"]
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]
            assert t["expr"].count("{") == t["expr"].count("}"), t["expr"]
            assert t["datasource"]["uid"] == "${datasource}"


@pytest.mark.parametrize("name", sorted(boards()))
def test_queries_use_only_known_metrics(name):
    known = known_series_names()
    board = boards()[name]
    exprs = [t["expr"] for p in data_panels(board) for t in p["targets"]]
    exprs += [v["query"] for v in board["templating"]["list"] if v["type"] == "query"]
    used = set()
    for expr in exprs:
        found = NAME.findall(expr)
        assert found, f"query uses no pdserve metric: {expr}"
        used.update(found)
    unknown = sorted(used - known)
    assert not unknown, f"not in docs/metrics.md nor a recording rule: {unknown}"


def test_dashboards_cover_the_documented_metrics():
    """Every documented metric is shown somewhere, directly or through a recording rule."""
    rules_text = "".join(p.read_text() for p in (ROOT / "deploy/prometheus/rules").glob("*.yml"))
    recorded_inputs = set(NAME.findall(rules_text))
    shown = set()
    for board in boards().values():
        for p in data_panels(board):
            for t in p["targets"]:
                shown.update(NAME.findall(t["expr"]))
    shown_or_recorded = {re.sub(r"_(bucket|sum|count)$", "", n) for n in shown | recorded_inputs}
    missing = sorted(set(documented_metrics()) - shown_or_recorded)
    assert not missing, missing


@pytest.mark.parametrize("name", sorted(boards()))
def test_template_variables_exist_and_are_used(name):
    board = boards()[name]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert {"model", "pool"} <= set(variables)
    if board["uid"] == "pdserve-cluster":
        assert "worker" in variables
    for v in variables.values():
        if v["type"] != "query":
            continue
        assert v["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert v["query"].startswith("label_values("), v["query"]
        assert v["includeAll"] and v["multi"] and v["allValue"] == ".*", v["name"]

    texts = [t["expr"] for p in data_panels(board) for t in p["targets"]]
    texts += [v["query"] for v in variables.values() if v["type"] == "query"]
    referenced = {next(g for g in m.groups() if g) for text in texts
                  for m in VAR_USE.finditer(text)}
    undefined = referenced - set(variables) - BUILTIN_VARS
    assert not undefined, f"undefined variables: {undefined}"
    panel_refs = {next(g for g in m.groups() if g) for p in data_panels(board)
                  for t in p["targets"] for m in VAR_USE.finditer(t["expr"])}
    unused = {n for n, v in variables.items() if v["type"] == "query"} - panel_refs
    assert not unused, f"variables no panel uses: {unused}"


@pytest.mark.parametrize("name", sorted(boards()))
def test_variables_are_regex_matchers(name):
    """all_queries() substitutes ".*" for a variable: valid only inside =~ matchers."""
    for p in data_panels(boards()[name]):
        for t in p["targets"]:
            for m in re.finditer(r"\$(\w+)", t["expr"]):
                if m.group(1).startswith("__"):
                    continue
                before = t["expr"][:m.start()]
                assert re.search(r'\w+=~"$', before), f"{p['title']}: {t['expr']}"


def test_all_queries_substitutes_every_variable():
    queries = gen.all_queries()
    n_targets = sum(len(p["targets"]) for b in boards().values() for p in data_panels(b))
    assert len(queries) == n_targets
    uids = {b["uid"] for b in boards().values()}
    for uid, title, expr in queries:
        assert uid in uids and title
        assert "$" not in expr and "[[" not in expr, expr
    assert any('model=~".*"' in e for _, _, e in queries)
    assert any("[1m]" in e for _, _, e in queries)  # $__rate_interval
    pinned = gen.all_queries({"model": "demo", "pool": "decode"})
    assert any('model=~"demo", pool=~"decode"' in e for _, _, e in pinned)


def test_substitute_forms():
    assert gen.substitute('x{a=~"$model",b=~"${pool}",c=~"[[worker]]"}[$__rate_interval]') == \
        'x{a=~".*",b=~".*",c=~".*"}[1m]'
    assert gen.substitute('x{a=~"$model"}', {"model": "m1|m2"}) == 'x{a=~"m1|m2"}'


def test_recording_rule_names():
    names = gen.recording_rule_names()
    assert "pdserve:time_to_first_token_seconds:p90_5m" in names
    assert "pdserve:slo_error_ratio:rate1h" in names
    assert all(n.startswith("pdserve:") and n.count(":") == 2 for n in names), names


def test_promql_parses_with_promtool(tmp_path):
    """Every substituted dashboard query is valid PromQL: promtool parses each one as a
    recording rule's expression."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    rules = [{"record": f"dashboard_query_{i}", "expr": expr}
             for i, (_, _, expr) in enumerate(gen.all_queries())]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_provisioning_files():
    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/pdserve.yml").read_text())
    assert providers["apiVersion"] == 1
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]
    sources = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    assert sources["apiVersion"] == 1
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus" and source["url"].startswith("http")


def test_dashboards_are_plain_json():
    for path in (GRAFANA / "dashboards").glob("*.json"):
        json.loads(path.read_text())
