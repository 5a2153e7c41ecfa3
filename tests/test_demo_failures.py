"""Failures are visible: the demo's failure watch (serving error rate sustained for a minute, stages
restarting in a loop), failed requests and error rate per stage in the live view, the progress
lines, the report and `looprl status`, and a demo whose serving stage always fails stopping with
the cause on stdout."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest

from looprl.ops.core.config import load_config
from looprl.ops.health import FailureWatch, StageMonitor, first_error_line, read_health, stage_counts


def feed(watch: FailureWatch, stage: str, t0: float, t1: float, rps: float, fail_share: float,
         start: tuple[float, float] = (0.0, 0.0), step: float = 2.0) -> tuple[float, float]:
    """Cumulative counters of a stage answering ``rps`` requests/s, ``fail_share`` of them failing,
    observed every ``step`` seconds from ``t0`` to ``t1``; checks the rules at each observation.
    Returns the counters at the end."""
    req, fail = start
    t = t0
    while t < t1 - 1e-9:
        t += step
        req += rps * step
        fail += rps * step * fail_share
        watch.observe(stage, t, req, fail)
        watch.check(t)
    return req, fail


# --------------------------------------------------------------------------- the rules, on numbers
def test_serving_failing_a_quarter_of_requests_for_a_minute_stops_the_demo():
    w = FailureWatch()  # the defaults: > 20 % for 60 s, > 3 restarts in 5 min
    c = feed(w, "serve", 0, 30, rps=4, fail_share=0.0)
    t, fired_at = 30, None
    while fired_at is None and t < 300:
        c = feed(w, "serve", t, t + 2, rps=4, fail_share=0.25, start=c)
        t += 2
        fired_at = t if w.check(t) else None
    # Failing from t=30; from t=40 every request of the 10-s rate window is from the failing
    # period, and a minute later the demo stops.
    assert fired_at == 100
    f = w.check(100)
    assert f.stage == "serve"
    assert f.reason == "serve failed more than 20% of its requests for 60 s (60 of 240, 25%, in the last 60 s)"
    fig = w.figures(100)["serve"]
    assert (fig["requests"], fig["failed"], fig["error_rate"]) == (400, 70, 0.25)


def test_exactly_the_threshold_or_a_short_outage_does_not():
    w = FailureWatch()
    feed(w, "serve", 0, 200, rps=5, fail_share=0.2)  # 20 % is not "more than 20 %"
    assert w.check(200) is None
    # A restart of the server (planned kill, --chaos): 40 s of failures, then it recovers. Over the
    # last minute more than 20 % failed, but not for a minute.
    w = FailureWatch()
    c = feed(w, "serve", 0, 60, rps=5, fail_share=0.0)
    c = feed(w, "serve", 60, 100, rps=5, fail_share=1.0, start=c)
    feed(w, "serve", 100, 200, rps=5, fail_share=0.0, start=c)
    assert w.check(200) is None
    assert w.figures(110)["serve"]["failing_for_s"] is None


def test_only_serving_is_judged_by_its_error_rate_and_silence_is_not_recovery():
    w = FailureWatch()
    feed(w, "simulator", 0, 120, rps=5, fail_share=1.0)  # the users' view is shown, not judged
    assert w.check(120) is None
    assert w.figures(120)["simulator"]["error_rate"] == 1.0
    # Failing, then no request finishes for a while (every user backing off): still failing.
    w = FailureWatch()
    c = feed(w, "serve", 0, 20, rps=5, fail_share=1.0)
    for t in range(22, 80, 2):
        w.observe("serve", t, *c)
        w.check(t)
    assert w.check(80) is not None


def test_counters_that_restart_from_zero_are_not_lost():
    w = FailureWatch()
    w.observe("serve", 1, 100, 10, epoch=1000.0)
    w.observe("serve", 3, 150, 20, epoch=1000.0)
    w.observe("serve", 5, 170, 30, epoch=2000.0)  # a new process (start time): counts from zero
    assert (w.figures(5)["serve"]["requests"], w.figures(5)["serve"]["failed"]) == (150 + 170, 20 + 30)
    w.observe("collector", 1, 100, 10)
    w.observe("collector", 3, 40, 4)  # no start time exported: the count went down
    w.observe("collector", 5, 50, 4)
    assert (w.figures(5)["collector"]["requests"], w.figures(5)["collector"]["failed"]) == (150, 14)


def test_more_than_three_restarts_in_five_minutes_stops_the_demo():
    w = FailureWatch()
    for i, t in enumerate((10, 100, 200)):
        w.observe_restarts("reward", i + 1, t)
        assert w.check(t) is None
    w.observe_restarts("reward", 4, 320)  # the first restart is out of the window
    assert w.check(320) is None
    assert w.figures(320)["reward"] == {"restarts": 4, "recent_restarts": 3}
    w.observe_restarts("reward", 5, 330)
    f = w.check(330)
    assert f.stage == "reward" and f.reason == "reward restarted 4 times in the last 5 min (limit 3)"
    assert w.check(900) is f  # the first failure is kept


def test_thresholds_come_from_the_config(tmp_path):
    cfg = load_config(environ={"LOOPRL_DEMO__MAX_RESTARTS": "1", "LOOPRL_DEMO__FAILURE_RATE": "0.5",
                               "LOOPRL_DEMO__FAILURE_SECONDS": "10"}, workspace=tmp_path)
    w = FailureWatch.from_config(cfg.demo)
    w.observe_restarts("ingest", 2, 5)
    assert w.check(5).reason.endswith("(limit 1)")
    w = FailureWatch.from_config(cfg.demo)
    feed(w, "serve", 0, 30, rps=5, fail_share=0.4)  # 40 % is fine at a 50 % limit
    assert w.check(30) is None
    feed(w, "serve", 30, 50, rps=5, fail_share=0.6, start=(150, 60))
    assert w.check(50) is not None
    defaults = load_config(environ={}, workspace=tmp_path).demo
    assert (defaults.failure_rate, defaults.failure_seconds, defaults.max_restarts,
            defaults.restart_window_seconds) == (0.2, 60.0, 3, 300.0)


# --------------------------------------------------------------------------- the first error line
def test_first_error_line_skips_earlier_runs_and_reads_through_tracebacks(tmp_path):
    log = tmp_path / "serve.log"
    old = "looprl serving serve: an error of the previous run\n"
    log.write_text(old + "\n==== start 2030-01-01T00:00:00 python -m looprl.ops.cli serving serve\n"
                   + json.dumps({"level": "info", "msg": "effective config", "config": {"x": "ERROR"}}) + "\n"
                   + json.dumps({"level": "warning", "msg": "response not logged", "error": "kafka down"}) + "\n"
                   + "Traceback (most recent call last):\n"
                   + '  File "engine.py", line 3, in step\n    raise RuntimeError("CUDA out of memory")\n'
                   + "RuntimeError: CUDA out of memory\n"
                   + json.dumps({"level": "error", "msg": "engine step failed", "error": "later"}) + "\n")
    assert first_error_line(log) == "looprl serving serve: an error of the previous run"
    assert first_error_line(log, offset=len(old)) == "RuntimeError: CUDA out of memory"
    assert first_error_line(log, offset=len(old), warnings=True) == "response not logged: kafka down"
    err = {"level": "error", "msg": "engine step failed", "error": "boom", "exc": "Traceback ...\nValueError: boom"}
    log.write_text(json.dumps({"level": "info", "msg": "ok"}) + "\n" + json.dumps(err) + "\n")
    assert first_error_line(log) == "engine step failed: boom (ValueError: boom)"
    assert first_error_line(tmp_path / "missing.log") is None


# --------------------------------------------------------------------------- per-stage figures
def test_serving_failures_are_read_from_the_serving_tiers_own_metrics():
    from prometheus_client import REGISTRY

    import looprl.serving.metrics as m

    before, _ = stage_counts("serve", generate_latest(REGISTRY).decode())
    for _ in range(3):
        m.REQUESTS.labels(endpoint="chat", status="500").inc()
    m.REQUESTS.labels(endpoint="completions", status="200").inc()
    m.REQUESTS.labels(endpoint="health", status="200").inc()  # probes are not requests users made
    failed_counter = getattr(m, "REQUESTS_FAILED", None)
    if failed_counter is not None:  # the per-adapter failure counter, where the server has it
        for _ in range(3):
            failed_counter.labels(adapter="base", reason="engine").inc()
    after, started = stage_counts("serve", generate_latest(REGISTRY).decode())
    assert after.total - before.total == 4 and after.failed - before.failed == 3
    assert started is not None  # process_start_time_seconds: restarts are told apart by it
    if failed_counter is not None:
        assert after.failed_by["base"] - before.failed_by.get("base", 0) == 3


def test_each_stage_counts_its_own_failures():
    r = CollectorRegistry()
    col = Counter("looprl_ingest_collector_requests_total", "", ["code"], registry=r)
    col.labels(code="200").inc(8)
    col.labels(code="400").inc(1)
    col.labels(code="503").inc(2)
    runs = Counter("looprl_scheduler_job_runs_total", "", ["job", "outcome"], registry=r)
    runs.labels(job="policy", outcome="success").inc(3)
    runs.labels(job="policy", outcome="timeout").inc(1)
    upd = Counter("looprl_reward_updates_total", "", ["result"], registry=r)
    upd.labels(result="skipped").inc(50)
    upd.labels(result="published").inc(2)
    upd.labels(result="failed").inc(1)
    text = generate_latest(r).decode()
    c, _ = stage_counts("collector", text)
    assert (c.unit, c.total, c.failed) == ("requests", 11, 2)  # a refused event is the sender's error
    s, _ = stage_counts("scheduler", text)
    assert (s.unit, s.total, s.failed, s.failed_by) == ("runs", 4, 1, {"timeout": 1})
    w, _ = stage_counts("reward", text)
    assert (w.total, w.failed) == (3, 1)  # polls that found nothing new are not updates
    # a server without a serving counter yet: its 5xx answers
    srv = CollectorRegistry()
    req = Counter("looprl_serving_requests_total", "", ["endpoint", "status"], registry=srv)
    req.labels(endpoint="chat", status="500").inc(4)
    req.labels(endpoint="chat", status="404").inc(1)
    req.labels(endpoint="completions", status="200").inc(5)
    v, _ = stage_counts("serve", generate_latest(srv).decode())
    assert (v.total, v.failed) == (10, 4)


class FakeSupervisor:
    def __init__(self, log_dir: Path, names: list[str]):
        self.log_dir = log_dir
        self.procs = {n: type("P", (), {"last_exit": None})() for n in names}
        self.up = {n: True for n in names}
        self.restart_counts = {n: 0 for n in names}

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def alive(self, name: str) -> bool:
        return self.up[name]

    def restarts(self, name: str) -> int:
        return self.restart_counts[name]


def test_the_demo_monitor_stops_on_a_serving_tier_answering_500_and_everything_shows_it(tmp_path, capsys):
    """The issue's incident: every request answered 500. The monitor reads the server's /metrics
    and the simulator's status file; after a minute it names the cause, and the live view, the
    progress line, the health file and `looprl status` all show the failures per stage."""
    from rich.console import Console

    from looprl.ops.cli import main
    from looprl.ops.demo import _plain, render
    from looprl.ops.sim.records import simulator_dir
    from looprl.storage.registry import atomic_write_text

    cfg = load_config(environ={}, workspace=tmp_path / "ws")
    logs = tmp_path / "ws" / "logs"
    logs.mkdir(parents=True)
    (logs / "serve.log").write_text("looprl serving serve: from an earlier run\n")
    sup = FakeSupervisor(logs, ["collector", "serve", "simulator"])
    clock = [0.0]
    served = {"ok": 40.0, "failed": 0.0}
    collector = CollectorRegistry()
    Counter("looprl_ingest_collector_requests_total", "", ["code"], registry=collector).labels(code="200").inc(7)

    def fetch(url: str) -> str:
        r = CollectorRegistry()
        c = Counter("looprl_serving_requests_total", "", ["endpoint", "status"], registry=r)
        c.labels(endpoint="chat", status="200").inc(served["ok"])
        if served["failed"]:
            c.labels(endpoint="chat", status="500").inc(served["failed"])
        return generate_latest(r if "serve" in url else collector).decode()

    mon = StageMonitor(cfg, sup, {"serve": "http://serve/metrics", "collector": "http://collector/metrics"},
                       clock=lambda: clock[0], fetch=fetch)
    with open(logs / "serve.log", "a") as f:
        f.write(json.dumps({"level": "info", "msg": "serving"}) + "\n")
        f.write(json.dumps({"level": "error", "msg": "engine step failed", "error": "adapter policy-v3 broken"}) + "\n")
    sim_started = time.time()
    for t in range(0, 100, 2):
        clock[0] = float(t)
        if t >= 20:
            served["failed"] += 10
        atomic_write_text(simulator_dir(cfg) / "status.json", json.dumps(
            {"started": sim_started, "train_requests": 40, "serving_requests": 40 + served["failed"],
             "serving_failed": served["failed"]}))
        failure = mon.poll()
        if failure:
            break
    assert failure is not None and clock[0] == 80.0  # answering 500 since t=20, stopped at t=80
    assert failure.first_error == "engine step failed: adapter policy-v3 broken"
    assert failure.log == str(logs / "serve.log")
    assert failure.lines()[0].startswith("looprl demo: stopping: serve failed more than 20% of its requests")

    health = read_health(cfg)
    serve, sim, col = health["stages"]["serve"], health["stages"]["simulator"], health["stages"]["collector"]
    assert serve["failed"] == 310 and serve["requests"] == 350 and serve["error_rate"] == 1.0
    assert sim["failed"] == 310 and col["requests"] == 7 and col["failed"] == 0
    assert health["failure"]["first_error"] == failure.first_error

    snap = {"sim": {"train_requests": 40, "serving_failed": 310}, "reward_versions": 0, "reward_latest": None,
            "reward_preq": None, "policy_versions": 0, "ppo_steps": 0, "kl_last": None, "promoted": None,
            "canary": None, "statuses": {}, "runs": [], "health": mon.health()}
    line = _plain(snap, 80)
    assert "requests 40 (310 failed)" in line
    assert "serve 310/350 requests failed (100% last min)" in line and "collector 0/7 requests failed" in line
    serve_row = re.compile(r"serve\s+│\s+yes\s+│\s+0 \(total 0\)\s+│\s+350 requests\s+│\s+310\s+│\s+100%")
    console = Console(record=True, width=200)
    console.print(render(snap, 80, 120))
    view = console.export_text()
    assert serve_row.search(view), view

    rc = main(["--workspace", str(tmp_path / "ws"), "status"])
    out = capsys.readouterr().out
    assert rc == 1  # a failure is recorded
    assert serve_row.search(out), out
    assert "first error: engine step failed: adapter policy-v3 broken" in out and str(logs / "serve.log") in out


def test_status_without_a_demo_says_so(tmp_path, capsys):
    from looprl.ops.cli import main

    assert main(["--workspace", str(tmp_path / "ws"), "status"]) == 2
    assert "looprl demo" in capsys.readouterr().err


def test_the_report_names_the_failure_and_the_stages(tmp_path):
    from looprl.ops.report import write_report

    cfg = load_config(environ={}, workspace=tmp_path / "ws")
    extra = {"failure": {"stage": "serve", "reason": "serve restarted 4 times in the last 5 min (limit 3)",
                         "first_error": "looprl serving serve: no base", "log": "/ws/logs/serve.log"},
             "stages": {"serve": {"restarts": 4, "unit": None},
                        "collector": {"restarts": 0, "unit": "requests", "counts_failures": True, "requests": 9,
                                      "failed": 3, "error_rate": 0.25}}}
    out, summary = write_report(cfg, extra=extra)
    md = (out / "report.md").read_text()
    assert "**serve restarted 4 times in the last 5 min (limit 3)**" in md and "`looprl serving serve: no base`" in md
    assert "| collector | 0 | 9 requests | 3 | 25.0% |" in md
    assert summary["failure"]["stage"] == "serve"


# --------------------------------------------------------------------------- the whole demo
@pytest.mark.slow
def test_demo_whose_serving_stage_always_fails_exits_non_zero_with_the_cause(tmp_path, capsys):
    """`looprl serving serve` exits at every start (its checkpoint is missing): the supervisor restarts it,
    and the fourth restart within five minutes stops the demo with the cause on stdout."""
    from looprl.ops.cli import main

    ws = tmp_path / "ws"
    base = tmp_path / "base"  # enough for the demo to skip building one; the stages before serve
    base.mkdir()              # do not load the model
    (base / "config.json").write_text("{}")
    env = {**os.environ, "LOOPRL_MODEL__BASE_PATH": str(base),
           "LOOPRL_SERVING__BASE_PATH": str(tmp_path / "no-such-checkpoint"),
           "LOOPRL_DEMO__RESTART_BACKOFF_SECONDS": "0.1"}  # the restarts themselves are what is tested
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "looprl.ops.cli", "--workspace", str(ws), "demo", "--no-ui",
                        "--minutes", "2"], env=env, capture_output=True, text=True, timeout=170)
    elapsed = time.monotonic() - t0
    assert p.returncode == 1, p.stdout + p.stderr[-3000:]
    m = re.search(r"looprl demo: stopping: serve restarted (\d+) times in the last 5 min \(limit 3\)", p.stdout)
    assert m and int(m.group(1)) > 3, p.stdout
    assert (f"first error: looprl serving serve: base model directory {tmp_path / 'no-such-checkpoint'} has no config.json"
            in p.stdout), p.stdout
    assert f"log: {ws / 'logs' / 'serve.log'}" in p.stdout
    assert p.stdout.rstrip().endswith(f"log: {ws / 'logs' / 'serve.log'}")  # the last thing it says
    assert "simulator ready" not in p.stdout and elapsed < 100, (elapsed, p.stdout)

    assert main(["--workspace", str(ws), "status"]) == 1
    out = capsys.readouterr().out
    assert "looprl demo: not running" in out
    assert re.search(r"serve\s+│\s+no\s+│\s+[4-9] \(total [4-9]\)", out), out
    assert "first error: looprl serving serve: base model directory" in out
