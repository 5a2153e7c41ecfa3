"""Alert rules and the Grafana dashboard: every expression parses (promtool) and refers only to
metrics that looprl's code exports (collected from the prometheus_client registry after
importing every module that defines metrics)."""

from __future__ import annotations

import importlib
import json
import re
import subprocess

import pytest
import yaml

from fixtures_loop import REPO

ALERTS = REPO / "ops/prometheus/alerts.yml"
DASHBOARD = REPO / "ops/grafana/looprl.json"
STAGES = ("ingest", "storage", "reward", "policy", "serving", "kernels", "ops")
_METRIC_DEF = re.compile(r"\b(Counter|Gauge|Histogram|Summary|Info|Enum)\(\s*\"(looprl_[a-z0-9_]+)\"")
_METRIC_REF = re.compile(r"\blooprl_[a-z0-9_]+\b")


def metric_modules() -> list[str]:
    """Modules of the repo that define prometheus_client metrics."""
    mods = []
    for stage in STAGES:
        for path in sorted((REPO / stage).glob("*.py")):
            if _METRIC_DEF.search(path.read_text()):
                mods.append(f"looprl.{stage}.{path.stem}")
    return mods


@pytest.fixture(scope="module")
def exported() -> set[str]:
    """Every sample name the code can export (counters: _total/_created; histograms: _bucket/...)."""
    from prometheus_client import REGISTRY

    for mod in metric_modules():
        importlib.import_module(mod)
    return set(REGISTRY._names_to_collectors)


def referenced(expr: str) -> set[str]:
    return set(_METRIC_REF.findall(expr))


def alert_rules() -> list[dict]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for p in dash["panels"]:
        for t in p.get("targets", []):
            out.append((p["title"], t["expr"]))
    return out


def test_metric_modules_are_found(exported):
    # one module per stage that exports metrics: the catalogue is not trivially empty
    assert "looprl.ops.scheduler" in metric_modules() and "looprl.ops.canary" in metric_modules()
    assert {"looprl_scheduler_job_runs_total", "looprl_canary_decisions_total"} <= exported


def test_alert_rules_pass_promtool(prometheus_tools):
    r = subprocess.run([prometheus_tools.promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in r.stdout


def test_required_alerts_exist():
    names = {r["alert"] for r in alert_rules()}
    for required in ("LooprlIngestStalled", "LooprlDeadLetterRateHigh", "LooprlRewardAccuracyDrop",
                     "LooprlCanaryRolledBack", "LooprlServingErrors"):
        assert required in names


def test_alert_rules_use_only_exported_metrics(exported):
    for rule in alert_rules():
        missing = referenced(rule["expr"]) - exported
        assert not missing, f"alert {rule['alert']} uses metrics no stage exports: {sorted(missing)}"


def test_dashboard_expressions_parse(prometheus_tools, tmp_path):
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"looprl:dashboard:expr_{i}", "expr": e} for i, (_, e) in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    r = subprocess.run([prometheus_tools.promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_catches_a_broken_expression(prometheus_tools, tmp_path):
    """The parse check above is real: a malformed expression fails it."""
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [
        {"record": "looprl:bad", "expr": "sum(rate(looprl_serving_requests_total[5m])"}]}]}))
    r = subprocess.run([prometheus_tools.promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert r.returncode != 0


def test_dashboard_uses_only_exported_metrics(exported):
    for title, expr in dashboard_exprs():
        missing = referenced(expr) - exported
        assert not missing, f"dashboard panel {title!r} uses metrics no stage exports: {sorted(missing)}"


def test_dashboard_covers_every_stage():
    stages = {m.split("_")[1] for _, e in dashboard_exprs() for m in referenced(e)}
    assert {"ingest", "reward", "policy", "serving", "canary", "scheduler"} <= stages


def test_prometheus_config_is_valid(prometheus_tools, tmp_path):
    """The compose Prometheus config, with the rule file path pointed at the repo's copy."""
    cfg = (REPO / "ops/prometheus/prometheus.yml").read_text().replace("/etc/prometheus/alerts.yml", str(ALERTS))
    path = tmp_path / "prometheus.yml"
    path.write_text(cfg)
    r = subprocess.run([prometheus_tools.promtool, "check", "config", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
