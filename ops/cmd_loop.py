"""`looprl` commands that close the loop: the scheduler, the canary and the whole-loop commands.

    looprl scheduler run [--once] [--runner ray|subprocess] [--no-canary]  retraining + canary
    looprl scheduler trigger reward|policy [--reason TEXT]                 ask the scheduler for a run
    looprl scheduler runs [--job J] [--status S] [--limit N] [--json]      run history
    looprl canary status                                                   current canary and its test
    looprl canary promote VERSION  /  looprl canary rollback               people's decisions (registry writers)
    looprl demo [--minutes M] [--preference module:function] [--feedback generous|sparse|targeted] [--fresh]
                                                                           the whole loop, supervised
    looprl simulate [--minutes M] [--preference module:function] [--feedback PROFILE]  the simulator alone
    looprl status [--json]                                                 failures, error rate, restarts per stage
    looprl report [--out DIR]                                              demo report from a workspace
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import time
from pathlib import Path
from typing import get_args

from rich.console import Console
from rich.table import Table

from looprl.ops.core.config import ConfigError, DemoConfig, LooprlConfig
from looprl.ops.core.log import get_logger
from looprl.ops.core.metrics import serve_metrics
from looprl.ops.core.signals import stop_on_signals

# `looprl demo --feedback`: demo.feedback's choices (the profiles are in looprl.ops.sim.profiles).
FEEDBACK_PROFILES = get_args(DemoConfig.model_fields["feedback"].annotation)

log = get_logger(__name__)


# --------------------------------------------------------------------------- handlers
def _run_scheduler(args: argparse.Namespace, cfg: LooprlConfig) -> int:
    from looprl.ops.scheduler import build_scheduler

    if args.runner:
        cfg.scheduler.runner = args.runner
    if not args.once:  # one tick is over before Prometheus would scrape it
        serve_metrics(cfg.scheduler.metrics_port, host=cfg.metrics_host, key="scheduler.metrics_port")
    sched = build_scheduler(cfg, with_canary=not args.no_canary)
    with stop_on_signals() as stop:
        if args.once:
            sched.tick()
            while sched.running() and not stop.is_set():
                stop.wait(cfg.scheduler.poll_seconds)
                sched.tick()
            sched.shutdown()
            return 0
        log.info("scheduler started", jobs=list(sched.jobs), runner=cfg.scheduler.runner)
        sched.run(stop, cfg.scheduler.poll_seconds)
    return 0


def _trigger(args: argparse.Namespace, cfg: LooprlConfig) -> int:
    from looprl.ops.scheduler import request_trigger

    if args.job not in cfg.scheduler.jobs:
        hint = " (`looprl reward serve` updates the reward model continuously)" if args.job == "reward" else ""
        print(f"looprl scheduler trigger: job {args.job!r} is not run by the scheduler: scheduler.jobs = "
              f"{cfg.scheduler.jobs}{hint}", file=sys.stderr)
        return 2
    path = request_trigger(cfg, args.job, args.reason or "")
    print(json.dumps({"job": args.job, "requested": str(path)}))
    return 0


def _runs(args: argparse.Namespace, cfg: LooprlConfig) -> int:
    from looprl.ops.scheduler import History, history_path

    rows = History(history_path(cfg)).runs(args.job, args.limit, args.status) if history_path(cfg).is_file() else []
    if args.json:
        print(json.dumps(rows, default=str))
        return 0
    t = Table(title=f"scheduler runs ({history_path(cfg)})")
    for col in ("id", "job", "trigger", "attempt", "status", "started", "seconds", "result"):
        t.add_column(col)
    for r in rows:
        secs = f"{r['finished_at'] - r['started_at']:.1f}" if r.get("finished_at") else "-"
        result = json.dumps(r["details"])[:60] if r["details"] else (r.get("error") or "")[-60:].replace("\n", " ")
        t.add_row(str(r["id"]), r["job"], r["trigger"][:40], str(r["attempt"]), r["status"],
                  time.strftime("%m-%d %H:%M:%S", time.localtime(r["started_at"])), secs, result)
    Console().print(t)
    return 0


def _canary_status(args: argparse.Namespace, cfg: LooprlConfig) -> int:
    from looprl.ops.canary import CanaryManager

    print(json.dumps(CanaryManager(cfg).status(), indent=2, default=str))
    return 0


# People's promote/rollback write the registry directly, like the scheduler and the controller: the
# filesystem's permissions on the workspace decide who may release (ops/README.md). PermissionError
# is the operating system refusing a write.
def _promote(args: argparse.Namespace, cfg: LooprlConfig) -> int:
    from looprl.ops.canary import CanaryManager
    from looprl.storage.registry import RegistryError

    try:
        msg = CanaryManager(cfg).manual_promote(args.version, by=args.by or getpass.getuser())
    except (PermissionError, RegistryError) as e:
        print(f"looprl canary promote: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"promoted": args.version, "result": msg}))
    return 0


def _rollback(args: argparse.Namespace, cfg: LooprlConfig) -> int:
    from looprl.ops.canary import CanaryManager
    from looprl.storage.registry import RegistryError

    try:
        msg = CanaryManager(cfg).manual_rollback(by=args.by or getpass.getuser())
    except (PermissionError, RegistryError) as e:
        print(f"looprl canary rollback: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"rolled_back": msg}))
    return 0


def _simulate(args: argparse.Namespace, cfg: LooprlConfig) -> int:
    from looprl.ops.sim.preference import load_preference
    from looprl.ops.sim.profiles import with_feedback
    from looprl.ops.sim.simulator import FeedbackChannels, Simulator

    try:
        pref = load_preference(args.preference or cfg.demo.preference)
    except ValueError as e:
        raise ConfigError(f"--preference: {e}") from None
    if args.metrics_port is not None:
        serve_metrics(args.metrics_port, host=cfg.metrics_host, key="--metrics-port")
    base_url = args.base_url or f"http://{cfg.serving.host}:{cfg.serving.port}"
    bootstrap = args.bootstrap
    if bootstrap is None and not args.no_sdk:
        from looprl.ingest.broker import NoBroker, bootstrap_servers

        try:
            bootstrap = bootstrap_servers(cfg)
        except NoBroker as e:
            raise ConfigError(f"{e} (or pass --bootstrap, or --no-sdk)") from None
    collector = args.collector_url
    if collector is None and cfg.demo.collector_fraction > 0:
        collector = f"http://{cfg.ingest.collector_host}:{cfg.ingest.collector_port}"
    channels = FeedbackChannels(cfg, bootstrap, collector)
    if args.feedback:
        cfg = with_feedback(cfg, args.feedback)
    sim = Simulator(cfg, base_url, pref, channels)
    with stop_on_signals() as stop:
        try:
            status = sim.run(stop, duration_s=args.minutes * 60 if args.minutes else None)
        finally:
            sim.close()
    print(json.dumps({k: v for k, v in status.items() if k != "by_version"}, default=str))
    return 0


def _report(args: argparse.Namespace, cfg: LooprlConfig) -> int:
    from looprl.ops.report import write_report

    out, summary = write_report(cfg, Path(args.out) if args.out else None)
    print(json.dumps({"report": str(out), "improvement": summary["improvement_rate"],
                      "target_met": summary["target_met"]}))
    return 0


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


def _status(args: argparse.Namespace, cfg: LooprlConfig) -> int:
    """What the demo's failure watch last saw (the live view's figures), read from the workspace.
    Exit code 1 while a failure is recorded."""
    from looprl.ops.health import Failure, health_path, read_health, stages_table

    health = read_health(cfg)
    if health is None:
        print(f"looprl status: no figures in {health_path(cfg)}: `looprl demo` writes them while it runs",
              file=sys.stderr)
        return 2
    running = bool(health.get("running")) and _pid_alive(int(health.get("pid") or 0))
    if args.json:
        print(json.dumps({**health, "running": running}, default=str))
    else:
        age = time.time() - float(health.get("ts") or 0)
        state = f"running (pid {health.get('pid')})" if running else "not running"
        print(f"looprl demo: {state}; figures from {time.strftime('%H:%M:%S', time.localtime(health['ts']))} "
              f"({age:.0f} s ago), workspace {cfg.workspace}")
        Console(width=160).print(stages_table(health))
        if health.get("failure"):
            print("\n".join(Failure(**health["failure"]).lines()))
    return 1 if health.get("failure") else 0


def _demo(args: argparse.Namespace, cfg: LooprlConfig) -> int:
    from looprl.ops.demo import run_demo

    return run_demo(cfg, minutes=args.minutes, preference=args.preference, fresh=args.fresh, ui=not args.no_ui,
                    kill_every=args.chaos, feedback=args.feedback)


# --------------------------------------------------------------------------- registration
def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("scheduler", help="retraining jobs on schedule and triggers (on Ray), and the canary")
    acts = g.add_subparsers(dest="action", metavar="ACTION", required=True)
    s = acts.add_parser("run", help="run retraining jobs on schedule/triggers and drive the canary")
    s.add_argument("--once", action="store_true", help="one tick: run what is due, wait for it, exit")
    s.add_argument("--runner", choices=["ray", "subprocess"], help="override scheduler.runner")
    s.add_argument("--no-canary", action="store_true", help="do not start/judge canaries in this process")
    s.set_defaults(func=_run_scheduler)

    t = acts.add_parser("trigger", help="ask the scheduler to run a job now")
    t.add_argument("job", choices=["reward", "policy"], help="the job to run: reward or policy")
    t.add_argument("--reason", help="recorded in the run history")
    t.set_defaults(func=_trigger)

    r = acts.add_parser("runs", help="history of scheduler runs with their outcome")
    r.add_argument("--job", choices=["reward", "policy"], help="only this job's runs")
    r.add_argument("--status", choices=["running", "success", "failed", "timeout", "abandoned"],
                   help="only runs with this outcome")
    r.add_argument("--limit", type=int, default=30, metavar="N", help="newest N runs (default 30)")
    r.add_argument("--json", action="store_true", help="print the runs as JSON instead of a table")
    r.set_defaults(func=_runs)

    g = sub.add_parser("canary", help="the online canary of a gated policy version, and people's decisions")
    acts = g.add_subparsers(dest="action", metavar="ACTION", required=True)
    c = acts.add_parser("status", help="the current canary and its sequential test")
    c.set_defaults(func=_canary_status)

    for name, fn, help_ in (("promote", _promote, "promote a policy version to all traffic; ends a running canary "
                                                  "(needs write access to the workspace)"),
                            ("rollback", _rollback, "roll back the canary, or the promoted version (needs write "
                                                    "access to the workspace)")):
        p = acts.add_parser(name, help=help_)
        if name == "promote":
            p.add_argument("version", help="policy version, e.g. v3")
        p.add_argument("--by", help="who decides (recorded; default: the OS user)")
        p.set_defaults(func=fn)

    d = sub.add_parser("demo", help="run the whole loop on this machine and watch the served model improve")
    d.add_argument("--minutes", type=float, help="how long the simulator runs (default demo.minutes)")
    d.add_argument("--preference", help="hidden user preference module:function (default demo.preference)")
    d.add_argument("--feedback", choices=list(FEEDBACK_PROFILES),
                   help="how much the simulated users tell the loop: generous (default demo.feedback), sparse "
                        "(5%% thumbs, 5%% comparisons, 1%% corrections) or targeted (comparisons when serving asks)")
    d.add_argument("--fresh", action="store_true", help="start from an empty workspace (default: resume)")
    d.add_argument("--no-ui", action="store_true", help="plain progress lines instead of the live view")
    d.add_argument("--chaos", type=float, default=None, metavar="SECONDS",
                   help="SIGKILL one stage every SECONDS, each in turn (the supervisor restarts it)")
    d.set_defaults(func=_demo)

    m = sub.add_parser("simulate", help="the product simulator: users, prompts, thumbs and preferences")
    m.add_argument("--minutes", type=float, help="stop after this long (default: until Ctrl-C/SIGTERM)")
    m.add_argument("--preference", help="hidden preference module:function (default demo.preference)")
    m.add_argument("--feedback", choices=list(FEEDBACK_PROFILES),
                   help="feedback profile of the users (default demo.feedback; see `looprl demo --help`)")
    m.add_argument("--base-url", help="serving base URL (default http://serving.host:serving.port)")
    m.add_argument("--collector-url", help="HTTP collector base URL (default from ingest.collector_*)")
    m.add_argument("--bootstrap", help="Kafka bootstrap servers (default: configured or embedded)")
    m.add_argument("--no-sdk", action="store_true", help="send feedback over HTTP only")
    m.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve the simulator's /metrics here (0 = a free port, logged at start; default: none)")
    m.set_defaults(func=_simulate)

    st = sub.add_parser("status", help="failed requests, error rate and restarts per stage of the (last) demo; "
                                       "exit code 1 when it stopped on a failure")
    st.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    st.set_defaults(func=_status)

    o = sub.add_parser("report", help="write the demo report (markdown + plots) from the workspace")
    o.add_argument("--out", help="output folder (default: <workspace>/reports/demo-<time>)")
    o.set_defaults(func=_report)
