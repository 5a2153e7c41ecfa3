"""`looprl demo`: the whole loop on one machine, as separate supervised processes.

    looprl init                      base model (once; skipped when the workspace has one)
    looprl ingest broker             embedded Kafka (Tansu, memory only)
    looprl ingest consume            Kafka -> exactly-once Parquet log
    looprl ingest collect            HTTP feedback collector (POST /v1/feedback)
    looprl serving serve             OpenAI-compatible server, LoRA hot-swap, canary split
    looprl serving control           registry pointers -> serving endpoints (+ the gateway's routing file)
    looprl gateway                   product traffic -> serve: canary routing, attribution, response log
    looprl reward serve              incremental reward model (test-then-train)
    looprl scheduler run             PPO jobs on Ray, back to back after each new reward version; canary
    looprl simulate                  simulated users (OpenAI API via the gateway + feedback SDK + collector)

They are the same commands a production deployment runs (see docker-compose.yml); here a
`Supervisor` restarts any that dies, and a failure watch (ops/health.py) stops the demo, naming
the first error and its log, when serving keeps failing requests or a stage keeps crashing. The
demo picks free loopback ports, and tunes a few settings for a 2-core laptop (fewer threads, a
short PPO run per reward version, a smaller canary sample) unless your config sets them. Ctrl-C
stops everything in order; running the demo again resumes from the workspace (event log,
registry, scheduler history, simulator log).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from looprl.ops.commands import looprl_argv
from looprl.ops.core.config import ConfigError, LooprlConfig
from looprl.ops.core.log import get_logger
from looprl.ops.core.signals import stop_on_signals
from looprl.ops.core.version import version_sort_key
from looprl.ops.health import Failure, StageMonitor, stages_line, stages_table
from looprl.ops.report import write_report
from looprl.ops.scheduler import History, history_path
from looprl.ops.sim.preference import load_preference
from looprl.ops.sim.profiles import comparisons_per_hour, resolve_demo, with_feedback
from looprl.ops.sim.records import read_status
from looprl.ops.supervisor import Service, ServiceFailed, Supervisor, free_port, http_ready, tcp_ready
from looprl.reward.history import read_history
from looprl.storage import releases
from looprl.storage.events import EventLog
from looprl.storage.registry import Registry

log = get_logger(__name__)

# Settings tuned for 2 cores and a 15-minute budget. Applied only where the effective config still
# has the schema default, so looprl.toml / LOOPRL_* always win.
DEMO_TUNING: dict[str, Any] = {
    "serving.torch_threads": 1,
    "serving.max_batch_size": 8,
    "serving.controller_poll_seconds": 1.0,
    "reward.poll_seconds": 3.0,
    "reward.min_new_events": 48,
    "policy.steps": 40,
    "policy.checkpoint_every": 10,
    "policy.rollout_batch_size": 16,
    "policy.minibatch_size": 8,
    "policy.max_new_tokens": 16,
    "policy.recent_prompts": 64,
    "policy.ray_timeout_s": 300.0,
    "gate.heldout_prompts": 24,
    "scheduler.jobs": ["policy"],  # `looprl reward serve` updates the reward model continuously
    # PPO against a reward model still at chance would only drift the policy: wait until its
    # ranking skill (held-out and recent prequential pairs and thumbs AUC, pooled) is above chance
    # with confidence (90% lower bound; thumbs are noisy, so a perfect model's AUC is well below 1).
    "scheduler.policy_min_reward_skill": 0.6,
    "scheduler.poll_seconds": 1.0,
    # Train continually: a run starts after each new reward version and 60 s after the last one
    # began (a run is shorter: its actors are kept between runs, benchmarks/policy_jobs.py; jobs
    # run one at a time).
    "scheduler.interval_seconds": 60.0,
    # ... also while a canary is deciding, which takes most of the demo: held, PPO sat idle then
    # (ops/README.md has the runs). A candidate gated meanwhile against the same promoted version
    # is ready the moment the canary rolls back; once it promotes, the next canary waits for a
    # candidate gated against the new version (ops/canary.py).
    "scheduler.policy_waits_for_canary": False,
    "scheduler.job_timeout_seconds": 600.0,
    "scheduler.backoff_seconds": 2.0,
    "canary.traffic_share": 0.5,
    "canary.min_samples": 25,
    "canary.max_samples": 80,
    # Versions follow each other every few minutes: at max_samples the one the users liked more
    # serves on. 80 votes per arm tell a 10-point difference apart 9 times in 10; promoting
    # whatever showed no significant regression let a worse version replace a better one
    # (72% -> 60% in one generous run).
    "canary.promote_on_no_regression": False,
    # ... liked more by a lean, not a coin flip. The canary sees product traffic only: of the seven
    # canaries that reached max_samples with P(better) from 0.5 to 0.65 in the 32 runs of
    # ops/README.md's last four sections, three candidates served the eval users' unseen question
    # forms worse, by 0.06 to 0.26 (in one sparse run the served version fell from 0.67 to 0.41 and
    # the run missed its bar), one as well, three better (by 0.04 to 0.25). A rollback also ends the
    # training line: runs go back to the promoted version.
    "canary.max_samples_promote_probability": 0.65,
    # The per-user caps must leave room for the simulated users: 8 users (~1/8 of an update's
    # feedback each), 4 of them on each canary arm (~1/4 of an arm's thumbs each).
    "reward.max_user_share": 0.3,
    "canary.max_user_share": 0.4,
    # The adaptive KL controller steers each run towards target_kl; a run continuing from a
    # promoted adapter above it would spend its steps pulling the policy back to the base. The
    # leash is what caps learning here: with a perfect reward (benchmarks/transfer.py, default
    # preference, 160 steps) 10 nats per 16-token answer learns more than 7, and 7 more than 5
    # (ops/README.md has the measured runs and what the answers look like).
    "policy.target_kl": 10.0,
    # The gate's cap stays well above target_kl, which the controller overshoots for a while.
    "gate.max_kl": 14.0,
    # ... but a run that starts near the coefficient's floor can run away from it: two on-topic runs
    # lost a third of their candidates at the cap, most after their rollout KL had passed 16 nats
    # (up to 38), not on a noisy read of 14. A run whose 5-step rollout KL reaches 16 ends there and
    # publishes its newest checkpoint under it (policy/trainer.py); a stop at 12 also ended half of
    # the good runs, on the 16-rollout KL's noise (ops/README.md has both).
    "policy.stop_kl": 16.0,
    # A reward model learned from a few hundred labels can score empty or looping answers high: in
    # one sparse run 9 of 16 candidates were rejected for them (ops/README.md). PPO never gets
    # more than a below-average reward for what the gate calls degenerate.
    "policy.degenerate_penalty": 1.0,
    # Each run continues the KL coefficient the run before it ended with, about 0.05
    # here. A first run starting from the base at the schema's 0.3 spent its 40 steps bringing the
    # coefficient down and ended well short of target_kl: the first version, the one the canary
    # judges first, learned far less than the next ones (ops/README.md has the runs).
    "policy.init_kl_coef": 0.08,
    # Without a floor the coefficient decayed from run to run, each continuing the last one's, until
    # the children of a promoted version started with almost no leash, overshot the gate's KL cap
    # and were rejected run after run (ops/README.md has the run). About where the first continued
    # runs stayed in budget:
    "policy.min_kl_coef": 0.02,
    # Runs build on one another: each continues the newest gated version on the line from the
    # promoted one, not the promoted one itself. Otherwise only the runs the canary promoted (4-5
    # of 30-37) added to what users get, and a question form the policy never trains on needs the
    # steps: with a perfect reward the held-out forms gain more after 240 steps than after 80
    # (ops/README.md has the runs).
    "policy.continue_from": "newest_gated",
}

# Per feedback profile (`--feedback`, demo.feedback), tuning that replaces DEMO_TUNING's, under the
# same rule. Sparse labels arrive about ten times slower than generous ones: the reward model
# updates on smaller increments, and the canary decides on fewer thumbs per arm (a thumb on 5% of
# answers fills 25 per arm in about three minutes; the offline gate already judged the candidate).
# 30 thumbs per arm alone get the sign of a 9-point difference wrong about 1 time in 4, so the
# sparse runs before paired votes promoted at max_samples unless the users showed a significant
# regression; their last promotions were coin flips, most of them worse (ops/README.md). The
# comparisons on 5% of requests are now paired votes between the arms, about two per thumb on an
# arm, and at max_samples the users' verdict decides, as in the generous profile.
PROFILE_TUNING: dict[str, dict[str, Any]] = {
    "generous": {},
    # Labels are scarce and compute is not: each update replays four times its slice of history,
    # for 16 epochs, in four independent LoRA adapters (replays of sparse demos' labels: together
    # they rank held-out answers far better than either change alone; reward/README.md).
    # Thumbs are noisy and pairs rare: PPO starts once the reward model beats chance with 90%
    # confidence by a smaller margin than the generous profile asks for, judged on its recent
    # updates (a fresh model's first prequential results would hold the estimate down for long).
    "sparse": {"reward.min_new_events": 16, "reward.replay_ratio": 4.0, "reward.epochs_per_update": 16,
               "reward.ensemble_adapters": 4,
               # The reward model trains on the comparisons and corrections alone. Fitted 16 times over,
               # a few hundred thumbs (coin flips of P(up), two thirds of the labels) pulled it from
               # the preference: replayed on a sparse demo's labels, it ranked the eval users'
               # answers 0.55-0.61 right with them and 0.77-0.85 without (reward/README.md). The
               # thumbs still count for the PPO start, the canary and PPO's served samples.
               "reward.thumbs_weight": 0.0,
               # The heads read how much of something an answer says, not how dense it is in it: a
               # reward model of means scored a second sentence the users liked more no higher, and
               # the shorter answer won PPO's KL cost; lines settled on one-sentence answers that top
               # out near the bar (ops/README.md, "Counting, not density").
               "reward.features": "echo_sum",
               "canary.min_samples": 10, "canary.max_samples": 30,
               "scheduler.policy_min_reward_skill": 0.55,
               "scheduler.policy_reward_window_labels": 100,
               # ... or once the reward model has read 100 labels (about 3.5 minutes), whatever the
               # bound says. Such a model ranks the eval users' answers about 0.6 right in replays, and
               # the canary's paired votes now catch the worse versions it leads to: at 190 labels PPO
               # started at 7-10 minutes and the good versions came too late (ops/README.md).
               "scheduler.policy_start_after_labels": 100,
               # The leash and the line are the generous profile's (10 nats, each run continuing the
               # newest gated version): with paired canary votes the users catch a wrong step, and the
               # 7-nat leash from the promoted version capped the sparse versions (ops/README.md).
               },
}
PROFILE_TUNING["targeted"] = dict(PROFILE_TUNING["sparse"])

# The stage processes the demo supervises: process name -> `looprl` command (the same commands a
# production deployment runs). Named here, not read from the CLI's parser: the CLI imports the
# demo (tests/test_cli.py checks each one parses).
STAGE_COMMANDS: dict[str, tuple[str, ...]] = {
    "broker": ("ingest", "broker"),
    "ingest": ("ingest", "consume"),
    "collector": ("ingest", "collect"),
    "serve": ("serving", "serve"),
    "controller": ("serving", "control"),
    "gateway": ("gateway",),
    "reward": ("reward", "serve"),
    "scheduler": ("scheduler", "run"),
    "simulator": ("simulate",),
}
CHAOS_ORDER = ("ingest", "serve", "reward", "scheduler", "collector", "controller", "gateway")


def _user_set(cfg: LooprlConfig, dotted: str) -> bool:
    section, key = dotted.split(".")
    return key in getattr(cfg, section).model_fields_set


def _env_name(dotted: str) -> str:
    section, key = dotted.split(".")
    return f"LOOPRL_{section.upper()}__{key.upper()}"


def _env_value(v: Any) -> str:
    return json.dumps(v) if isinstance(v, list) else str(v)


def tuning_env(cfg: LooprlConfig) -> dict[str, str]:
    """LOOPRL_* variables for the demo tuning and its feedback profile's (``demo.feedback``),
    skipping keys the user configured (looprl.toml, LOOPRL_*, keyword overrides), also where they
    set the schema's default: pydantic's ``model_fields_set`` tells, as for the profiles' own
    ``demo.*`` fractions, which the simulator applies (`looprl.ops.sim.profiles`)."""
    out = {_env_name("demo.feedback"): cfg.demo.feedback}
    for key, value in {**DEMO_TUNING, **PROFILE_TUNING[cfg.demo.feedback], **comparison_tuning(cfg)}.items():
        if not _user_set(cfg, key):
            out[_env_name(key)] = _env_value(value)
    return out


def comparison_tuning(cfg: LooprlConfig) -> dict[str, Any]:
    """Serving's side of targeted comparisons: a budget per hour sized to the sparse profile's
    comparisons (`profiles.comparisons_per_hour`). serving.compare stays "never": the simulated
    product asks (`looprl_compare: "auto"`) on its users' requests only, so eval traffic, which
    sends no feedback, spends none of the budget."""
    if not resolve_demo(cfg.demo).request_comparisons:
        return {}
    return {"serving.compare_per_hour": round(comparisons_per_hour(resolve_demo(cfg.demo)), 1)}


def plan_services(cfg: LooprlConfig, ports: dict[str, int], preference: str, env: dict[str, str]) -> list[Service]:
    """The demo's processes. ``ports``: broker, ingest_metrics, collector, serve, controller_metrics,
    gateway, gateway_metrics, reward_metrics, scheduler_metrics, simulator_metrics. Product traffic
    (the simulator) goes through the gateway to serve, as in production it goes to vLLM."""
    host = "127.0.0.1"
    serve_url = f"http://{host}:{ports['serve']}"
    gateway_url = f"http://{host}:{ports['gateway']}"

    def cmd(name: str, *extra: str) -> list[str]:
        return looprl_argv(*STAGE_COMMANDS[name], *extra)

    services = [] if cfg.kafka.bootstrap_servers else [
        Service("broker", cmd("broker"), env, ready=tcp_ready(host, ports["broker"]), ready_timeout_s=60)]
    services += [
        Service("ingest", cmd("ingest"), env,
                ready=http_ready(f"http://{host}:{ports['ingest_metrics']}/metrics"), ready_timeout_s=120),
        Service("collector", cmd("collector"), env, ready=http_ready(f"http://{host}:{ports['collector']}/health"),
                ready_timeout_s=120),
        Service("serve", cmd("serve"), env, ready=http_ready(f"{serve_url}/health"), ready_timeout_s=240),
        Service("controller", cmd("controller"), env,
                ready=http_ready(f"http://{host}:{ports['controller_metrics']}/metrics"), ready_timeout_s=120),
        Service("gateway", cmd("gateway"), env, ready=http_ready(f"{gateway_url}/health"), ready_timeout_s=120),
        Service("reward", cmd("reward"), env,
                ready=http_ready(f"http://{host}:{ports['reward_metrics']}/metrics"), ready_timeout_s=240),
        Service("scheduler", cmd("scheduler"), env,
                ready=http_ready(f"http://{host}:{ports['scheduler_metrics']}/metrics"), ready_timeout_s=180,
                stop_timeout_s=40),
        Service("simulator", cmd("simulator", "--preference", preference, "--base-url", gateway_url,
                                 "--metrics-port", str(ports["simulator_metrics"])), env,
                ready=http_ready(f"http://{host}:{ports['simulator_metrics']}/metrics"), ready_timeout_s=120),
    ]
    return services


def demo_env(cfg: LooprlConfig, ports: dict[str, int], admin_token: str) -> dict[str, str]:
    host = "127.0.0.1"
    env = {
        "LOOPRL_WORKSPACE": str(cfg.workspace.resolve()),
        # The failure watch (ops/health.py) reads the stages' log files as JSON lines, whatever log_format says.
        "LOOPRL_LOG_FORMAT": "json",
        "LOOPRL_KAFKA__EMBEDDED_PORT": str(ports["broker"]),
        # Configured Kafka (e.g. a shared dev cluster) is used as is; else the demo's own broker.
        "LOOPRL_KAFKA__BOOTSTRAP_SERVERS": cfg.kafka.bootstrap_servers or f"{host}:{ports['broker']}",
        "LOOPRL_INGEST__METRICS_PORT": str(ports["ingest_metrics"]),
        "LOOPRL_INGEST__COLLECTOR_HOST": host,
        "LOOPRL_INGEST__COLLECTOR_PORT": str(ports["collector"]),
        "LOOPRL_SERVING__HOST": host,
        "LOOPRL_SERVING__PORT": str(ports["serve"]),
        "LOOPRL_SERVING__ENDPOINTS": json.dumps([f"http://{host}:{ports['serve']}"]),
        "LOOPRL_SERVING__CONTROLLER_METRICS_PORT": str(ports["controller_metrics"]),
        # Answers are logged by the gateway in front of serve (as in front of vLLM), not twice.
        "LOOPRL_SERVING__LOG_RESPONSES": "false",
        "LOOPRL_GATEWAY__HOST": host,
        "LOOPRL_GATEWAY__PORT": str(ports["gateway"]),
        "LOOPRL_GATEWAY__METRICS_PORT": str(ports["gateway_metrics"]),
        "LOOPRL_REWARD__METRICS_PORT": str(ports["reward_metrics"]),
        "LOOPRL_POLICY__METRICS_PORT": str(ports["policy_metrics"]),
        "LOOPRL_SCHEDULER__METRICS_PORT": str(ports["scheduler_metrics"]),
        "LOOPRL_SERVING__ADMIN_TOKEN": admin_token,
        # One intra-op thread per process: ~8 processes share 2 cores; oversubscription is the
        # main way to make a small-CPU loop slow.
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "RAY_AUTH_MODE": "disabled",
        "PYTHONUNBUFFERED": "1",
    }
    env.update(tuning_env(cfg))
    return env


def allocate_ports() -> dict[str, int]:
    names = ("broker", "ingest_metrics", "collector", "serve", "controller_metrics", "gateway", "gateway_metrics",
             "reward_metrics", "policy_metrics", "scheduler_metrics", "simulator_metrics")
    ports: dict[str, int] = {}
    while len(set(ports.values())) != len(names):
        ports = {n: free_port() for n in names}
    return ports


def _is_workspace(path: Path) -> bool:
    return any((path / d).exists() for d in ("registry", "events", "state", "base"))


def prepare_workspace(cfg: LooprlConfig, fresh: bool) -> None:
    ws = cfg.workspace
    if fresh and ws.exists():
        if not _is_workspace(ws) and any(ws.iterdir()):
            raise ConfigError(f"--fresh: {ws} is not a looprl workspace (no registry/events/state/base); not deleting it")
        keep_base = cfg.model.base_path is None and (ws / "base" / "config.json").is_file()
        for child in ws.iterdir():
            if keep_base and child.name == "base":
                continue  # the base model is deterministic and slow to build: keep it
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    ws.mkdir(parents=True, exist_ok=True)


def ensure_base(cfg: LooprlConfig, env: dict[str, str]) -> None:
    if (cfg.base_path / "config.json").is_file():
        return
    print(f"building the base model in {cfg.base_path} (once; about a minute) ...", flush=True)
    r = subprocess.run(looprl_argv("init"), env={**os.environ, **env, "OMP_NUM_THREADS": "2"})
    if r.returncode != 0:
        raise RuntimeError(f"`looprl init` failed with exit code {r.returncode}")


# --------------------------------------------------------------------------- progress
def snapshot(cfg: LooprlConfig, sup: Supervisor | None = None, monitor: Any = None) -> dict[str, Any]:
    """What the live view shows, read from the workspace (no process is asked anything)."""
    reg = Registry(cfg.registry_dir)
    st = read_status(cfg)
    out: dict[str, Any] = {"sim": st}
    try:
        rewards = reg.list("reward") if reg.kind_dir("reward").is_dir() else []
        policies = reg.list(releases.KIND)
    except Exception:  # a manifest being rewritten: next refresh
        rewards, policies = [], []
    out["reward_versions"] = len(rewards)
    out["reward_latest"] = rewards[-1].version if rewards else None
    out["reward_preq"] = None
    last = read_history(cfg, last=1)
    if last:
        out["reward_preq"] = (last[0].get("prequential") or {}).get("pair_accuracy")
    out["policy_versions"] = len(policies)
    out["ppo_steps"] = sum(len(m.metrics.get("curve") or []) for m in policies)
    out["kl_last"] = policies[-1].metrics.get("kl_last") if policies else None
    out["promoted"] = releases.promoted_version(reg)
    out["canary"] = releases.canary_version(reg)
    out["statuses"] = {m.version: m.status for m in policies}
    hp = history_path(cfg)
    out["runs"] = History(hp).runs(limit=5) if hp.is_file() else []
    if sup is not None:
        out["services"] = {n: (sup.alive(n), sup.restarts(n)) for n in sup.procs}
    if monitor is not None:  # a StageMonitor: failures, error rate and restarts per stage
        out["health"] = monitor.health()
    return out


def _rate(d: dict | None) -> str:
    if not d or not d.get("n"):
        return "-"
    return f"{d['ups'] / d['n']:.0%} (n={d['n']}, exp {d['p_mean']:.0%})"


def render(snap: dict[str, Any], elapsed: float, total: float):
    sim = snap.get("sim") or {}
    fb = sim.get("feedback_sent") or {}
    t = Table.grid(padding=(0, 2))
    t.add_column(style="bold cyan")
    t.add_column()
    t.add_row("time", f"{elapsed / 60:.1f} / {total / 60:.0f} min")
    t.add_row("traffic", f"{sim.get('train_requests', 0)} requests, {sim.get('eval_requests', 0)} eval, "
                         f"{sim.get('serving_failed', 0)} failed")
    profile = (sim.get("feedback") or {}).get("profile")
    t.add_row("feedback sent", f"{fb.get('thumbs', 0)} thumbs, {fb.get('preference', 0)} preferences, "
                               f"{fb.get('correction', 0)} corrections" + (f" ({profile} users)" if profile else ""))
    preq, kl = snap["reward_preq"], snap["kl_last"]
    t.add_row("reward model", f"{snap['reward_versions']} versions (latest {snap['reward_latest'] or '-'}), "
                              f"prequential pair accuracy {f'{preq:.2f}' if preq is not None else '-'}")
    t.add_row("policy (PPO)", f"{snap['policy_versions']} versions, {snap['ppo_steps']} PPO steps, "
                              f"last KL {f'{kl:.2f}' if kl is not None else '-'} nats")
    t.add_row("serving", f"promoted {snap['promoted'] or releases.BASE}, canary {snap['canary'] or '-'}")
    evals = (sim.get("by_version") or {}).get("eval") or {}
    trains = (sim.get("by_version") or {}).get("train") or {}
    v = Table(title="thumbs-up rate by adapter version", expand=False)
    v.add_column("version")
    v.add_column("status")
    v.add_column("eval (held-out prompts)")
    v.add_column("product traffic")
    for ver in sorted(set(evals) | set(trains), key=version_sort_key):
        status = snap["statuses"].get(ver, "")
        if ver == (snap["promoted"] or releases.BASE):
            status = "serving"
        elif ver == snap["canary"]:
            status = "canary"
        elif status == "promoted":
            status = "superseded"
        v.add_row(ver, status, _rate(evals.get(ver)), _rate(trains.get(ver)))
    runs = Table(title="recent scheduler runs", expand=False)
    for c in ("id", "job", "trigger", "status"):
        runs.add_column(c)
    for r in snap.get("runs", [])[:4]:
        runs.add_row(str(r["id"]), r["job"], r["trigger"][:50], r["status"])
    parts = [t, v, runs]
    if "health" in snap:
        parts.append(stages_table(snap["health"]))
    elif "services" in snap:
        parts.append("services: " + "  ".join(f"{n}{'' if ok else ' (down)'}{f' x{r}' if r else ''}"
                                              for n, (ok, r) in snap["services"].items()))
    return Panel(Group(*parts), title="looprl demo", subtitle="Ctrl-C stops everything cleanly")


def _plain(snap: dict[str, Any], elapsed: float) -> str:
    sim = snap.get("sim") or {}
    evals = (sim.get("by_version") or {}).get("eval") or {}
    rates = ", ".join(f"{k}: {_rate(v)}" for k, v in evals.items())
    line = (f"[{elapsed / 60:5.1f} min] requests {sim.get('train_requests', 0)} ({sim.get('serving_failed', 0)} "
            f"failed) | reward v{snap['reward_versions']} | PPO steps {snap['ppo_steps']} | policy versions "
            f"{snap['policy_versions']} | promoted {snap['promoted'] or releases.BASE} canary {snap['canary'] or '-'} | "
            f"eval {rates}")
    if "health" in snap:
        line += "\n" + " " * 12 + stages_line(snap["health"])
    return line


# --------------------------------------------------------------------------- shutdown
def log_counts(cfg: LooprlConfig) -> dict[str, int]:
    """Events in the Parquet log: feedback events (all kinds) and responses."""
    if not cfg.events_dir.exists():
        return {"feedback": 0, "responses": 0}
    el = EventLog(cfg.events_dir)
    fb = el.query("SELECT count(*) AS n FROM feedback").column("n")[0].as_py()
    rs = el.query("SELECT count(*) AS n FROM responses").column("n")[0].as_py()
    return {"feedback": int(fb), "responses": int(rs)}


def drain(cfg: LooprlConfig, expected_feedback: int, timeout_s: float = 60.0, quiet_s: float = 4.0) -> dict[str, int]:
    """Wait until ingest has written what the producers sent: the feedback count reaches what the
    simulator had acknowledged and no count changed for ``quiet_s``. Returns the last counts."""
    deadline = time.monotonic() + timeout_s
    last: dict[str, int] = {}
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        try:
            counts = log_counts(cfg)
        except Exception as e:  # a part file being renamed: look again
            log.debug("drain: log not readable yet", error=str(e)[:200])
            time.sleep(0.5)
            continue
        if counts != last:
            last, stable_since = counts, time.monotonic()
        elif counts["feedback"] >= expected_feedback and time.monotonic() - stable_since >= quiet_s:
            return counts
        time.sleep(0.5)
    log.warning("drain timed out", expected_feedback=expected_feedback, counts=last)
    return last


def shutdown(cfg: LooprlConfig, sup: Supervisor) -> dict[str, Any]:
    """Producers first (simulator, then the gateway, serving and collector flush what they hold), wait for
    ingest to write everything, then the rest in reverse start order."""
    out: dict[str, Any] = {}
    for name in ("simulator", "gateway", "serve", "collector"):
        if name in sup.procs:
            out.setdefault("exit_codes", {})[name] = sup.retire(name)
    if "ingest" in sup.procs:
        deadline = time.monotonic() + 60  # ingest may be restarting (crashed or killed) right now
        while not sup.alive("ingest") and time.monotonic() < deadline:
            time.sleep(0.5)
        sent = sum((read_status(cfg).get("feedback_sent") or {}).values())
        out["feedback_sent"] = sent
        out["log_counts"] = drain(cfg, sent)
    out.setdefault("exit_codes", {}).update(sup.stop())
    return out


# --------------------------------------------------------------------------- the demo
def metrics_urls(ports: dict[str, int]) -> dict[str, str]:
    """Each stage's /metrics, read by the failure watch (ops/health.py)."""
    host = "127.0.0.1"
    return {"serve": f"http://{host}:{ports['serve']}/metrics",
            "collector": f"http://{host}:{ports['collector']}/metrics",
            "ingest": f"http://{host}:{ports['ingest_metrics']}/metrics",
            "reward": f"http://{host}:{ports['reward_metrics']}/metrics",
            "scheduler": f"http://{host}:{ports['scheduler_metrics']}/metrics",
            "controller": f"http://{host}:{ports['controller_metrics']}/metrics",
            "gateway": f"http://{host}:{ports['gateway_metrics']}/metrics"}


def run_demo(cfg: LooprlConfig, minutes: float | None = None, preference: str | None = None, fresh: bool = False,
             ui: bool = True, kill_every: float | None = None, report: bool = True, feedback: str | None = None) -> int:
    cfg = cfg.model_copy(update={"workspace": cfg.workspace.resolve()})
    if feedback is not None:  # --feedback: the profile, whose fractions still yield to the user's
        cfg = with_feedback(cfg, feedback)
    minutes = minutes or cfg.demo.minutes
    preference = preference or cfg.demo.preference
    try:
        load_preference(preference)  # fail now, naming the spec, not inside a child process
    except ValueError as e:
        raise ConfigError(f"--preference: {e}") from None
    prepare_workspace(cfg, fresh)
    ports = allocate_ports()
    token = cfg.serving.admin_token.get_secret_value() if cfg.serving.admin_token else secrets.token_hex(16)
    env = demo_env(cfg, ports, token)
    ensure_base(cfg, env)
    services = plan_services(cfg, ports, preference, env)
    log_dir = cfg.workspace / "logs"
    if ui and sys.stdout.isatty():
        # The live view owns the terminal; this process's own log lines (restarts, ...) still go
        # to stderr at WARNING and above; every stage logs to logs/<stage>.log.
        logging.getLogger("looprl").setLevel(logging.WARNING)
    sup = Supervisor(services, log_dir, backoff_initial_s=cfg.demo.restart_backoff_seconds, backoff_max_s=20.0,
                     stable_after_s=30.0)
    monitor = StageMonitor(cfg, sup, metrics_urls(ports))
    t0 = time.monotonic()
    total = minutes * 60
    interrupted = False
    failure: Failure | None = None
    traffic = False  # the simulator started: there is something to report
    summary: dict[str, Any] = {}
    with stop_on_signals() as stop:  # Ctrl-C and SIGTERM stop everything in order
        try:
            print(f"starting {len(services)} services (logs in {log_dir}) ...", flush=True)
            # Restart stages that die while later ones start, under the same failure watch: a stage
            # that crash-loops stops the demo within seconds, not after its readiness timeout.
            sup.start_monitor()
            for svc in services:
                if stop.is_set():
                    break
                try:
                    ready = sup.start(svc.name, give_up=lambda: stop.is_set() or monitor.poll() is not None)
                except ServiceFailed as e:
                    print(str(e), file=sys.stderr)  # with the log's tail
                    failure = monitor.watch.failure or Failure(svc.name, str(e).split(";")[0])
                    break
                if not ready:
                    failure = monitor.watch.failure
                    break
                print(f"  {svc.name} ready", flush=True)
            if failure is None and not stop.is_set():
                traffic = True
                t0 = time.monotonic()  # the budget counts from when users start using the product
                next_kill = t0 + kill_every if kill_every else None
                killed: list[tuple[float, str, int | None]] = []

                def loop(update) -> None:
                    nonlocal next_kill, failure
                    while not stop.is_set() and time.monotonic() - t0 < total:
                        if next_kill is not None and time.monotonic() >= next_kill:
                            # Every stage once, in a fixed order (the in-memory broker is never killed: it
                            # would lose what it holds by design).
                            victim = CHAOS_ORDER[len(killed) % len(CHAOS_ORDER)]
                            killed.append((time.monotonic() - t0, victim, sup.kill(victim)))
                            log.warning("chaos: SIGKILL", service=victim)
                            next_kill = time.monotonic() + kill_every if len(killed) < len(CHAOS_ORDER) else None
                        failure = monitor.poll()
                        update(failure is not None)
                        if failure is not None:
                            return
                        stop.wait(2.0)

                if ui and sys.stdout.isatty():
                    with Live(render(snapshot(cfg, sup, monitor), 0, total), refresh_per_second=1,
                              transient=False) as live:
                        loop(lambda _last: live.update(render(snapshot(cfg, sup, monitor), time.monotonic() - t0,
                                                              total)))
                else:
                    last = [0.0]

                    def plain(final: bool) -> None:
                        if final or time.monotonic() - last[0] >= 15:
                            last[0] = time.monotonic()
                            print(_plain(snapshot(cfg, sup, monitor), time.monotonic() - t0), flush=True)

                    loop(plain)
                summary["chaos_kills"] = [{"at_s": round(a, 1), "service": n, "pid": p} for a, n, p in killed]
            interrupted = stop.is_set()
        finally:
            if failure is not None:
                if failure.log is None:
                    monitor.explain(failure)
                monitor.watch.failure = failure  # also a start-up timeout, which no rule reports
                summary["failure"] = asdict(failure)
            summary["stages"] = monitor.health()["stages"]  # as they were, before the stop
            print("stopping services (producers first, then draining ingest) ...", flush=True)
            summary.update(shutdown(cfg, sup))
            monitor.running = False
            monitor.write()  # `looprl status` shows the final figures, every stage down
            summary["restarts"] = {n: sup.restarts(n) for n in sup.procs}
            summary["minutes"] = round((time.monotonic() - t0) / 60, 2)
            summary["interrupted"] = interrupted
    result: dict[str, Any] = {}
    if report and (failure is None or traffic):  # a demo that never got going has nothing to report
        out_dir, result = write_report(cfg, extra=summary)
        print(f"\nreport: {out_dir / 'report.md'}")
    if failure is not None:
        # Last, so it is what the terminal shows: the cause, not a verdict on too little data.
        print("\n".join(failure.lines()), flush=True)
        return 1
    if not report:
        return 0
    base, served = result.get("base") or {}, result.get("served") or {}
    if result["improvement_rate"] is None:
        print("not enough eval traffic on both the base and a trained version to measure learning yet; "
              "run `looprl demo` again to continue from this workspace")
    else:
        print(f"thumbs-up rate on held-out prompts: base {base['rate']:.0%} (n={base['n']}) -> "
              f"{result['served_version']} {served['rate']:.0%} (n={served['n']}): "
              f"{result['improvement_rate']:+.2f} (target +{cfg.demo.target_improvement:.2f}: "
              f"{'met' if result['target_met'] else 'not met'})")
    labels, per_k = result.get("labels") or {}, result.get("lift_per_1000_labels")
    print(f"labels ({(result.get('feedback') or {}).get('profile', cfg.demo.feedback)} feedback): "
          f"{labels.get('total', 0)} ({labels.get('thumbs', 0)} thumbs, {labels.get('preference', 0)} comparisons, "
          f"{labels.get('correction', 0)} corrections); lift per 1,000 labels "
          f"{'-' if per_k is None else f'{per_k:+.3f}'}")
    return 130 if interrupted and not result.get("target_met") else 0
