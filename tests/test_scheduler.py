"""The retraining scheduler: cron subset, triggers, no self-overlap, retries with backoff,
history, and the CLI (`looprl trigger`, `looprl runs`). Jobs here are fakes (callables and tiny
subprocesses); one test runs a job on a real local Ray cluster."""

from __future__ import annotations

import json
import sys
import threading
from datetime import datetime, timezone

import pytest
from prometheus_client import REGISTRY

from looprl.ops.core.config import load_config
from looprl.ops.cron import Cron, CronError
from looprl.ops.scheduler import (
    AccuracyDropTrigger, CallableRunner, ChangeTrigger, CountTrigger, CronTrigger, History, IntervalTrigger, Job,
    JobState, ManualTrigger, Scheduler, SubprocessRunner, history_path, request_trigger,
)


def utc(*a) -> datetime:
    return datetime(*a, tzinfo=timezone.utc)


# --------------------------------------------------------------------------- cron
def test_cron_every_five_minutes():
    c = Cron.parse("*/5 * * * *")
    assert c.next_after(utc(2026, 1, 1, 10, 2, 30)) == utc(2026, 1, 1, 10, 5)
    assert c.next_after(utc(2026, 1, 1, 10, 5)) == utc(2026, 1, 1, 10, 10)
    assert c.next_after(utc(2026, 1, 1, 23, 59)) == utc(2026, 1, 2, 0, 0)


def test_cron_ranges_lists_and_weekdays():
    c = Cron.parse("0,30 9-17/4 * * 1-5")  # 9:00, 9:30, 13:00, 13:30, 17:00, 17:30 on weekdays
    assert c.next_after(utc(2026, 1, 2, 17, 31)) == utc(2026, 1, 5, 9, 0)  # Fri evening -> Mon 9:00
    assert c.next_after(utc(2026, 1, 5, 9, 0)) == utc(2026, 1, 5, 9, 30)
    assert c.next_after(utc(2026, 1, 5, 9, 30)) == utc(2026, 1, 5, 13, 0)
    assert Cron.parse("0 0 * * 7").next_after(utc(2026, 1, 1)) == utc(2026, 1, 4)  # 7 = Sunday


def test_cron_day_of_month_or_day_of_week():
    c = Cron.parse("0 12 13 * 5")  # classic cron: the 13th OR any Friday
    assert c.next_after(utc(2026, 2, 1)) == utc(2026, 2, 6, 12)  # Friday 6th
    assert c.next_after(utc(2026, 2, 10)) == utc(2026, 2, 13, 12)
    assert Cron.parse("0 0 29 2 *").next_after(utc(2026, 3, 1)) == utc(2028, 2, 29)


@pytest.mark.parametrize("expr,field", [("* * *", "5 fields"), ("60 * * * *", "minute"), ("* 24 * * *", "hour"),
                                        ("*/0 * * * *", "minute"), ("* * * JAN *", "month"),
                                        ("* * 0 * *", "day-of-month"), ("5-1 * * * *", "minute")])
def test_cron_errors_name_the_field(expr, field):
    with pytest.raises(CronError, match=field):
        Cron.parse(expr)


def test_cron_that_never_matches_is_an_error():
    with pytest.raises(CronError, match="never matches"):
        Cron.parse("0 0 31 2 *").next_after(utc(2026, 1, 1))


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


def test_manual_trigger_via_looprl_trigger(tmp_path):
    cfg = load_config(environ={}, workspace=tmp_path)
    ran = []
    s = make(tmp_path, [Job("reward", lambda: ran.append(1) or {}, [ManualTrigger(tmp_path / "state/scheduler/triggers", "reward")])])
    s.tick()
    assert ran == []
    from looprl.ops.cli import main

    assert main(["--workspace", str(tmp_path), "trigger", "reward", "--reason", "new data drop"]) == 0
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
    from looprl.ops.cli import main

    cfg = load_config(environ={}, workspace=tmp_path)
    h = History(history_path(cfg))
    rid = h.start("policy", "new_version: new reward version v3", 1, 100.0)
    h.finish(rid, "success", 160.0, 0, {"version": "v4", "decision": "gated"})
    rid = h.start("reward", "manual", 1, 200.0)
    h.finish(rid, "failed", 201.0, 1, {}, "Traceback: boom")
    assert main(["--workspace", str(tmp_path), "runs", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["job"], r["status"]) for r in rows] == [("reward", "failed"), ("policy", "success")]
    assert rows[1]["details"]["version"] == "v4"
    assert main(["--workspace", str(tmp_path), "runs", "--job", "policy", "--json"]) == 0
    assert [r["job"] for r in json.loads(capsys.readouterr().out)] == ["policy"]
    assert main(["--workspace", str(tmp_path), "runs"]) == 0
    out = capsys.readouterr().out
    assert "policy" in out and "failed" in out


def test_a_job_runs_on_ray(tmp_path):
    """RayRunner: the job is a Ray task; the command inside it learns the cluster address (so the
    PPO trainer joins this cluster instead of starting its own)."""
    import ray

    from looprl.ops.scheduler import RayRunner

    cfg = load_config(environ={}, workspace=tmp_path / "ws")
    runner = RayRunner(cfg)
    try:
        cmd = [sys.executable, "-c", "import json, os; print(json.dumps({'addr': os.environ['LOOPRL_POLICY__RAY_ADDRESS'],"
               " 'pid': os.getpid()}))"]
        s = make(tmp_path, [Job("policy", cmd, [Fires()])], runner=runner)
        s.tick()
        wait_idle(s, timeout=120)
        row = s.history.last("policy")
        assert row["status"] == "success", row
        assert row["details"]["addr"] == runner.address == ray.get_runtime_context().gcs_address
    finally:
        runner.close()
        if ray.is_initialized():
            ray.shutdown()


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
    import torch
    from safetensors.torch import save_file

    from looprl.ops.scheduler import build_jobs
    from looprl.storage.registry import Registry

    cfg = load_config(environ={}, workspace=tmp_path)
    [policy] = [j for j in build_jobs(cfg) if j.name == "policy"]
    assert policy.hold() is None
    src = tmp_path / "a"
    src.mkdir()
    save_file({"w": torch.zeros(1)}, str(src / "adapter_model.safetensors"))
    reg = Registry(cfg.registry_dir)
    v = reg.publish("policy", src, base_checksum="x").version
    reg.set_pointer("policy", "canary", v)
    assert policy.hold() == f"canary {v} is being judged"


def test_policy_job_waits_for_a_reward_model_that_beats_chance(tmp_path):
    import torch
    from safetensors.torch import save_file

    from looprl.ops.scheduler import build_jobs
    from looprl.storage.registry import Registry

    cfg = load_config(environ={}, workspace=tmp_path, scheduler={"policy_min_reward_pair_accuracy": 0.8,
                                                                 "policy_min_reward_pairs": 20})
    [policy] = [j for j in build_jobs(cfg) if j.name == "policy"]
    assert policy.seed_env == "LOOPRL_POLICY__SEED"
    assert policy.hold() == "no reward model yet"
    src = tmp_path / "r"
    src.mkdir()
    save_file({"w": torch.zeros(1)}, str(src / "head.safetensors"))
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
