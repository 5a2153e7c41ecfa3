"""Alerts an on-call engineer can act on, and the production sources of the dashboard.

- every alert links (``runbook_url``) to its own section of ops/README.md, found by the anchor
  GitHub gives the heading, and the section says what it means, what to check, what to do;
- the alerts' behaviour is unit-tested with ``promtool test rules`` (ops/prometheus/alerts_test.yml),
  and those tests fail when a rule is broken;
- the dashboard's vLLM series are ones vLLM exports, each with a looprl alternative, and its deploy
  annotations read the release decisions the canary exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml

from fixtures_loop import REPO

ALERTS = REPO / "ops/prometheus/alerts.yml"
ALERT_TESTS = REPO / "ops/prometheus/alerts_test.yml"
README = REPO / "ops/README.md"
DASHBOARD = REPO / "ops/grafana/looprl.json"
NEW_ALERTS = {"LooprlIngestSilent", "LooprlControllerDiverged", "LooprlFeedbackOrphans", "LooprlCanaryStuck"}
# What vLLM 0.11's OpenAI server exports (vllm/v1/metrics/loggers.py, PrometheusStatLogger), by
# sample name: the dashboard may use these and nothing else of vLLM's.
VLLM_SAMPLES = {
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:request_success_total",
    *(f"{h}_{s}" for h in ("vllm:e2e_request_latency_seconds", "vllm:time_to_first_token_seconds",
                           "vllm:request_queue_time_seconds", "vllm:request_prefill_time_seconds",
                           "vllm:request_decode_time_seconds") for s in ("bucket", "sum", "count")),
}


def alert_rules() -> list[dict]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"] if "alert" in r]


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a markdown heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def sections() -> dict[str, tuple[int, str, str]]:
    """anchor -> (heading level, heading, body up to the next heading of any level)."""
    out, current = {}, None
    for line in README.read_text().splitlines():
        m = re.match(r"^(#{1,6}) (.+)$", line)
        if m:
            current = github_anchor(m.group(2))
            out[current] = (len(m.group(1)), m.group(2), "")
        elif current is not None:
            level, heading, body = out[current]
            out[current] = (level, heading, body + line + "\n")
    return out


def test_every_alert_links_to_its_own_runbook_section():
    secs = sections()
    urls = {}
    for rule in alert_rules():
        ann = rule.get("annotations", {})
        url = ann.get("runbook_url")
        assert url, f"alert {rule['alert']} has no runbook_url"
        assert "runbook" not in ann, f"alert {rule['alert']}: use runbook_url, not runbook"
        path, _, anchor = url.partition("#")
        assert path == "ops/README.md", url
        assert anchor in secs, f"alert {rule['alert']}: {url} names no heading of ops/README.md"
        level, heading, body = secs[anchor]
        assert heading == rule["alert"] and level == 3, (rule["alert"], heading)
        for part in ("**Means.**", "**Check.**", "**Do.**"):
            assert part in body, f"runbook of {rule['alert']} lacks {part}"
        urls[url] = rule["alert"]
    assert len(urls) == len(alert_rules()), "two alerts share a runbook section"


def test_the_runbooks_section_has_one_subsection_per_alert():
    text = README.read_text()
    assert "\n## Runbooks\n" in text
    runbooks = text.split("\n## Runbooks\n", 1)[1].split("\n## ", 1)[0]
    assert set(re.findall(r"^### (\S+)$", runbooks, re.M)) == {r["alert"] for r in alert_rules()}
    assert "runbooks" in sections()  # the Monitoring section links to it


def test_the_missing_alerts_exist_and_are_unit_tested():
    names = {r["alert"] for r in alert_rules()}
    assert NEW_ALERTS <= names
    tested = {t["alertname"] for case in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
              for t in case.get("alert_rule_test", [])}
    assert NEW_ALERTS | {"LooprlServingErrors", "LooprlServingSlow"} <= tested


def _promtool_test(promtool: str, test_file) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, "test", "rules", str(test_file)], capture_output=True, text=True, timeout=60)


def test_alert_unit_tests_pass(prometheus_tools):
    r = _promtool_test(prometheus_tools.promtool, ALERT_TESTS)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("alert,old,new", [
    ("LooprlFeedbackOrphans", "> 0.05\n        for: 15m", "> 0.5\n        for: 15m"),
    ("LooprlCanaryStuck", "(looprl_canary_deadline_timestamp_seconds > 0) > 0",
     "(looprl_canary_deadline_timestamp_seconds > 0) > 3600"),
    ("LooprlIngestSilent", 'kind="response"}[15m])) or on() vector(0)) == 0', 'kind="response"}[15m]))) == 0'),
    ("LooprlControllerDiverged", "!= on() group_left() max(looprl_canary_promoted_version)",
     "!= on() group_left() max(looprl_canary_promoted_version) + 1"),
], ids=lambda v: v if v.startswith("Looprl") else "")
def test_alert_unit_tests_catch_a_broken_rule(prometheus_tools, tmp_path, alert, old, new):
    text = ALERTS.read_text()
    assert text.count(old) == 1, old
    (tmp_path / "alerts.yml").write_text(text.replace(old, new))
    shutil.copy(ALERT_TESTS, tmp_path / "alerts_test.yml")
    r = _promtool_test(prometheus_tools.promtool, tmp_path / "alerts_test.yml")
    assert r.returncode != 0 and f"alertname: {alert}" in r.stdout + r.stderr, r.stdout + r.stderr


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_vllm_series_are_vllms_and_each_has_a_looprl_alternative():
    used = 0
    for panel in _dashboard()["panels"]:
        for t in panel.get("targets", []):
            names = set(re.findall(r"\bvllm:[a-z0-9_:]+", t["expr"]))
            if not names:
                continue
            used += 1
            assert names <= VLLM_SAMPLES, f"{panel['title']!r}: vLLM does not export {sorted(names - VLLM_SAMPLES)}"
            assert re.search(r"\bor\b.*\blooprl_serving_", t["expr"]), \
                f"{panel['title']!r}: no looprl_serving_* alternative for a stack without vLLM"
    assert used >= 4  # latency, time to first token, tokens/s, running/waiting


def test_deploy_annotations_mark_promotions_and_rollbacks(prometheus_tools, tmp_path):
    from looprl.ops.canary import LAST_DECISION

    ann = {a["name"]: a for a in _dashboard()["annotations"]["list"]
           if a.get("datasource", {}).get("uid") == "prometheus"}
    assert {"Promotions", "Rollbacks"} <= set(ann)
    kinds = {}
    for name, a in ann.items():
        assert a["enable"] and a["useValueForTime"], name  # drawn at the decision's own time
        m = re.fullmatch(rf'{LAST_DECISION._name}{{decision=~"([a-z_|]+)"}} \* 1000', a["expr"])
        assert m, a["expr"]
        kinds[name] = set(m.group(1).split("|"))
    # the decision kinds the release contract records (looprl.storage.releases.DecisionRecord)
    assert kinds["Promotions"] == {"promote", "manual_promote"}
    assert kinds["Rollbacks"] == {"rollback", "manual_rollback", "unhealthy_rollback", "end"}
    rules = {"groups": [{"name": "annotations", "rules": [
        {"record": f"looprl:annotation:{i}", "expr": a["expr"]} for i, a in enumerate(ann.values())]}]}
    path = tmp_path / "annotations.yml"
    path.write_text(yaml.safe_dump(rules))
    r = subprocess.run([prometheus_tools.promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_prometheus_scrapes_the_pushgateway_keeping_the_pushed_job_label():
    cfg = yaml.safe_load((REPO / "ops/prometheus/prometheus.yml").read_text())
    [job] = [j for j in cfg["scrape_configs"] if j["job_name"] == "looprl-pushgateway"]
    assert job["honor_labels"] is True
    assert job["static_configs"] == [{"targets": ["pushgateway:9091"]}]
    assert any(t == "vllm:8000" for j in cfg["scrape_configs"] for s in j["static_configs"] for t in s["targets"])
