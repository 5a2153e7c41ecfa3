"""The monitoring stack on a short real loop: every dashboard panel and deploy annotation has data.

A real Prometheus (the project's alert rules loaded) scrapes the stages as docker-compose runs
them: the embedded server behind the gateway (which logs every answer to Kafka), ingest, the
adapter controller and the scheduler; and a real Pushgateway (``honor_labels``), to which the
scheduler's jobs push their final metrics: a one-step PPO run with the gate, and a reward update
on the feedback, run as subprocesses. Traffic goes through the gateway (streamed and not),
feedback goes to Kafka (preferences between answers, thumbs, one vote on an answer that never
existed, one record that is not JSON), the gated candidate enters the canary, and an operator
promotes it and rolls it back. Then each panel's query, over the test's
time range as Grafana would ask, returns data: the production series where this stack has them
(the gateway's), else the embedded alternative after ``or`` (vLLM's series need vLLM). The deploy
annotations return the decisions' own times.

Without a Pushgateway binary (``pushgateway`` or Debian's ``prometheus-pushgateway`` on PATH) the
test is skipped: the push client itself is tested against a recording server in
tests/test_metrics_push.py."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import httpx
import pytest

from fixtures_loop import REPO, free_port, stop_process_groups, wait_http

ALERTS = REPO / "ops/prometheus/alerts.yml"
DASHBOARD = REPO / "ops/grafana/looprl.json"
POLICY_JOB = ["policy", "train", "--steps", "1", "--no-ray", "--scorer", "cheerful", "--gate"]
PUSHGATEWAY = shutil.which("pushgateway") or shutil.which("prometheus-pushgateway")

pytestmark = pytest.mark.skipif(
    PUSHGATEWAY is None, reason="no Pushgateway binary on PATH (`pushgateway`, or Debian's `prometheus-pushgateway`: "
    "apt-get install prometheus-pushgateway); the push client is tested in tests/test_metrics_push.py")


def prom(url: str, path: str, **params) -> dict | list:
    with urllib.request.urlopen(f"{url}{path}?{urllib.parse.urlencode(params)}", timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]


def wait_for(what: str, check, timeout_s: float, logs: dict | None = None):
    """Poll ``check()`` until it returns something truthy; fail naming ``what`` (with log tails)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.5)
    tails = "".join(f"\n--- {name}\n{p.read_text()[-1500:]}" for name, p in (logs or {}).items() if p.exists())
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}{tails}")


@pytest.fixture
def pushgateway(tmp_path) -> str:
    port = free_port()
    log = tmp_path / "pushgateway.log"
    proc = subprocess.Popen([PUSHGATEWAY, f"--web.listen-address=127.0.0.1:{port}"], stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/-/ready", 30, proc, log)
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def loop(tmp_path, tiny_base, kafka_bootstrap, kafka_topics, pushgateway):
    """The stages on free loopback ports, sharing one workspace; the PPO job triggered before the
    start (the reward job is triggered by the test, once there is feedback to learn from)."""
    from looprl.ops.core.config import load_config
    from looprl.ops.scheduler import request_trigger

    names = ("serve", "gateway", "gateway_metrics", "ingest", "controller", "scheduler")
    ports = {n: free_port() for n in names}
    ws = tmp_path / "ws"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LOOPRL_")},
           "LOOPRL_WORKSPACE": str(ws), "LOOPRL_MODEL__BASE_PATH": str(tiny_base), "OMP_NUM_THREADS": "1",
           "LOOPRL_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap,
           **{f"LOOPRL_KAFKA__{k.upper()}": v for k, v in kafka_topics.items() if k.startswith("topic_")},
           "LOOPRL_INGEST__GROUP_ID": kafka_topics["group_id"], "LOOPRL_INGEST__METRICS_PORT": str(ports["ingest"]),
           "LOOPRL_INGEST__BATCH_MAX_SECONDS": "0.3", "LOOPRL_INGEST__ORPHAN_TIMEOUT_SECONDS": "1",
           "LOOPRL_SERVING__PORT": str(ports["serve"]), "LOOPRL_SERVING__TORCH_THREADS": "1",
           "LOOPRL_SERVING__ENDPOINTS": json.dumps([f"http://127.0.0.1:{ports['serve']}"]),
           "LOOPRL_SERVING__LOG_RESPONSES": "false",  # the gateway logs every answer, as in production
           "LOOPRL_SERVING__CONTROLLER_METRICS_PORT": str(ports["controller"]),
           "LOOPRL_SERVING__CONTROLLER_POLL_SECONDS": "0.5",
           "LOOPRL_GATEWAY__PORT": str(ports["gateway"]), "LOOPRL_GATEWAY__METRICS_PORT": str(ports["gateway_metrics"]),
           "LOOPRL_GATEWAY__HEALTH_INTERVAL_SECONDS": "0.5", "LOOPRL_GATEWAY__ROUTING_POLL_SECONDS": "0.2",
           "LOOPRL_SCHEDULER__METRICS_PORT": str(ports["scheduler"]), "LOOPRL_SCHEDULER__RUNNER": "subprocess",
           "LOOPRL_SCHEDULER__POLL_SECONDS": "0.5", "LOOPRL_SCHEDULER__INTERVAL_SECONDS": "3600",
           "LOOPRL_SCHEDULER__JOBS": '["reward", "policy"]', "LOOPRL_SCHEDULER__POLICY_COMMAND": json.dumps(POLICY_JOB),
           "LOOPRL_POLICY__METRICS_PORT": "0", "LOOPRL_POLICY__ROLLOUT_BATCH_SIZE": "4",
           "LOOPRL_POLICY__MINIBATCH_SIZE": "4", "LOOPRL_POLICY__PPO_EPOCHS": "1",
           "LOOPRL_GATE__HELDOUT_PROMPTS": "4", "LOOPRL_GATE__MIN_WIN_RATE": "0",
           "LOOPRL_REWARD__MIN_NEW_EVENTS": "1", "LOOPRL_REWARD__MAX_USER_SHARE": "1",
           "LOOPRL_REWARD__EPOCHS_PER_UPDATE": "1",
           # the canary never decides by itself here: the operator does
           "LOOPRL_CANARY__TRAFFIC_SHARE": "0.5", "LOOPRL_CANARY__MIN_SAMPLES": "1000",
           "LOOPRL_METRICS__PUSHGATEWAY_URL": f"http://{pushgateway}"}
    cfg = load_config(environ=env)
    request_trigger(cfg, "policy", "monitoring test")
    cmds = {"serve": ["serving", "serve"], "gateway": ["gateway"], "ingest": ["ingest", "consume"],
            "controller": ["serving", "control"], "scheduler": ["scheduler", "run"]}
    logs = {n: tmp_path / f"{n}.log" for n in cmds}
    procs = {n: subprocess.Popen([sys.executable, "-m", "looprl.ops.cli", *cmd], env=env,
                                 stdout=open(logs[n], "wb"), stderr=subprocess.STDOUT, start_new_session=True)
             for n, cmd in cmds.items()}
    try:
        for n in cmds:
            port, path = {"serve": (ports["serve"], "/health"), "gateway": (ports["gateway"], "/health")}.get(
                n, (ports[n], "/metrics"))
            wait_http(f"http://127.0.0.1:{port}{path}", 180, procs[n], logs[n])
        yield cfg, ports, logs
    finally:
        stop_process_groups(procs.values())


def _traffic(gateway: str, users: list[str]) -> list[str]:
    """Completions and chats through the gateway, two of them streamed; the answers' response ids."""
    ids = []
    with httpx.Client(base_url=gateway, timeout=60) as http:
        for i, user in enumerate(users):
            body = {"model": "policy", "max_tokens": 4, "user": user}
            if i % 2:
                r = http.post("/v1/completions", json={**body, "prompt": "tell me about the park"})
            else:
                r = http.post("/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200, r.text
            ids.append(r.headers["X-Looprl-Response-Id"])
        for user in users[:2]:
            with http.stream("POST", "/v1/chat/completions", json={
                    "model": "policy", "max_tokens": 4, "user": user, "stream": True,
                    "messages": [{"role": "user", "content": "a story"}]}) as r:
                assert r.status_code == 200
                assert b"[DONE]" in b"".join(r.iter_bytes())
    return ids


def _targets() -> list[tuple[str, str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["refId"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]


def query_range(url: str, expr: str, since: float) -> list[dict]:
    """``expr`` from ``since`` to now every second, as a Grafana panel asks; the last point is now
    (a range ends at the last whole step from its start, which could miss the newest sample)."""
    end = time.time()
    return prom(url, "/api/v1/query_range", query=expr, start=end - math.ceil(end - since), end=end, step=1)["result"]


def _has_data(url: str, expr: str, since: float) -> bool:
    return any(math.isfinite(float(v)) for s in query_range(url, expr, since) for _, v in s["values"])


def test_every_panel_and_annotation_has_data_after_a_short_loop(loop, run_prometheus, pushgateway):
    from confluent_kafka import Producer

    from looprl.ingest.client import FeedbackClient
    from looprl.ops.canary import CanaryManager
    from looprl.ops.scheduler import request_trigger

    cfg, ports, logs = loop
    t0 = time.time()
    scrape = {f"looprl-{n}": [f"127.0.0.1:{ports[n]}"] for n in ("serve", "ingest", "controller", "scheduler")}
    scrape["looprl-gateway"] = [f"127.0.0.1:{ports['gateway_metrics']}"]
    scrape["looprl-pushgateway"] = [pushgateway]
    url = run_prometheus(scrape, rule_files=[ALERTS], honor_labels={"looprl-pushgateway"})
    gateway = f"http://127.0.0.1:{ports['gateway']}"

    def seen(expr: str):
        return prom(url, "/api/v1/query", query=expr)["result"]

    # answers through the gateway; preferences and thumbs on them, one vote on an answer that
    # never was (an orphan), and one record that is not JSON (dead-lettered)
    ids = _traffic(gateway, [f"user-{i}" for i in range(4)])
    k = cfg.kafka
    with FeedbackClient(k.bootstrap_servers, k.topic_feedback) as fb:
        fb.preference(ids[0], ids[1], user_id="user-0")
        fb.preference(ids[3], ids[2], user_id="user-1")
        fb.thumbs(ids[0], True, user_id="user-0")
        fb.thumbs(ids[1], False, user_id="user-1")
        fb.thumbs("chatcmpl-never-served", True, user_id="user-2")
    raw = Producer({"bootstrap.servers": k.bootstrap_servers})
    raw.produce(k.topic_feedback, b"not json")
    assert raw.flush(30) == 0
    # once ingest stored the preferences, the scheduler runs a reward update on them
    wait_for("the preferences in the event log", lambda: seen('looprl_ingest_events_total{kind="preference"} >= 2'),
             60, logs)
    request_trigger(cfg, "reward", "monitoring test")

    # the scheduler's PPO job (with the gate): the candidate enters the canary
    def canary_started():
        return [d for d in CanaryManager(cfg).decisions() if d["action"] == "start"]

    [start] = wait_for("the gated candidate to enter the canary", canary_started, 150, logs)
    v = start["version"]

    # the scheduler judged it once and the gateway routes a share of users to it
    wait_for("the canary's first look and the gateway's canary route",
             lambda: seen("looprl_canary_thumbs_up_ratio") and seen('looprl_gateway_routed_version{role="canary"} > 0'),
             60, logs)
    _traffic(gateway, [f"user-{i}" for i in range(4, 10)])

    # an operator promotes it, then rolls it back: each decision is a deploy annotation
    ops = CanaryManager(cfg)
    ops.manual_promote(v, by="test")
    wait_for("the promotion to be exported and applied",
             lambda: seen('looprl_canary_last_decision_timestamp_seconds{decision="manual_promote"}')
             and seen(f'looprl_gateway_routed_version{{role="primary"}} == {v[1:]}'), 60, logs)
    ops.manual_rollback(by="test")
    wait_for("the rollback to be exported",
             lambda: seen('looprl_canary_last_decision_timestamp_seconds{decision="manual_rollback"}'), 60, logs)
    wait_for("the dead-lettered record and the orphan vote",
             lambda: {s["metric"]["reason"] for s in seen("looprl_ingest_dead_letters_total")}
             >= {"bad_json", "orphan_feedback"}, 60, logs)

    # the jobs' final metrics came through the Pushgateway under their own job names
    wait_for("the reward update's measured accuracy",
             lambda: seen('looprl_reward_prequential_accuracy_ratio{job="looprl-reward-update"} >= 0'), 90, logs)
    pushed = {s["metric"]["job"] for s in seen("push_time_seconds")}
    assert {"looprl-reward-update", "looprl-policy-train"} <= pushed
    assert seen('looprl_policy_steps_total{job="looprl-policy-train"} == 1')
    assert seen('looprl_policy_gate_decisions_total{job="looprl-policy-train", decision="gated"} == 1')

    # every panel query, and each of its alternatives this stack can feed: the gateway's series
    # (production) and the embedded server's (the demo); vLLM's need vLLM
    empty = []
    for title, ref, expr in _targets():
        alternatives = [a for a in re.split(r"\s+or\s+", expr) if "vllm:" not in a]
        empty += [(title, ref, e) for e in [expr, *alternatives] if not _has_data(url, e, t0)]
    assert not empty, "panels without data:\n" + "\n".join(f"{t} [{r}]: {e}" for t, r, e in empty)

    dash = json.loads(DASHBOARD.read_text())
    decided = {d["action"]: d["at"] for d in CanaryManager(cfg).decisions()}
    for ann in dash["annotations"]["list"]:
        if ann.get("datasource", {}).get("uid") != "prometheus":
            continue
        # useValueForTime: each value is the time of a decision, in milliseconds
        times = {float(val) for s in query_range(url, ann["expr"], t0) for _, val in s["values"]}
        want = {"Promotions": "manual_promote", "Rollbacks": "manual_rollback", "Canary starts": "start"}[ann["name"]]
        assert any(abs(t - decided[want] * 1000) < 1 for t in times), (ann["name"], sorted(times))

    # the alert rules evaluate cleanly on this data
    groups = prom(url, "/api/v1/rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert rules and all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules
                                                                 if r["health"] != "ok"]
