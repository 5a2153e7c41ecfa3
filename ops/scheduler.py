"""The retraining scheduler: decides *when* the reward model and the policy are retrained, never
lets a job overlap itself, retries failures with backoff, keeps a queryable history, and (through
a hook) drives the online canary.

    every scheduler.poll_seconds:
        for each job:  running?  -> collect the result when done (success / failed / timeout)
                       held?     -> wait (a canary is being judged, the reward model is not ready)
                       failed?   -> retry after backoff_seconds * 2^(attempt-1) (capped), up to max_retries
                       idle?     -> launch if any trigger fires (schedule, new feedback, accuracy drop,
                                    a new reward version, `looprl scheduler trigger JOB`)
        run the hooks (canary step)

A job is a `looprl` command (``scheduler.reward_command``, ``scheduler.policy_command``) run by a
runner (``looprl.ops.runners``): in a Ray worker by default, a local subprocess with ``runner =
"subprocess"``. History: SQLite at ``<state>/scheduler/runs.sqlite`` (``looprl scheduler runs``).
Overlap: a per-job lock file, held while the job runs, so even two scheduler processes cannot
overlap a job.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

from croniter import croniter
from prometheus_client import Counter, Gauge, Histogram

from looprl.ops.canary import CanaryManager
from looprl.ops.commands import looprl_argv
from looprl.ops.core.config import LooprlConfig
from looprl.ops.core.locks import LockHeld, try_lock
from looprl.ops.core.log import get_logger
from looprl.ops.core.retry import backoff_seconds
from looprl.ops.runners import TAIL_CHARS, Handle, NotStarted, RayRunner, Runner, SubprocessRunner
from looprl.reward.readiness import new_feedback_count, not_ready_for_ppo, prequential_accuracies
from looprl.storage.registry import Registry, atomic_write_text
from looprl.storage.releases import canary_version

if TYPE_CHECKING:
    from filelock import FileLock

log = get_logger(__name__)

RUNS = Counter("looprl_scheduler_job_runs_total", "Finished job runs", ["job", "outcome"])
RETRIES = Counter("looprl_scheduler_job_retries_total", "Job runs started as a retry of a failed run", ["job"])
TRIGGERS = Counter("looprl_scheduler_triggers_total", "Triggers that launched a job", ["job", "trigger"])
RUNNING = Gauge("looprl_scheduler_running_jobs", "1 while the job runs", ["job"])
CONSECUTIVE_FAILURES = Gauge("looprl_scheduler_consecutive_failures", "Failed runs since the last success", ["job"])
LAST_SUCCESS = Gauge("looprl_scheduler_last_success_timestamp_seconds", "Unix time of the last successful run", ["job"])
DURATION = Histogram("looprl_scheduler_job_duration_seconds", "Wall time of job runs", ["job"],
                     buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1200, 3600))
TICKS = Counter("looprl_scheduler_ticks_total", "Scheduler loop iterations")


# --------------------------------------------------------------------------- history
class History:
    """Every run with its trigger, attempt, outcome and details, in SQLite (WAL: readers never block)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS runs (id INTEGER PRIMARY KEY AUTOINCREMENT, job TEXT NOT NULL, "
                "trigger TEXT NOT NULL, attempt INTEGER NOT NULL, status TEXT NOT NULL, started_at REAL NOT NULL, "
                "finished_at REAL, returncode INTEGER, details TEXT, error TEXT)"
            )

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30)
        db.row_factory = sqlite3.Row
        return db

    def start(self, job: str, trigger: str, attempt: int, at: float) -> int:
        with self._lock, self._connect() as db:
            cur = db.execute("INSERT INTO runs (job, trigger, attempt, status, started_at) VALUES (?, ?, ?, 'running', ?)",
                             (job, trigger, attempt, at))
            return int(cur.lastrowid)

    def finish(self, run_id: int, status: str, at: float, returncode: int | None, details: dict, error: str = "") -> None:
        with self._lock, self._connect() as db:
            db.execute("UPDATE runs SET status=?, finished_at=?, returncode=?, details=?, error=? WHERE id=?",
                       (status, at, returncode, json.dumps(details, default=str), error[-TAIL_CHARS:], run_id))

    def running_rows(self) -> list[dict[str, Any]]:
        """Runs recorded as running (by this or another, possibly dead, scheduler)."""
        with self._lock, self._connect() as db:
            return [dict(r) for r in db.execute("SELECT * FROM runs WHERE status='running'")]

    def runs(self, job: str | None = None, limit: int = 50, status: str | None = None) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        sql, args = "SELECT * FROM runs", []
        where = []
        if job:
            where.append("job=?")
            args.append(job)
        if status:
            where.append("status=?")
            args.append(status)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(int(limit))
        with self._connect() as db:
            rows = [dict(r) for r in db.execute(sql, args)]
        for r in rows:
            r["details"] = json.loads(r["details"]) if r.get("details") else {}
        return rows

    def last(self, job: str, status: str | None = None) -> dict[str, Any] | None:
        rows = self.runs(job, limit=1, status=status)
        return rows[0] if rows else None


def history_path(cfg: LooprlConfig) -> Path:
    return cfg.state_dir / "scheduler" / "runs.sqlite"


# --------------------------------------------------------------------------- triggers
@dataclass
class JobState:
    name: str
    running: Handle | None = None
    run_id: int | None = None
    started_at: float = 0.0
    attempt: int = 0  # attempt number of the current/last run (1 = first try)
    trigger: str = ""
    retry_at: float | None = None
    last_started: float | None = None
    last_finished: float | None = None
    consecutive_failures: int = 0
    lock: FileLock | None = None  # held while the job runs
    memo: dict[str, Any] = field(default_factory=dict)  # triggers' own bookkeeping


class Trigger(Protocol):
    name: str

    def check(self, now: float, state: JobState) -> str | None:
        """A short reason when the job should run now, else None."""


class IntervalTrigger:
    name = "schedule"

    def __init__(self, seconds: float, start: float | None = None):
        self.seconds, self.start = seconds, start if start is not None else time.time()

    def check(self, now: float, state: JobState) -> str | None:
        last = state.last_started if state.last_started is not None else self.start
        return f"every {self.seconds:g}s" if now - last >= self.seconds else None


class CronTrigger:
    """Fires at the first time of the cron expression (UTC) after the job last started."""

    name = "schedule"

    def __init__(self, expr: str, start: float | None = None):
        croniter(expr)  # a bad expression fails here, not at the first check
        self.expr = expr
        self.start = start if start is not None else time.time()

    def check(self, now: float, state: JobState) -> str | None:
        last = state.last_started if state.last_started is not None else self.start
        due = croniter(self.expr, last).get_next(float)
        return f"cron {self.expr}" if now >= due else None


class CountTrigger:
    """Fires when ``count()`` (e.g. new feedback events since the last reward version) reaches a threshold."""

    name = "feedback"

    def __init__(self, count: Callable[[], int], threshold: int, what: str = "new feedback events"):
        self.count, self.threshold, self.what = count, threshold, what

    def check(self, now: float, state: JobState) -> str | None:
        try:
            n = self.count()
        except Exception as e:  # the log may not exist yet
            log.debug("count trigger unavailable", error=str(e)[:200])
            return None
        return f"{n} {self.what} >= {self.threshold}" if n >= self.threshold else None


class AccuracyDropTrigger:
    """Fires once per observation when the newest prequential accuracy is more than ``drop`` below
    the best of the earlier ones. ``observations()`` returns [(key, accuracy), ...] oldest first."""

    name = "accuracy_drop"

    def __init__(self, observations: Callable[[], list[tuple[str, float]]], drop: float, window: int = 5):
        self.observations, self.drop, self.window = observations, drop, window

    def check(self, now: float, state: JobState) -> str | None:
        try:
            obs = self.observations()
        except Exception as e:
            log.debug("accuracy source unavailable", error=str(e)[:200])
            return None
        if len(obs) < 2 or self.drop <= 0:
            return None
        key, acc = obs[-1]
        best = max(a for _, a in obs[-1 - self.window:-1])
        if best - acc > self.drop and state.memo.get("accuracy_fired_for") != key:
            state.memo["accuracy_fired_for"] = key
            return f"prequential accuracy {acc:.3f} dropped {best - acc:.3f} below {best:.3f} ({key})"
        return None


class ChangeTrigger:
    """Fires when ``current()`` (e.g. the newest reward version) differs from what the job last ran on."""

    name = "new_version"

    def __init__(self, current: Callable[[], str | None], what: str = "reward version"):
        self.current, self.what = current, what

    def check(self, now: float, state: JobState) -> str | None:
        try:
            cur = self.current()
        except Exception:
            return None
        if cur is None or state.memo.get("ran_on") == cur:
            return None
        state.memo["pending_version"] = cur
        return f"new {self.what} {cur}"


class ManualTrigger:
    """`looprl scheduler trigger JOB` drops a file in ``<state>/scheduler/triggers``; it is consumed at launch."""

    name = "manual"

    def __init__(self, directory: Path, job: str):
        self.dir, self.job = Path(directory), job

    def pending(self) -> list[Path]:
        return sorted(self.dir.glob(f"{self.job}.*.json")) if self.dir.is_dir() else []

    def check(self, now: float, state: JobState) -> str | None:
        files = self.pending()
        if not files:
            return None
        try:
            reason = json.loads(files[0].read_text()).get("reason", "")
        except (OSError, ValueError):
            reason = ""
        return f"manual: {reason}" if reason else "manual"

    def consume(self) -> None:
        for p in self.pending():
            p.unlink(missing_ok=True)


def request_trigger(cfg: LooprlConfig, job: str, reason: str = "") -> Path:
    """What `looprl scheduler trigger` does: ask a running scheduler to run ``job`` soon."""
    d = cfg.state_dir / "scheduler" / "triggers"
    # Names sort in request order (the scheduler reports the oldest request's reason): a
    # zero-padded nanosecond stamp, since two requests within one millisecond do happen.
    path = d / f"{job}.{time.time_ns():020d}-{uuid.uuid4().hex[:6]}.json"
    atomic_write_text(path, json.dumps({"job": job, "reason": reason, "at": time.time()}))
    return path


# --------------------------------------------------------------------------- the scheduler
@dataclass
class Job:
    name: str
    command: Any  # argv (subprocess/Ray runners) or a callable (CallableRunner)
    triggers: list[Trigger]
    timeout_s: float = 3600.0
    env: dict[str, str] = field(default_factory=dict)
    # A reason not to start now even if due (e.g. a canary is being judged: a policy run started
    # now would continue from the old promoted adapter). Triggers stay pending meanwhile.
    hold: Callable[[], str | None] | None = None
    # Environment variable set to the run id (e.g. LOOPRL_POLICY__SEED: every PPO run samples
    # differently; a resumed run keeps the seed saved with it).
    seed_env: str | None = None


class Scheduler:
    def __init__(self, jobs: list[Job], runner: Runner, history: History, state_dir: Path, *,
                 max_retries: int = 3, backoff_seconds: float = 5.0, backoff_max_seconds: float = 300.0,
                 max_concurrent: int = 1, hooks: list[Callable[[], Any]] | None = None,
                 clock: Callable[[], float] = time.time):
        names = [j.name for j in jobs]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate job names: {names}")
        self.jobs = {j.name: j for j in jobs}
        self.runner, self.history = runner, history
        self.state_dir = Path(state_dir)
        self.lock_dir = self.state_dir / "scheduler" / "locks"
        self.max_retries, self.backoff, self.backoff_max = max_retries, backoff_seconds, backoff_max_seconds
        self.max_concurrent = max_concurrent
        self.hooks = hooks or []
        self.clock = clock
        self.state = {j.name: JobState(j.name) for j in jobs}
        self._memo_path = self.state_dir / "scheduler" / "memo.json"
        self._load_memo()
        self._recover()

    # ---- persistence of trigger bookkeeping across restarts
    def _load_memo(self) -> None:
        try:
            memo = json.loads(self._memo_path.read_text())
        except (OSError, ValueError):
            memo = {}
        for name, st in self.state.items():
            st.memo.update(memo.get(name, {}))
            last = self.history.last(name)
            if last:
                st.last_started = last["started_at"]
                st.last_finished = last["finished_at"]

    def _save_memo(self) -> None:
        atomic_write_text(self._memo_path, json.dumps({n: s.memo for n, s in self.state.items()}, default=str))

    def _recover(self) -> None:
        """Runs that a killed scheduler left 'running' are retried (the jobs themselves resume)."""
        for row in self.history.running_rows():
            st = self.state.get(row["job"])
            if st is None or not self._try_lock(st):
                continue  # unknown job, or really running in another scheduler process
            self._unlock(st)
            self.history.finish(row["id"], "abandoned", self.clock(), None, {}, "scheduler died during the run")
            st.attempt, st.trigger, st.retry_at = row["attempt"], row["trigger"], self.clock()
            log.warning("run abandoned by a previous scheduler; retrying", job=row["job"], run_id=row["id"])

    # ---- locking: the same job never overlaps itself, even across scheduler processes
    def _try_lock(self, st: JobState) -> bool:
        try:
            st.lock = try_lock(self.lock_dir / f"{st.name}.lock")
        except LockHeld:
            return False
        return True

    def _unlock(self, st: JobState) -> None:
        if st.lock is not None:
            st.lock.release()
            st.lock = None

    def running(self) -> list[str]:
        return [n for n, s in self.state.items() if s.running is not None]

    # ---- one iteration
    def tick(self) -> None:
        TICKS.inc()
        now = self.clock()
        for name, st in self.state.items():
            if st.running is not None and st.running.done():
                self._finish(self.jobs[name], st)
        # Least recently started first: with max_concurrent=1 a job that is always due (busy
        # feedback) cannot starve the other one.
        for name, st in sorted(self.state.items(), key=lambda kv: kv[1].last_started or 0.0):
            if st.running is not None or len(self.running()) >= self.max_concurrent:
                continue
            job = self.jobs[name]
            held = self._held(job)
            if held:
                if st.memo.get("held") != held:
                    log.info("job held", job=name, reason=held)
                    st.memo["held"] = held
                continue
            st.memo.pop("held", None)
            if st.retry_at is not None:
                if now >= st.retry_at:
                    self._launch(job, st, f"retry after {st.trigger}", attempt=st.attempt + 1)
                continue
            for trig in job.triggers:
                reason = trig.check(now, st)
                if reason:
                    if isinstance(trig, ManualTrigger):
                        trig.consume()
                    TRIGGERS.labels(job=name, trigger=trig.name).inc()
                    self._launch(job, st, f"{trig.name}: {reason}", attempt=1)
                    break
        for hook in self.hooks:
            try:
                hook()
            except Exception as e:  # a hook (canary) failure must not stop retraining
                log.exception("scheduler hook failed", hook=getattr(hook, "__qualname__", str(hook)), error=str(e))

    @staticmethod
    def _held(job: Job) -> str | None:
        if job.hold is None:
            return None
        try:
            return job.hold()
        except Exception as e:  # an unreadable pointer must not stop the scheduler
            log.warning("job hold check failed", job=job.name, error=str(e)[:200])
            return None

    def _launch(self, job: Job, st: JobState, trigger: str, attempt: int) -> None:
        if not self._try_lock(st):
            log.info("job already running elsewhere; not starting it again", job=job.name)
            return
        now = self.clock()
        st.attempt, st.trigger, st.retry_at = attempt, trigger, None
        st.started_at = st.last_started = now
        st.run_id = self.history.start(job.name, trigger, attempt, now)
        if attempt > 1:
            RETRIES.labels(job=job.name).inc()
        RUNNING.labels(job=job.name).set(1)
        log.info("job started", job=job.name, trigger=trigger, attempt=attempt, run_id=st.run_id)
        env = {**job.env, **({job.seed_env: str(st.run_id)} if job.seed_env else {})}
        try:
            st.running = self.runner.submit(job.name, job.command, env, job.timeout_s)
        except Exception as e:
            st.running = NotStarted(str(e))
        self._save_memo()

    def _finish(self, job: Job, st: JobState) -> None:
        assert st.running is not None and st.run_id is not None
        res = st.running.result()
        now = self.clock()
        st.running = None
        st.last_finished = now
        self._unlock(st)
        RUNNING.labels(job=job.name).set(0)
        DURATION.labels(job=job.name).observe(now - st.started_at)
        outcome = "success" if res.returncode == 0 else ("timeout" if res.timed_out else "failed")
        RUNS.labels(job=job.name, outcome=outcome).inc()
        self.history.finish(st.run_id, outcome, now, res.returncode, res.details,
                            "" if outcome == "success" else res.output_tail)
        if outcome == "success":
            st.consecutive_failures = 0
            LAST_SUCCESS.labels(job=job.name).set(now)
            if "pending_version" in st.memo:
                st.memo["ran_on"] = st.memo.pop("pending_version")
            log.info("job succeeded", job=job.name, run_id=st.run_id, seconds=round(now - st.started_at, 1),
                     details=res.details)
        else:
            st.consecutive_failures += 1
            if st.attempt <= self.max_retries:
                delay = backoff_seconds(st.attempt, self.backoff, self.backoff_max)
                st.retry_at = now + delay
                log.warning("job failed; will retry", job=job.name, run_id=st.run_id, outcome=outcome,
                            attempt=st.attempt, retry_in_s=delay, tail=res.output_tail[-500:])
            else:
                # Gave up on this version: the next new version (or another trigger) starts afresh.
                if "pending_version" in st.memo:
                    st.memo["ran_on"] = st.memo.pop("pending_version")
                log.error("job failed; retries exhausted", job=job.name, run_id=st.run_id, attempts=st.attempt,
                          tail=res.output_tail[-500:])
        CONSECUTIVE_FAILURES.labels(job=job.name).set(st.consecutive_failures)
        self._save_memo()

    # ---- the loop
    def run(self, stop: threading.Event, poll_seconds: float) -> None:
        log.info("scheduler running", jobs=list(self.jobs), poll_seconds=poll_seconds)
        try:
            while not stop.is_set():
                self.tick()
                stop.wait(poll_seconds)
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        for name, st in self.state.items():
            if st.running is not None:
                log.info("cancelling running job", job=name, run_id=st.run_id)
                st.running.cancel()
                if st.run_id is not None:
                    self.history.finish(st.run_id, "abandoned", self.clock(), None, {}, "scheduler stopped")
                st.running = None
                self._unlock(st)
                RUNNING.labels(job=name).set(0)
        self.runner.close()


# --------------------------------------------------------------------------- the production wiring
def canary_being_judged(cfg: LooprlConfig) -> str | None:
    """Policy runs continue from the promoted adapter: wait while a canary may replace it."""
    v = canary_version(Registry(cfg.registry_dir))
    return f"canary {v} is being judged" if v else None


def policy_hold(cfg: LooprlConfig) -> Callable[[], str | None]:
    def hold() -> str | None:
        reason = not_ready_for_ppo(cfg)
        if reason is None and cfg.scheduler.policy_waits_for_canary:
            reason = canary_being_judged(cfg)
        return reason

    return hold


def build_jobs(cfg: LooprlConfig, start: float | None = None) -> list[Job]:
    """The reward and policy jobs with their triggers, as configured."""
    s = cfg.scheduler
    trig_dir = cfg.state_dir / "scheduler" / "triggers"
    schedule: Trigger = CronTrigger(s.cron, start) if s.cron else IntervalTrigger(s.interval_seconds, start)
    jobs = []
    if "reward" in s.jobs:
        jobs.append(Job("reward", looprl_argv(*s.reward_command), [
            ManualTrigger(trig_dir, "reward"),
            CountTrigger(lambda: new_feedback_count(cfg), s.feedback_trigger_events),
            AccuracyDropTrigger(lambda: prequential_accuracies(cfg), s.accuracy_drop_trigger),
            schedule,
        ], timeout_s=s.job_timeout_seconds))
    if "policy" in s.jobs:
        # Back to back: a new reward version starts a policy run against it.
        jobs.append(Job("policy", looprl_argv(*s.policy_command), [
            ManualTrigger(trig_dir, "policy"),
            ChangeTrigger(lambda: Registry(cfg.registry_dir).pointer("reward", "latest")),
            *([] if "reward" in s.jobs else [schedule]),
        ], timeout_s=s.job_timeout_seconds, hold=policy_hold(cfg), seed_env="LOOPRL_POLICY__SEED"))
    return jobs


def build_scheduler(cfg: LooprlConfig, runner: Runner | None = None, with_canary: bool = True) -> Scheduler:
    s = cfg.scheduler
    if runner is None:
        logs = cfg.workspace / "logs"
        runner = RayRunner(cfg, logs) if s.runner == "ray" else SubprocessRunner(logs)
    hooks: list[Callable[[], Any]] = [CanaryManager(cfg).step] if with_canary else []
    return Scheduler(build_jobs(cfg), runner, History(history_path(cfg)), cfg.state_dir,
                     max_retries=s.max_retries, backoff_seconds=s.backoff_seconds,
                     backoff_max_seconds=s.backoff_max_seconds, max_concurrent=s.max_concurrent_jobs, hooks=hooks)
