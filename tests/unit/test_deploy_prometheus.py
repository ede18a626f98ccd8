"""Static checks of deploy/prometheus: the scrape config, rule naming, metric names, alert
labels and annotations, and that every alert has promtool tests that fire and stay silent.
promtool itself runs in tests/integration/test_prometheus_rules.py."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"
NAME = re.compile(r"pdserve[_:][a-zA-Z0-9_:]*")


def documented_metrics() -> dict[str, str]:
    rows = re.findall(r"^\|\s*`(pdserve_\w+)`\s*\|\s*(\w+)\s*\|",
                      (ROOT / "docs" / "metrics.md").read_text(), re.M)
    return dict(rows)


def rule_groups() -> list[dict]:
    groups = []
    for path in sorted((PROM / "rules").glob("*.yml")):
        groups.extend(yaml.safe_load(path.read_text())["groups"])
    return groups


def rules() -> list[dict]:
    return [r for g in rule_groups() for r in g["rules"]]


def alerts() -> list[dict]:
    return [r for r in rules() if "alert" in r]


def test_scrape_config():
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    assert cfg["global"]["scrape_interval"] == "5s"
    (job,) = cfg["scrape_configs"]
    assert job["job_name"] == "pdserve"  # the alert rules match up{job="pdserve"}
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:9400"]
    for rule_file in cfg["rule_files"]:
        assert (PROM / rule_file).is_file(), rule_file
    assert {Path(f).name for f in cfg["rule_files"]} == \
        {p.name for p in (PROM / "rules").glob("*.yml")}


def test_group_names_unique():
    names = [g["name"] for g in rule_groups()]
    assert len(names) == len(set(names))


def test_recording_rule_names_follow_convention():
    records = [r["record"] for r in rules() if "record" in r]
    assert len(records) == len(set(records)), "duplicate recording rule"
    for name in records:
        assert re.fullmatch(r"pdserve:[a-z0-9_]+:[a-z0-9_]+", name), name


def test_required_recording_rules_exist():
    records = {r["record"] for r in rules() if "record" in r}
    for metric in ("time_to_first_token_seconds", "time_per_output_token_seconds"):
        for q in ("p50", "p90", "p99"):
            for w in ("1m", "5m"):
                assert f"pdserve:{metric}:{q}_{w}" in records
    for w in ("5m", "30m", "1h", "2h", "6h", "1d", "30d"):
        assert f"pdserve:slo_attainment:ratio_rate{w}" in records
        assert f"pdserve:slo_error_ratio:rate{w}" in records
    for w in ("5m", "30m", "1h", "2h", "6h", "1d"):
        assert f"pdserve:slo_burn_rate:rate{w}" in records
    for name in ("pdserve:slo_error_budget:ratio", "pdserve:goodput:rate5m",
                 "pdserve:requests_admitted:rate5m", "pdserve:admission_rejected:rate5m",
                 "pdserve:kv_cache_usage_perc:avg_by_pool",
                 "pdserve:kv_cache_usage_perc:max_by_pool",
                 "pdserve:kv_transfer_bytes:rate1m"):
        assert name in records, name


def test_rules_use_only_known_metrics():
    known = {r["record"] for r in rules() if "record" in r}
    for name, kind in documented_metrics().items():
        known.add(name)
        if kind == "histogram":
            known.update(name + s for s in ("_bucket", "_sum", "_count"))
    for rule in rules():
        used = set(NAME.findall(rule["expr"]))
        assert used or "up{" in rule["expr"], rule
        assert used <= known, (rule.get("record") or rule["alert"], sorted(used - known))


def test_recording_rules_keep_their_labels_bounded():
    """Aggregations name their labels; none keeps a per-request label."""
    for rule in rules():
        for by in re.findall(r"by \(([^)]*)\)", rule["expr"]):
            labels = {x.strip() for x in by.split(",")}
            assert labels <= {"model", "slo_class", "pool", "worker", "backend", "code",
                              "reason", "le"}, (rule, labels)


@pytest.mark.parametrize("alert", alerts(), ids=lambda a: a["alert"])
def test_alert_labels_and_annotations(alert):
    assert alert["alert"].startswith("Pdserve")
    assert alert["labels"]["severity"] in ("page", "ticket")
    for key in ("summary", "description", "runbook"):
        assert alert["annotations"].get(key, "").strip(), key
    assert "docs/deploy.md" in alert["annotations"]["runbook"]


def test_expected_alerts_exist():
    names = {a["alert"] for a in alerts()}
    assert {"PdserveSLOErrorBudgetBurnFast", "PdserveSLOErrorBudgetBurnSlow",
            "PdserveSLOErrorBudgetBurnTicket", "PdservePoolDown", "PdserveWorkerDown",
            "PdserveKVCacheExhausted", "PdserveKVTransferFailures",
            "PdserveMetricsEndpointDown", "PdserveHighAdmissionRejections"} <= names
    pages = {a["alert"] for a in alerts() if a["labels"]["severity"] == "page"}
    assert {"PdserveSLOErrorBudgetBurnFast", "PdserveSLOErrorBudgetBurnSlow",
            "PdservePoolDown"} <= pages


def test_burn_rate_alerts_are_multi_window():
    windows = {"PdserveSLOErrorBudgetBurnFast": ("rate1h", "rate5m", "page_1h"),
               "PdserveSLOErrorBudgetBurnSlow": ("rate6h", "rate30m", "page_6h"),
               "PdserveSLOErrorBudgetBurnTicket": ("rate1d", "rate2h", "ticket_1d")}
    by_name = {a["alert"]: a for a in alerts()}
    for name, (long_w, short_w, threshold) in windows.items():
        expr = by_name[name]["expr"]
        assert f"pdserve:slo_burn_rate:{long_w} " in expr
        assert f"pdserve:slo_burn_rate:{short_w} " in expr
        assert " and " in expr
        assert expr.count(f"pdserve:slo_burn_rate_threshold:{threshold}") == 2
    thresholds = {r["record"]: r["expr"] for r in rules()
                  if r.get("record", "").startswith("pdserve:slo_burn_rate_threshold:")}
    assert "14.4" in thresholds["pdserve:slo_burn_rate_threshold:page_1h"]
    assert ", 6)" in thresholds["pdserve:slo_burn_rate_threshold:page_6h"]
    assert ", 3)" in thresholds["pdserve:slo_burn_rate_threshold:ticket_1d"]


def test_every_alert_is_tested_firing_and_silent():
    firing, silent = set(), set()
    for path in sorted((PROM / "tests").glob("*.yml")):
        spec = yaml.safe_load(path.read_text())
        for rule_file in spec["rule_files"]:
            assert (path.parent / rule_file).is_file(), (path, rule_file)
        for case in spec["tests"]:
            for t in case.get("alert_rule_test", []):
                (firing if t.get("exp_alerts") else silent).add(t["alertname"])
    names = {a["alert"] for a in alerts()}
    assert names <= firing, f"never tested firing: {sorted(names - firing)}"
    assert names <= silent, f"never tested silent: {sorted(names - silent)}"


def test_prometheusrule_matches_rule_files():
    spec = importlib.util.spec_from_file_location("pdserve_promrule", PROM / "prometheusrule.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    committed = yaml.safe_load(module.OUTPUT.read_text())
    assert committed == module.build(), "run python deploy/prometheus/prometheusrule.py"
    by_name = {g["name"]: g for g in rule_groups()}
    assert {g["name"]: g for g in committed["spec"]["groups"]} == by_name
    assert module.main(["--check"]) == 0
