"""A real Prometheus (Debian's package) scrapes the running stages and sees series from each;
it loads looprl's alert rules and evaluates them without errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import httpx
import pytest

from fixtures_loop import REPO, free_port, stop_process_groups, wait_http

ALERTS = REPO / "ops/prometheus/alerts.yml"


def prom_get(url: str, path: str, **params) -> dict:
    q = urllib.parse.urlencode(params)
    with urllib.request.urlopen(f"{url}{path}?{q}", timeout=5) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]


@pytest.fixture
def stages(tmp_path, tiny_base, kafka_bootstrap):
    """`looprl` stage processes on free loopback ports, each with its /metrics endpoint."""
    ports = {n: free_port() for n in ("serve", "reward", "scheduler", "controller", "ingest")}
    ws = tmp_path / "ws"
    env = {**os.environ, "LOOPRL_WORKSPACE": str(ws), "LOOPRL_MODEL__BASE_PATH": str(tiny_base),
           "LOOPRL_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap,
           "LOOPRL_SERVING__PORT": str(ports["serve"]), "LOOPRL_SERVING__TORCH_THREADS": "1",
           "LOOPRL_SERVING__ENDPOINTS": json.dumps([f"http://127.0.0.1:{ports['serve']}"]),
           "LOOPRL_REWARD__METRICS_PORT": str(ports["reward"]),
           "LOOPRL_SCHEDULER__METRICS_PORT": str(ports["scheduler"]),
           "LOOPRL_SCHEDULER__RUNNER": "subprocess",
           "LOOPRL_SERVING__CONTROLLER_METRICS_PORT": str(ports["controller"]),
           "LOOPRL_INGEST__METRICS_PORT": str(ports["ingest"]),
           "OMP_NUM_THREADS": "1"}
    cmds = {"serve": ["serving", "serve"], "reward": ["reward", "serve"], "scheduler": ["scheduler", "run"],
            "controller": ["serving", "control"], "ingest": ["ingest", "consume"]}
    procs = {}
    for name, cmd in cmds.items():
        log = open(tmp_path / f"{name}.log", "wb")
        procs[name] = subprocess.Popen([sys.executable, "-m", "looprl.ops.cli", *cmd], env=env, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)
    try:
        for name in cmds:
            path = "/health" if name == "serve" else "/metrics"
            wait_http(f"http://127.0.0.1:{ports[name]}{path}", 180, procs[name], tmp_path / f"{name}.log")
        yield ports
    finally:
        stop_process_groups(procs.values())


def test_prometheus_scrapes_every_stage(stages, run_prometheus):
    ports = stages
    # activity, so labelled series exist: one served completion
    r = httpx.post(f"http://127.0.0.1:{ports['serve']}/v1/completions",
                   json={"model": "policy", "prompt": "tell me about the park", "max_tokens": 4, "user": "u1"}, timeout=60)
    assert r.status_code == 200
    url = run_prometheus({f"looprl-{n}": [f"127.0.0.1:{p}"] for n, p in ports.items()}, rule_files=[ALERTS])
    expected = {
        "serve": "looprl_serving_requests_total",
        "reward": "looprl_reward_backlog_events",
        "scheduler": "looprl_scheduler_ticks_total",
        "controller": "looprl_controller_reconciles_total",
        "ingest": "looprl_ingest_",
    }
    deadline = time.monotonic() + 60
    missing = dict(expected)
    while missing and time.monotonic() < deadline:
        for stage, metric in list(missing.items()):
            series = prom_get(url, "/api/v1/series", **{"match[]": f'{{__name__=~"{metric}.*",job="looprl-{stage}"}}'})
            if series:
                missing.pop(stage)
        time.sleep(1)
    assert not missing, f"no series scraped from: {missing}"
    up = prom_get(url, "/api/v1/query", query="up")["result"]
    assert {s["metric"]["job"]: s["value"][1] for s in up} == {f"looprl-{n}": "1" for n in ports}
    # the alert rules are loaded and evaluate cleanly against live data
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        groups = prom_get(url, "/api/v1/rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        if rules and all(r.get("lastEvaluation", "").startswith("20") for r in rules):
            break
        time.sleep(1)
    assert len(rules) >= 10
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
