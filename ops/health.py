"""Failures are visible: failed requests, error rate and restarts per stage of `looprl demo`, and
the two rules that stop the demo instead of letting it run on a loop that is not working.

* ``FailureWatch`` is the rule book, fed plain numbers (unit-testable, no I/O): cumulative request
  and failure counts per stage, cumulative restart counts per stage. It stops the demo when the
  serving tier answers more than ``demo.failure_rate`` of its requests with an error for
  ``demo.failure_seconds``, or when a stage restarts more than ``demo.max_restarts`` times within
  ``demo.restart_window_seconds``.
* ``StageMonitor`` feeds it in the demo: each stage's own ``/metrics`` (what the stage counted),
  the simulator's status file (requests as the product's users saw them) and the supervisor's
  restart counts. It writes ``<state>/demo/health.json`` for `looprl status`, and on a failure
  finds the first error line in the stage's log.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.request
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from prometheus_client.parser import text_string_to_metric_families
from rich.table import Table

from looprl.ops.core.config import DemoConfig, LooprlConfig
from looprl.ops.core.log import get_logger
from looprl.ops.sim.records import read_status
from looprl.storage.registry import atomic_write_text

log = get_logger(__name__)

# The error-rate rule looks at the failure share of the last RATE_WINDOW_S seconds: short enough
# that recovery shows within a few polls, long enough to hold requests from several users.
RATE_WINDOW_S = 10.0


# --------------------------------------------------------------------------- the rules
@dataclass
class Failure:
    """Why the demo stops: the stage, the rule that fired, and where to look."""

    stage: str
    reason: str
    first_error: str | None = None
    log: str | None = None

    def lines(self) -> list[str]:
        return [f"looprl demo: stopping: {self.reason}",
                f"  first error: {self.first_error or '(no error line in the log since the demo started)'}",
                f"  log: {self.log or '-'}"]


@dataclass
class _Series:
    epoch: Any = None
    last: tuple[float, float] | None = None
    total: float = 0.0
    failed: float = 0.0
    samples: deque = field(default_factory=deque)  # (t, new requests, new failures)
    breach_since: float | None = None


class FailureWatch:
    """Sliding-window failure rules over numbers it is given; ``now`` is any monotonic clock.

    The error-rate rule judges ``rate_stages``: in the demo the serving tier's own counts, what it
    answered. While serve is down and restarting, its users see refused connections (shown on the
    simulator's row); that is the restart rule's to judge, so one planned kill (``--chaos``) does
    not stop the demo while a crash loop does."""

    def __init__(self, *, failure_rate: float = 0.2, failure_seconds: float = 60.0, max_restarts: int = 3,
                 restart_window_s: float = 300.0, rate_stages: Iterable[str] = ("serve",),
                 rate_window_s: float = RATE_WINDOW_S):
        self.failure_rate, self.failure_seconds = failure_rate, failure_seconds
        self.max_restarts, self.restart_window_s = max_restarts, restart_window_s
        self.rate_stages = tuple(rate_stages)
        self.rate_window_s = rate_window_s
        self.series: dict[str, _Series] = {}
        self.restart_total: dict[str, int] = {}
        self.restart_times: dict[str, deque] = {}
        self.failure: Failure | None = None

    @classmethod
    def from_config(cls, d: DemoConfig) -> "FailureWatch":
        return cls(failure_rate=d.failure_rate, failure_seconds=d.failure_seconds, max_restarts=d.max_restarts,
                   restart_window_s=d.restart_window_seconds)

    # ---- feeding
    def observe(self, stage: str, now: float, requests: float, failed: float, epoch: Any = None) -> None:
        """Cumulative counts as the stage reports them. A new ``epoch`` (the process start time) or
        a count that went down means the stage restarted and counts from zero again."""
        s = self.series.setdefault(stage, _Series())
        if s.last is None or epoch != s.epoch or requests < s.last[0] or failed < s.last[1]:
            d_req, d_fail = requests, failed
        else:
            d_req, d_fail = requests - s.last[0], failed - s.last[1]
        s.epoch, s.last = epoch, (requests, failed)
        s.total += d_req
        s.failed += d_fail
        if d_req or d_fail:
            s.samples.append((now, d_req, d_fail))
        horizon = now - max(self.failure_seconds, self.rate_window_s)
        while s.samples and s.samples[0][0] <= horizon:
            s.samples.popleft()

    def observe_restarts(self, stage: str, restarts: int, now: float) -> None:
        """The supervisor's cumulative restart count of ``stage``."""
        times = self.restart_times.setdefault(stage, deque())
        for _ in range(max(0, restarts - self.restart_total.get(stage, 0))):
            times.append(now)
        self.restart_total[stage] = max(restarts, self.restart_total.get(stage, 0))
        while times and times[0] <= now - self.restart_window_s:
            times.popleft()

    # ---- reading
    def _window(self, s: _Series, now: float, seconds: float) -> tuple[float, float]:
        req = fail = 0.0
        for t, r, f in s.samples:
            if t > now - seconds:
                req, fail = req + r, fail + f
        return req, fail

    def recent_restarts(self, stage: str, now: float) -> int:
        return sum(1 for t in self.restart_times.get(stage, ()) if t > now - self.restart_window_s)

    def check(self, now: float) -> Failure | None:
        """Evaluate both rules; the first failure found is kept (the demo stops on it)."""
        for stage, s in self.series.items():
            if stage not in self.rate_stages:
                continue
            req, fail = self._window(s, now, self.rate_window_s)
            if req > 0 and fail / req > self.failure_rate:
                s.breach_since = now if s.breach_since is None else s.breach_since
            elif req > 0:
                s.breach_since = None
            # No requests finished in the window: no evidence either way, the clock keeps running.
        if self.failure is not None:
            return self.failure
        for stage in self.restart_times:
            n = self.recent_restarts(stage, now)
            if n > self.max_restarts:
                self.failure = Failure(stage, f"{stage} restarted {n} times in the last "
                                              f"{_duration(self.restart_window_s)} (limit {self.max_restarts})")
                return self.failure
        for stage in self.rate_stages:
            s = self.series.get(stage)
            if s is None or s.breach_since is None or now - s.breach_since < self.failure_seconds:
                continue
            req, fail = self._window(s, now, self.failure_seconds)
            share = f"{fail / req:.0%}" if req else "-"
            self.failure = Failure(stage, f"{stage} failed more than {self.failure_rate:.0%} of its requests for "
                                          f"{now - s.breach_since:.0f} s ({fail:.0f} of {req:.0f}, {share}, in the "
                                          f"last {self.failure_seconds:.0f} s)")
            return self.failure
        return None

    def figures(self, now: float) -> dict[str, dict[str, Any]]:
        """Per stage, since the watch started: requests and failures, the error rate over the last
        ``failure_seconds``, how long the rate rule has seen it failing, and restarts."""
        out: dict[str, dict[str, Any]] = {}
        for stage, s in self.series.items():
            req, fail = self._window(s, now, self.failure_seconds)
            out[stage] = {"requests": int(s.total), "failed": int(s.failed), "window_requests": int(req),
                          "window_failed": int(fail), "error_rate": fail / req if req else None,
                          "failing_for_s": None if s.breach_since is None else round(now - s.breach_since, 1)}
        for stage, total in self.restart_total.items():
            out.setdefault(stage, {}).update(restarts=total, recent_restarts=self.recent_restarts(stage, now))
        return out


def _duration(seconds: float) -> str:
    return f"{seconds / 60:g} min" if seconds >= 60 and seconds % 60 == 0 else f"{seconds:g} s"


# --------------------------------------------------------------------------- stage counters
class Samples:
    """One /metrics scrape: sample name -> [(labels, value)]."""

    def __init__(self, text: str):
        self.families: set[str] = set()
        self.samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        for fam in text_string_to_metric_families(text):
            self.families.add(fam.name)
            for s in fam.samples:
                self.samples.setdefault(s.name, []).append((s.labels, s.value))

    def has(self, name: str) -> bool:
        return name in self.samples or name.removesuffix("_total") in self.families

    def sum(self, name: str, where: Callable[[dict[str, str]], bool] = lambda _: True) -> float:
        return sum(v for labels, v in self.samples.get(name, ()) if where(labels))

    def by(self, name: str, label: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for labels, v in self.samples.get(name, ()):
            out[labels.get(label, "")] = out.get(labels.get(label, ""), 0.0) + v
        return out

    def value(self, name: str) -> float | None:
        vals = self.samples.get(name)
        return vals[0][1] if vals else None


@dataclass
class Counts:
    unit: str
    total: float
    failed: float | None  # None: the stage does not count failures
    failed_by: dict[str, float] = field(default_factory=dict)


def _server_error(code: str) -> bool:
    return code.startswith("5")


def _serve_counts(s: Samples) -> Counts:
    gen = {"completions", "chat"}  # generation requests, not health probes or admin calls
    total = s.sum("looprl_serving_requests_total", lambda lab: lab.get("endpoint") in gen)
    if s.has("looprl_serving_requests_failed_total"):
        failed = s.sum("looprl_serving_requests_failed_total")
        by = s.by("looprl_serving_requests_failed_total", "adapter")
    else:  # a server without the per-adapter failure counter: its 5xx answers
        failed = s.sum("looprl_serving_requests_total",
                       lambda lab: lab.get("endpoint") in gen and _server_error(lab.get("status", "")))
        by = {}
    return Counts("requests", total, failed, {k: v for k, v in by.items() if v})


def _collector_counts(s: Samples) -> Counts:
    name = "looprl_ingest_collector_requests_total"
    return Counts("requests", s.sum(name), s.sum(name, lambda lab: _server_error(lab.get("code", ""))))


def _ingest_counts(s: Samples) -> Counts:
    dead = s.sum("looprl_ingest_dead_letters_total")
    return Counts("events", s.sum("looprl_ingest_events_total") + dead, dead,
                  {k: v for k, v in s.by("looprl_ingest_dead_letters_total", "reason").items() if v})


def _reward_counts(s: Samples) -> Counts:
    name = "looprl_reward_updates_total"
    return Counts("updates", s.sum(name, lambda lab: lab.get("result") != "skipped"),
                  s.sum(name, lambda lab: lab.get("result") == "failed"))


def _scheduler_counts(s: Samples) -> Counts:
    name = "looprl_scheduler_job_runs_total"
    return Counts("runs", s.sum(name), s.sum(name, lambda lab: lab.get("outcome") != "success"),
                  {k: v for k, v in s.by(name, "outcome").items() if v and k != "success"})


def _controller_counts(s: Samples) -> Counts:
    name = "looprl_controller_reconciles_total"
    return Counts("passes", s.sum(name), s.sum(name, lambda lab: lab.get("result") == "failed"))


def _gateway_counts(s: Samples) -> Counts:
    # answers it gave (5xx, or a stream ended by an error event), and the answers it could not log
    name = "looprl_gateway_requests_total"
    failed = s.sum(name, lambda lab: lab.get("status") == "error" or _server_error(lab.get("status", "")))
    by = {k: v for k, v in s.by(name, "status").items() if v and (k == "error" or _server_error(k))}
    dropped = s.sum("looprl_gateway_response_logs_dropped_total")
    if dropped:
        by["answers not logged"] = dropped
    return Counts("requests", s.sum(name), failed, by)


# What each stage counts, read from its own /metrics.
STAGE_COUNTERS: dict[str, Callable[[Samples], Counts]] = {
    "serve": _serve_counts, "collector": _collector_counts, "ingest": _ingest_counts, "reward": _reward_counts,
    "scheduler": _scheduler_counts, "controller": _controller_counts, "gateway": _gateway_counts,
}


def stage_counts(stage: str, text: str) -> tuple[Counts, float | None]:
    """(counts, process start time) of one stage's /metrics text."""
    s = Samples(text)
    return STAGE_COUNTERS[stage](s), s.value("process_start_time_seconds")


def _fetch(url: str, timeout_s: float = 1.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:  # follows the collector's /metrics -> /metrics/
        return r.read().decode()


# --------------------------------------------------------------------------- the first error line
_TRACEBACK = "Traceback (most recent call last):"
_CLI_ERROR = re.compile(r"^looprl(?: [\w-]+)*: \S")  # `looprl serving serve: ...`: a command's fatal error
_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception|Exit)\b(?::|$)")
_PLAIN_ERROR = re.compile(r"^(?:ERROR|CRITICAL|FATAL)\b")


def _json_error(rec: dict, warnings: bool) -> str | None:
    level = str(rec.get("level", "")).lower()
    if level in ("error", "critical") or (warnings and level == "warning" and rec.get("error")):
        text = str(rec.get("msg", ""))
        if rec.get("error"):
            text += f": {rec['error']}"
        if rec.get("exc"):
            text += f" ({str(rec['exc']).strip().splitlines()[-1]})"
        return text
    return None


def first_error_line(path: Path, offset: int = 0, warnings: bool = False, max_chars: int = 400) -> str | None:
    """The first error in ``path`` after byte ``offset``: a JSON log record at level error (or, with
    ``warnings``, a warning that carries an ``error``), a command's fatal message, or the exception
    line that ends a traceback (its first line says nothing)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    in_traceback = False
    for raw in text.splitlines():
        line = raw.rstrip()
        if not line or line.startswith("===="):
            continue
        if in_traceback:
            if line[0].isspace() or line.startswith(_TRACEBACK):
                continue
            return line[:max_chars]
        if line.startswith(_TRACEBACK):
            in_traceback = True
            continue
        if line.startswith("{"):
            try:
                rec = json.loads(line)
            except ValueError:
                rec = None
            if isinstance(rec, dict):
                found = _json_error(rec, warnings)
                if found:
                    return found[:max_chars]
                continue
        if _CLI_ERROR.match(line) or _EXCEPTION.match(line) or _PLAIN_ERROR.match(line):
            return line[:max_chars]
    return None


# --------------------------------------------------------------------------- the demo's monitor
def health_path(cfg: LooprlConfig) -> Path:
    return cfg.state_dir / "demo" / "health.json"


def read_health(cfg: LooprlConfig) -> dict[str, Any] | None:
    try:
        return json.loads(health_path(cfg).read_text())
    except (OSError, ValueError):
        return None


class StageMonitor:
    """Feeds a ``FailureWatch`` from the running demo and publishes what it sees.

    ``metrics_urls``: stage -> its /metrics URL (stages in ``STAGE_COUNTERS``). ``sup``: the
    demo's ``Supervisor`` (liveness, restarts, log paths)."""

    def __init__(self, cfg: LooprlConfig, sup: Any, metrics_urls: dict[str, str], watch: FailureWatch | None = None,
                 *, interval_s: float = 2.0, clock: Callable[[], float] = time.monotonic,
                 fetch: Callable[[str], str] = _fetch):
        self.cfg, self.sup = cfg, sup
        self.metrics_urls = metrics_urls
        self.watch = watch or FailureWatch.from_config(cfg.demo)
        self.interval_s, self.clock, self.fetch = interval_s, clock, fetch
        self.started_wall = time.time()
        self.running = True  # the demo sets it to False before the last write
        self._last_poll: float | None = None
        self.detail: dict[str, dict[str, Any]] = {}
        # Logs are appended across runs: only what this demo's stages wrote counts.
        self.log_offsets = {n: _size(sup.log_path(n)) for n in sup.procs}

    def poll(self, force: bool = False) -> Failure | None:
        """Restart counts every call; the stages' counters and the health file every ``interval_s``."""
        now = self.clock()
        for name in self.sup.procs:
            self.watch.observe_restarts(name, self.sup.restarts(name), now)
        due = force or self._last_poll is None or now - self._last_poll >= self.interval_s
        if due:
            self._last_poll = now
            self._scrape(now)
        known = self.watch.failure is not None
        failure = self.watch.check(now)
        if failure is not None and not known:
            self.explain(failure)
        if due or (failure is not None and not known):
            self.write()
        return failure

    def _scrape(self, now: float) -> None:
        for stage, url in self.metrics_urls.items():
            if stage not in self.sup.procs or not self.sup.alive(stage):
                continue
            try:
                counts, epoch = stage_counts(stage, self.fetch(url))
            except Exception as e:  # starting, stopping or busy: the next poll reads it
                log.debug("metrics not readable", stage=stage, error=str(e)[:200])
                continue
            self.watch.observe(stage, now, counts.total, counts.failed or 0.0, epoch=epoch)
            self.detail[stage] = {"unit": counts.unit, "counts_failures": counts.failed is not None,
                                  "failed_by": counts.failed_by}
        self._observe_simulator(now)

    def _observe_simulator(self, now: float) -> None:
        """Requests to the serving tier as the simulated users saw them (including those that never
        reached a server), from the status file the simulator rewrites every second."""
        st = read_status(self.cfg)
        if "simulator" not in self.sup.procs or (st.get("started") or 0) < self.started_wall - 1:
            return  # the previous run's file
        self.watch.observe("simulator", now, st.get("serving_requests", 0), st.get("serving_failed", 0),
                           epoch=st.get("started"))
        fb_failed = sum((st.get("feedback_failed") or {}).values())
        self.detail["simulator"] = {"unit": "requests", "counts_failures": True,
                                    "failed_by": {"feedback not delivered": fb_failed} if fb_failed else {}}

    def explain(self, failure: Failure) -> Failure:
        """Fill in the first error line and the log it is in: the failing stage's log, then (for
        serving) the simulator's, which names the error each failed request got."""
        candidates = [failure.stage] + (["simulator"] if failure.stage == "serve" else [])
        candidates = [c for c in candidates if c in self.sup.procs]
        for warnings in (False, True):
            for name in candidates:
                line = first_error_line(self.sup.log_path(name), self.log_offsets.get(name, 0), warnings=warnings)
                if line:
                    failure.first_error, failure.log = line, str(self.sup.log_path(name))
                    return failure
        failure.log = str(self.sup.log_path(failure.stage)) if failure.stage in self.sup.procs else None
        last_exit = getattr(self.sup.procs.get(failure.stage), "last_exit", None)
        if last_exit is not None:
            failure.reason += f"; last exit code {last_exit}"
        return failure

    def health(self) -> dict[str, Any]:
        now = self.clock()
        figures = self.watch.figures(now)
        stages = {}
        for name in self.sup.procs:
            row = {"up": self.sup.alive(name), "restarts": self.sup.restarts(name),
                   "recent_restarts": self.watch.recent_restarts(name, now), "log": str(self.sup.log_path(name)),
                   "unit": None, "counts_failures": False, "failed_by": {}}
            row.update(self.detail.get(name, {}))
            f = figures.get(name, {})
            if "requests" in f:
                row.update({k: f[k] for k in ("requests", "failed", "window_requests", "window_failed",
                                               "error_rate", "failing_for_s")})
            stages[name] = row
        w = self.watch
        return {"ts": time.time(), "pid": os.getpid(), "running": self.running, "started": self.started_wall,
                "rules": {"failure_rate": w.failure_rate, "failure_seconds": w.failure_seconds,
                          "max_restarts": w.max_restarts, "restart_window_seconds": w.restart_window_s},
                "stages": stages, "failure": asdict(w.failure) if w.failure else None}

    def write(self) -> None:
        try:
            atomic_write_text(health_path(self.cfg), json.dumps(self.health(), default=str))
        except OSError as e:  # a full disk must not stop the watch itself
            log.warning("health file not written", error=str(e)[:200])


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# --------------------------------------------------------------------------- showing it
def _stage_text(row: dict[str, Any]) -> str:
    """'12/702 requests failed (2% in 60 s)' or '' when the stage counts nothing."""
    if "requests" not in row or not row.get("unit"):
        return ""
    if not row.get("counts_failures"):
        return f"{row['requests']} {row['unit']}"
    rate = row.get("error_rate")
    text = f"{row['failed']}/{row['requests']} {row['unit']} failed"
    return text + (f" ({rate:.0%} last min)" if rate is not None else "")


def stages_line(health: dict[str, Any]) -> str:
    """One line for plain progress output: every stage's failures, error rate and restarts."""
    parts = []
    for name, row in (health.get("stages") or {}).items():
        bits = [t for t in (_stage_text(row),) if t]
        if row.get("restarts"):
            bits.append(f"{row['restarts']} restarts")
        if not row.get("up"):
            bits.append("DOWN")
        if bits:
            parts.append(f"{name} " + ", ".join(bits))
    return "stages: " + (" | ".join(parts) if parts else "-")


def stages_table(health: dict[str, Any]):
    """The live view's (and `looprl status`'s) table of the stages."""
    rules = health.get("rules") or {}
    t = Table(title="stages (failures, error rate over the last minute, restarts)", expand=False)
    for c in ("stage", "up", f"restarts ({_duration(rules.get('restart_window_seconds', 300))})", "handled",
              "failed", "error rate", "detail"):
        t.add_column(c)
    for name, row in (health.get("stages") or {}).items():
        counted = "requests" in row and row.get("unit")
        rate = row.get("error_rate")
        detail = ", ".join(f"{k} {v:g}" for k, v in (row.get("failed_by") or {}).items())
        if row.get("failing_for_s") is not None:
            detail = (f"failing for {row['failing_for_s']:.0f} s" + (f"; {detail}" if detail else ""))
        t.add_row(name, "yes" if row.get("up") else "[bold red]no[/]",
                  f"{row.get('recent_restarts', 0)} (total {row.get('restarts', 0)})",
                  f"{row['requests']} {row['unit']}" if counted else "-",
                  str(row["failed"]) if counted and row.get("counts_failures") else "-",
                  f"{rate:.0%}" if counted and row.get("counts_failures") and rate is not None else "-",
                  detail)
    return t
