"""The retraining scheduler: cron schedules, triggers, no self-overlap, retries with backoff,
history, and the CLI (`looprl scheduler trigger`, `looprl scheduler runs`). Jobs here are fakes
(callables and tiny subprocesses); one test runs jobs in the workers of a real local Ray cluster."""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from datetime import datetime, timezone

import numpy as np
import pytest
import ray
from prometheus_client import REGISTRY
from safetensors.numpy import save_file

from looprl.ops.cli import main
from looprl.ops.core.config import ConfigError, load_config
from looprl.ops.runners import CallableRunner, RayRunner, SubprocessRunner, process_gone, python_entry
from looprl.ops.supervisor import free_port
from looprl.ops.scheduler import (
    AccuracyDropTrigger, ChangeTrigger, CountTrigger, CronTrigger, History, IntervalTrigger, Job, JobState,
    ManualTrigger, Scheduler, build_jobs, history_path, request_trigger,
)
from looprl.storage.registry import Registry


def utc(*a) -> datetime:
    return datetime(*a, tzinfo=timezone.utc)


# --------------------------------------------------------------------------- cron
@pytest.mark.parametrize("expr,last,due", [
    ("*/5 * * * *", utc(2026, 1, 1, 10, 2, 30), utc(2026, 1, 1, 10, 5)),
    ("*/5 * * * *", utc(2026, 1, 1, 10, 5), utc(2026, 1, 1, 10, 10)),
    ("*/5 * * * *", utc(2026, 1, 1, 23, 59), utc(2026, 1, 2, 0, 0)),
    ("0,30 9-17/4 * * 1-5", utc(2026, 1, 2, 17, 31), utc(2026, 1, 5, 9, 0)),  # Fri evening -> Mon 9:00
    ("0 0 * * 7", utc(2026, 1, 1), utc(2026, 1, 4)),  # 7 = Sunday
    ("0 12 13 * 5", utc(2026, 2, 1), utc(2026, 2, 6, 12)),  # classic cron: the 13th OR any Friday
    ("0 12 13 * 5", utc(2026, 2, 10), utc(2026, 2, 13, 12)),
    ("0 0 29 2 *", utc(2026, 3, 1), utc(2028, 2, 29)),
    ("30 6 * JAN MON", utc(2026, 1, 6), utc(2026, 1, 12, 6, 30)),  # names
])
def test_cron_trigger_fires_at_the_first_time_after_the_last_start_in_utc(expr, last, due):
    t, st = CronTrigger(expr), JobState("j", last_started=last.timestamp())
    assert t.check(due.timestamp() - 1, st) is None
    assert t.check(due.timestamp(), st) == f"cron {expr}"


@pytest.mark.parametrize("expr", ["* * *", "60 * * * *", "* 24 * * *", "*/0 * * * *", "* * 0 * *", "0 0 31 2 *"])
def test_a_bad_or_never_firing_cron_is_a_config_error_naming_the_key(expr):
    with pytest.raises(ConfigError, match=r"config key 'scheduler\.cron'"):
        load_config(environ={}, scheduler={"cron": expr})
    with pytest.raises(ConfigError, match=r"scheduler\.cron"):
        load_config(environ={"LOOPRL_SCHEDULER__CRON": expr})


def test_build_jobs_schedules_by_cron_when_set(tmp_path):
    cfg = load_config(environ={}, workspace=tmp_path, scheduler={"jobs": ["policy"], "cron": "0 3 * * *"})
    [policy] = build_jobs(cfg, start=utc(2026, 1, 1).timestamp())
    [cron] = [t for t in policy.triggers if isinstance(t, CronTrigger)]
    assert not any(isinstance(t, IntervalTrigger) for t in policy.triggers)
    assert cron.check(utc(2026, 1, 1, 3).timestamp(), JobState("policy")) == "cron 0 3 * * *"


# --------------------------------------------------------------------------- triggers
def test_interval_and_cron_triggers():
    st = JobState("j")
    t = IntervalTrigger(60, start=1000.0)
    assert t.check(1059, st) is None and t.check(1060, st)
    st.last_started = 1100.0
    assert t.check(1150, st) is None and t.check(1160, st)
    c = CronTrigger("*/5 * * * *", start=utc(2026, 1, 1, 10, 1).timestamp())
    assert c.check(utc(2026, 1, 1, 10, 4).timestamp(), JobState("c")) is None
    assert c.check(utc(2026, 1, 1, 10, 5).timestamp(), JobState("c"))


def test_count_accuracy_and_change_triggers():
    n = {"v": 5}
    t = CountTrigger(lambda: n["v"], 10)
    assert t.check(0, JobState("r")) is None
    n["v"] = 12
    assert "12 new feedback events >= 10" in t.check(0, JobState("r"))
    broken = CountTrigger(lambda: 1 / 0, 1)
    assert broken.check(0, JobState("r")) is None  # an unavailable source never fires

    obs = [("v1", 0.70), ("v2", 0.72)]
    a, st = AccuracyDropTrigger(lambda: obs, drop=0.1), JobState("r")
    assert a.check(0, st) is None
    obs.append(("v3", 0.55))
    assert "dropped" in a.check(0, st)
    assert a.check(0, st) is None  # once per observation

    cur = {"v": None}
    ch, st = ChangeTrigger(lambda: cur["v"]), JobState("p")
    assert ch.check(0, st) is None
    cur["v"] = "v1"
    assert ch.check(0, st) == "new reward version v1"


# --------------------------------------------------------------------------- the scheduler with fake jobs
class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def wait_idle(s: Scheduler, timeout: float = 10.0) -> None:
    """Tick until no job is running (fake jobs finish in milliseconds)."""
    ev = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if not s.running():
            return
        ev.wait(0.01)
        s.tick()
    raise AssertionError("jobs still running")


def make(tmp_path, jobs, clock=None, **kw) -> Scheduler:
    return Scheduler(jobs, kw.pop("runner", CallableRunner()), History(tmp_path / "state/scheduler/runs.sqlite"),
                     tmp_path / "state", clock=clock or Clock(), **kw)


class Always:
    name = "always"

    def check(self, now, state):
        return "always due"


class Fires:
    """A manual trigger: due on its first `times` checks, then never again."""

    name = "manual"

    def __init__(self, times: int = 1, reason: str = "go"):
        self.left, self.reason = times, reason

    def check(self, now, state):
        if self.left > 0:
            self.left -= 1
            return self.reason
        return None


def test_a_job_never_overlaps_itself(tmp_path):
    release, started = threading.Event(), []

    def slow():
        started.append(1)
        assert release.wait(10)
        return {"ok": True}

    s = make(tmp_path, [Job("reward", slow, [Always()])])
    for _ in range(20):
        s.tick()
    assert s.running() == ["reward"] and len(started) == 1
    # a second scheduler process on the same state dir cannot start it either (file lock)
    s2 = make(tmp_path, [Job("reward", slow, [Always()])])
    s2.tick()
    assert s2.running() == [] and len(started) == 1
    s.jobs["reward"].triggers = []
    release.set()
    wait_idle(s)
    rows = s.history.runs("reward")
    assert [r["status"] for r in rows] == ["success"]  # the second instance neither ran nor abandoned it


def test_jobs_run_back_to_back_and_an_always_due_job_cannot_starve_another(tmp_path):
    clock = Clock()
    release = threading.Event()
    s = make(tmp_path, [Job("reward", lambda: release.wait(10) and {}, [Always()]),
                        Job("policy", lambda: {}, [Always()])], max_concurrent=1, clock=clock)
    s.tick()
    s.tick()
    assert len(s.running()) == 1  # both due, one runs
    release.set()
    for _ in range(400):
        clock.t += 1
        s.tick()
        if len(s.history.runs(limit=100)) >= 6:
            break
        threading.Event().wait(0.005)
    s.jobs["reward"].triggers = s.jobs["policy"].triggers = []
    wait_idle(s)
    rows = sorted(s.history.runs(limit=100), key=lambda r: r["id"])
    order = [r["job"] for r in rows]
    assert len(order) >= 6 and all(r["started_at"] >= p["finished_at"] for p, r in zip(rows, rows[1:])), rows
    assert all(a != b for a, b in zip(order, order[1:])), f"jobs did not alternate: {order}"


def test_failed_jobs_retry_with_exponential_backoff(tmp_path):
    clock = Clock()
    calls = []

    def flaky():
        calls.append(clock.t)
        if len(calls) < 3:
            raise RuntimeError(f"boom {len(calls)}")
        return {"version": "v7"}

    before = REGISTRY.get_sample_value("looprl_scheduler_job_retries_total", {"job": "flaky"}) or 0.0
    s = make(tmp_path, [Job("flaky", flaky, [Fires(reason="test")])], clock=clock, max_retries=3, backoff_seconds=10)
    s.tick()
    wait_idle(s)
    assert len(calls) == 1 and s.state["flaky"].retry_at == clock.t + 10
    clock.t += 9.9
    s.tick()
    assert len(calls) == 1  # not before the backoff
    clock.t += 0.2
    s.tick()
    wait_idle(s)
    assert len(calls) == 2 and s.state["flaky"].retry_at == pytest.approx(clock.t + 20)  # doubled
    clock.t += 20
    s.tick()
    wait_idle(s)
    rows = list(reversed(s.history.runs("flaky")))
    assert [(r["attempt"], r["status"]) for r in rows] == [(1, "failed"), (2, "failed"), (3, "success")]
    assert "boom 1" in rows[0]["error"] and rows[2]["details"] == {"version": "v7"}
    assert rows[1]["trigger"].startswith("retry after")
    after = REGISTRY.get_sample_value("looprl_scheduler_job_retries_total", {"job": "flaky"})
    assert after - before == 2
    assert REGISTRY.get_sample_value("looprl_scheduler_consecutive_failures", {"job": "flaky"}) == 0
    assert REGISTRY.get_sample_value("looprl_scheduler_job_runs_total", {"job": "flaky", "outcome": "failed"}) >= 2


def test_retries_are_bounded(tmp_path):
    clock = Clock()
    calls = []
    s = make(tmp_path, [Job("bad", lambda: calls.append(1) or 1 / 0, [Fires()])], clock=clock,
             max_retries=2, backoff_seconds=1, backoff_max_seconds=1.5)
    for _ in range(10):
        s.tick()
        wait_idle(s)
        clock.t += 5
    assert len(calls) == 3  # first try + 2 retries
    assert s.state["bad"].consecutive_failures == 3
    assert REGISTRY.get_sample_value("looprl_scheduler_consecutive_failures", {"job": "bad"}) == 3


def test_change_trigger_runs_once_per_new_version_and_survives_restart(tmp_path):
    cur = {"v": "v1"}
    ran = []
    jobs = lambda: [Job("policy", lambda: ran.append(cur["v"]) or {}, [ChangeTrigger(lambda: cur["v"])])]  # noqa: E731
    s = make(tmp_path, jobs())
    s.tick()
    wait_idle(s)
    s.tick()
    wait_idle(s)
    assert ran == ["v1"]
    s2 = make(tmp_path, jobs())  # a restarted scheduler remembers what it ran on
    s2.tick()
    wait_idle(s2)
    assert ran == ["v1"]
    cur["v"] = "v2"
    s2.tick()
    wait_idle(s2)
    assert ran == ["v1", "v2"]


def test_manual_trigger_via_looprl_scheduler_trigger(tmp_path):
    cfg = load_config(environ={}, workspace=tmp_path)
    ran = []
    s = make(tmp_path, [Job("reward", lambda: ran.append(1) or {}, [ManualTrigger(tmp_path / "state/scheduler/triggers", "reward")])])
    s.tick()
    assert ran == []
    assert main(["--workspace", str(tmp_path), "scheduler", "trigger", "reward", "--reason", "new data drop"]) == 0
    request_trigger(cfg, "reward", "twice")  # coalesced with the first
    s.tick()
    wait_idle(s)
    s.tick()
    wait_idle(s)
    assert ran == [1]
    assert s.history.last("reward")["trigger"].startswith("manual: manual: new data drop")


def test_trigger_requests_in_the_same_millisecond_keep_their_order(tmp_path):
    # Back-to-back requests land in one millisecond; the oldest one's reason must be reported.
    cfg = load_config(environ={}, workspace=tmp_path)
    for i in range(50):
        request_trigger(cfg, "reward", f"r{i}")
    trig = ManualTrigger(cfg.state_dir / "scheduler" / "triggers", "reward")
    reasons = [json.loads(p.read_text())["reason"] for p in trig.pending()]
    assert reasons == [f"r{i}" for i in range(50)]
    assert trig.check(0.0, None) == "manual: r0"


def test_abandoned_runs_are_retried_after_a_scheduler_crash(tmp_path):
    h = History(tmp_path / "state/scheduler/runs.sqlite")
    h.start("reward", "feedback: 300 new", 1, 123.0)  # left 'running' by a SIGKILLed scheduler
    ran = []
    s = make(tmp_path, [Job("reward", lambda: ran.append(1) or {}, [])])
    s.tick()
    wait_idle(s)
    rows = s.history.runs("reward")
    assert [r["status"] for r in rows] == ["success", "abandoned"] and ran == [1]
    assert rows[0]["attempt"] == 2


# --------------------------------------------------------------------------- real commands
def test_subprocess_jobs_report_details_failures_and_timeouts(tmp_path):
    py = sys.executable
    ok = [py, "-c", "import json,sys; print('noise', file=sys.stderr); print(json.dumps({'version': 'v2'}))"]
    bad = [py, "-c", "import sys; print('it broke', file=sys.stderr); sys.exit(3)"]
    slow = [py, "-c", "import time; time.sleep(30)"]
    s = make(tmp_path, [Job("ok", ok, [Fires()]), Job("bad", bad, [Fires()]),
                        Job("slow", slow, [Fires()], timeout_s=1.0)],
             runner=SubprocessRunner(tmp_path / "logs"), max_retries=0, max_concurrent=3)
    s.tick()
    wait_idle(s, timeout=20)
    last = {j: s.history.last(j) for j in ("ok", "bad", "slow")}
    assert last["ok"]["status"] == "success" and last["ok"]["details"] == {"version": "v2"}
    assert last["bad"]["status"] == "failed" and last["bad"]["returncode"] == 3 and "it broke" in last["bad"]["error"]
    assert last["slow"]["status"] == "timeout"
    assert "noise" in (tmp_path / "logs/job-ok.log").read_text()


def test_runs_cli_lists_history(tmp_path, capsys):
    cfg = load_config(environ={}, workspace=tmp_path)
    h = History(history_path(cfg))
    rid = h.start("policy", "new_version: new reward version v3", 1, 100.0)
    h.finish(rid, "success", 160.0, 0, {"version": "v4", "decision": "gated"})
    rid = h.start("reward", "manual", 1, 200.0)
    h.finish(rid, "failed", 201.0, 1, {}, "Traceback: boom")
    assert main(["--workspace", str(tmp_path), "scheduler", "runs", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["job"], r["status"]) for r in rows] == [("reward", "failed"), ("policy", "success")]
    assert rows[1]["details"]["version"] == "v4"
    assert main(["--workspace", str(tmp_path), "scheduler", "runs", "--job", "policy", "--json"]) == 0
    assert [r["job"] for r in json.loads(capsys.readouterr().out)] == ["policy"]
    assert main(["--workspace", str(tmp_path), "scheduler", "runs"]) == 0
    out = capsys.readouterr().out
    assert "policy" in out and "failed" in out


RAY_PROBE = """
import json, os, sys, time
import ray
print(f"pid {os.getpid()} started", file=sys.stderr, flush=True)
if sys.argv[1] == "fail":
    sys.exit(3)
if sys.argv[1] == "hang":
    time.sleep(300)
if sys.argv[1] == "listen":  # like a job's metrics server: a listener its thread keeps open
    import socket, threading
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", int(sys.argv[2])))
    sock.listen()
    threading.Thread(target=sock.accept, daemon=True).start()
print(json.dumps({"pid": os.getpid(), "ray_job": ray.get_runtime_context().get_job_id(),
                  "seed": os.environ.get("LOOPRL_POLICY__SEED"),
                  "preloaded": "looprl.ops.sim.corpus" in sys.modules}))
"""


def _wait_gone(pid: int, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process_gone(pid):
            return True
        time.sleep(0.2)
    return False


def test_jobs_run_inside_ray_workers(tmp_path):
    """RayRunner: a job runs in a fresh worker of the scheduler's Ray cluster, as part of the
    scheduler's own Ray job (no subprocess, no second driver); it gets its environment, reports
    details, failures and timeouts, and its worker is gone when the run ends."""
    probe = tmp_path / "probe.py"
    probe.write_text(RAY_PROBE)
    py, logs = sys.executable, tmp_path / "logs"
    # A module no Ray worker imports by itself shows the preload; one that does not exist must not
    # stop the worker (the job would report the real error).
    cfg = load_config(environ={}, workspace=tmp_path / "ws",
                      scheduler={"preload_modules": ["looprl.ops.sim.corpus", "looprl_no_such_module"]})
    runner = RayRunner(cfg, logs)
    try:
        s = make(tmp_path, [Job("ok", [py, str(probe), "ok"], [Fires()], seed_env="LOOPRL_POLICY__SEED"),
                            Job("bad", [py, str(probe), "fail"], [Fires()]),
                            Job("slow", [py, str(probe), "hang"], [Fires()], timeout_s=20.0)],
                 runner=runner, max_retries=0, max_concurrent=3)
        s.tick()
        wait_idle(s, timeout=180)
        last = {j: s.history.last(j) for j in ("ok", "bad", "slow")}
        ok = last["ok"]
        assert ok["status"] == "success", ok
        assert ok["details"]["ray_job"] == ray.get_runtime_context().get_job_id()
        assert ok["details"]["pid"] != os.getpid() and ok["details"]["seed"] == str(ok["id"])
        assert ok["details"]["preloaded"] is True
        assert last["bad"]["status"] == "failed" and last["bad"]["returncode"] == 3
        assert "started" in last["bad"]["error"]
        assert last["slow"]["status"] == "timeout", last["slow"]
        hung = re.search(r"pid (\d+) started", last["slow"]["error"])  # the run's log up to the timeout
        assert hung, last["slow"]
        assert _wait_gone(ok["details"]["pid"]) and _wait_gone(int(hung.group(1)))
        log_text = (logs / "job-ok.log").read_text()
        assert f"pid {ok['details']['pid']} started" in log_text and '"ray_job"' in log_text
        # The next run gets the spare started while these ran: a new process, preloaded, and the
        # spare left over when the runner closes goes with it.
        s.jobs["ok"].triggers = [Fires()]
        s.tick()
        wait_idle(s, timeout=180)
        again = s.history.last("ok")
        assert again["status"] == "success" and again["details"]["preloaded"] is True
        assert again["details"]["pid"] not in (ok["details"]["pid"], int(hung.group(1)))
        assert _wait_gone(again["details"]["pid"])
        # Back to back, as the scheduler starts them: the second job's warm worker must not meet
        # the first one's listener.
        port = free_port()
        listen = [py, str(probe), "listen", str(port)]
        first = runner.submit("listen", listen, {}, 120).result()
        assert process_gone(first.details["pid"])  # when the result is back, not some time later
        second = runner.submit("listen", listen, {}, 120).result()
        assert (first.returncode, second.returncode) == (0, 0), second.output_tail
        assert first.details["pid"] != second.details["pid"]
        spare = ray.get(runner._spare.pid.remote(), timeout=120)
        runner.close()
        assert _wait_gone(spare)
    finally:
        runner.close()
        if ray.is_initialized():
            ray.shutdown()


def test_ray_runner_refuses_a_command_its_workers_cannot_run():
    with pytest.raises(ValueError, match="python -m MODULE"):
        python_entry(["looprl", "-x"])
    assert python_entry([sys.executable, "-m", "looprl.ops.cli", "policy", "train"]) == (
        "module", "looprl.ops.cli", ["policy", "train"])


def test_a_held_job_waits_and_its_trigger_stays_pending(tmp_path):
    hold = {"reason": "canary v3 is being judged"}
    cur = {"v": "v1"}
    ran = []
    s = make(tmp_path, [Job("policy", lambda: ran.append(cur["v"]) or {}, [ChangeTrigger(lambda: cur["v"])],
                            hold=lambda: hold["reason"])])
    for _ in range(3):
        s.tick()
    assert ran == [] and s.history.runs() == []
    hold["reason"] = None
    s.tick()
    wait_idle(s)
    assert ran == ["v1"]


def test_policy_job_is_held_while_a_canary_runs(tmp_path):
    cfg = load_config(environ={}, workspace=tmp_path)
    [policy] = [j for j in build_jobs(cfg) if j.name == "policy"]
    assert policy.hold() is None
    src = tmp_path / "a"
    src.mkdir()
    save_file({"w": np.zeros(1, np.float32)}, str(src / "adapter_model.safetensors"))
    reg = Registry(cfg.registry_dir)
    v = reg.publish("policy", src, base_checksum="x").version
    reg.set_pointer("policy", "canary", v)
    assert policy.hold() == f"canary {v} is being judged"


def test_policy_job_waits_for_a_reward_model_that_beats_chance(tmp_path):
    cfg = load_config(environ={}, workspace=tmp_path, scheduler={"policy_min_reward_pair_accuracy": 0.8,
                                                                 "policy_min_reward_pairs": 20})
    [policy] = [j for j in build_jobs(cfg) if j.name == "policy"]
    assert policy.seed_env == "LOOPRL_POLICY__SEED"
    assert policy.hold() == "no reward model yet"
    src = tmp_path / "r"
    src.mkdir()
    save_file({"w": np.zeros(1, np.float32)}, str(src / "head.safetensors"))
    reg = Registry(cfg.registry_dir)
    reg.publish("reward", src, base_checksum="x", metrics={"holdout_pair_accuracy": 0.95, "holdout_pairs": 4})
    assert "4 pairs" in policy.hold()  # too little evidence
    reg.publish("reward", src, base_checksum="x", metrics={"holdout_pair_accuracy": 0.7, "holdout_pairs": 40})
    assert "0.7" in policy.hold()
    reg.publish("reward", src, base_checksum="x", metrics={"holdout_pair_accuracy": 0.85, "holdout_pairs": 40})
    # ... and the updater's recent prequential results must agree (not one lucky held-out set)
    assert "prequential pair accuracy None" in policy.hold()
    hist = cfg.state_dir / "reward_history.jsonl"
    hist.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"update": 1, "prequential": {"pairs": 30, "pair_accuracy": 0.5}},
            {"update": 2, "prequential": {"pairs": 10, "pair_accuracy": 0.9}},
            {"update": 3, "prequential": {"pairs": 10, "pair_accuracy": 0.9}}]
    hist.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert "0.660 on 50 pairs" in policy.hold()  # (15 + 9 + 9) / 50, pooled over the last 3 updates
    rows.append({"update": 4, "prequential": {"pairs": 12, "pair_accuracy": 0.75}})
    hist.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert policy.hold() is None  # (9 + 9 + 9) / 32 = 0.84


def test_each_policy_run_gets_its_own_seed(tmp_path):
    seen = []

    class EnvRunner(CallableRunner):
        def submit(self, job, command, env, timeout_s):
            seen.append(env.get("LOOPRL_POLICY__SEED"))
            return super().submit(job, command, env, timeout_s)

    s = make(tmp_path, [Job("policy", lambda: {}, [Fires(times=2)], seed_env="LOOPRL_POLICY__SEED")], runner=EnvRunner())
    for _ in range(2):
        s.tick()
        wait_idle(s)
    ids = [str(r["id"]) for r in sorted(s.history.runs(), key=lambda r: r["id"])]
    assert seen == ids and len(set(seen)) == 2
