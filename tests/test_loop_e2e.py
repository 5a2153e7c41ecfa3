"""The whole loop on the embedded default, as a newcomer runs it (`looprl demo`), with a small
budget: it must *learn* (the served model's thumbs-up rate on held-out prompts rises above the
base's), survive a SIGKILL of every stage (the supervisor restarts it; no acknowledged feedback
is lost or duplicated), and stop cleanly on Ctrl-C (SIGINT to the process group)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from looprl.ops.core.config import load_config
from looprl.ops.demo import CHAOS_ORDER
from looprl.ops.runners import process_gone
from looprl.ops.sim.records import read_status
from looprl.policy.ray_backend import ray_temp_dir
from looprl.storage.registry import Registry

pytestmark = pytest.mark.slow

CHAOS_EVERY_S = 20
MAX_TRAFFIC_MINUTES = 9  # the budget; a healthy run stops well before (~3-5 min, ~7 if v1 is weak)
MIN_EVAL = 20  # held-out requests served by the promoted version before we stop
MIN_IMPROVEMENT_P = 0.08  # served minus base mean preference probability on held-out prompts
# An early promoted version can be a weak one (it passes the canary by not regressing): then the
# loop goes on training, and the test waits for a later version, within the budget. It stops at
# a margin above the asserted figure because a few more answers arrive before the demo stops.
STOP_MARGIN_P = 0.02


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (stages, their Ray cluster and jobs, the broker binary)."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    out, frontier = set(), {pid}
    while frontier:
        frontier = {c for c, p in parent.items() if p in frontier} - out
        out |= frontier
    return out


def _learning_record(report: Path, ws: Path) -> str:
    """What a failed learning assert prints: the report's reward-model, policy and canary tables
    (when each version came, and why the gate or the canary turned it down) and the scheduler's
    last log lines. CI keeps no workspace, so this is all there is to read afterwards."""
    text = (report / "report.md").read_text()
    start = text.find("## Reward model")
    tables = "\n".join(line for line in text[start:].splitlines() if line.startswith(("#", "|")))
    scheduler_log = ws / "logs" / "scheduler.log"
    tail = scheduler_log.read_text()[-2500:] if scheduler_log.exists() else "(no scheduler log)"
    return f"{tables}\n--- scheduler.log (tail) ---\n{tail}"


def test_demo_learns_survives_sigkill_and_stops_cleanly(tmp_path, demo_base):
    ws = tmp_path / "ws"
    # the report measures a version on the answers this test waits for (the demo's bar is higher);
    # the simulated users are the ones this test's figures were measured with (each demo draws its
    # own: with some draws the reward model passes the PPO start condition only after the budget)
    env = {**os.environ, "LOOPRL_MODEL__BASE_PATH": str(demo_base), "LOOPRL_DEMO__REPORT_MIN_EVAL": str(MIN_EVAL),
           "LOOPRL_DEMO__SEED": "0"}
    log = open(tmp_path / "demo.log", "wb")
    p = subprocess.Popen([sys.executable, "-m", "looprl.ops.cli", "--workspace", str(ws), "demo", "--no-ui",
                          "--minutes", "30", "--chaos", str(CHAOS_EVERY_S)],
                         env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "simulator ready" not in (tmp_path / "demo.log").read_text():
            assert p.poll() is None, (tmp_path / "demo.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "services did not start in 3 minutes"
            time.sleep(1)
        assert len(_descendants(p.pid)) >= 10  # 9 stages (the gateway among them) + the broker binary
        # Let the loop run until a trained version serves all traffic and has answered enough
        # held-out prompts to be measured (or the budget is spent: the asserts below then fail).
        t_traffic = time.monotonic()
        cfg = load_config(environ={}, workspace=ws)
        reg = Registry(cfg.registry_dir)
        while time.monotonic() - t_traffic < MAX_TRAFFIC_MINUTES * 60:
            assert p.poll() is None, (tmp_path / "demo.log").read_text()[-3000:]
            time.sleep(5)
            if time.monotonic() - t_traffic < len(CHAOS_ORDER) * CHAOS_EVERY_S + 10:
                continue  # every stage gets its SIGKILL first
            promoted = reg.pointer("policy", "promoted") if reg.kind_dir("policy").is_dir() else None
            evals = (read_status(cfg).get("by_version") or {}).get("eval") or {}
            served, base = evals.get(promoted) or {}, evals.get("base") or {}
            if promoted and served.get("n", 0) >= MIN_EVAL + 5 and base.get("n", 0) >= MIN_EVAL \
                    and served["p_mean"] - base["p_mean"] >= MIN_IMPROVEMENT_P + STOP_MARGIN_P:
                break
        procs = _descendants(p.pid)  # now including the scheduler's Ray cluster
        os.killpg(p.pid, signal.SIGINT)  # Ctrl-C
        rc = p.wait(timeout=150)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    out = (tmp_path / "demo.log").read_text()
    assert rc in (0, 130), out[-3000:]
    time.sleep(2)
    left = [c for c in procs if not process_gone(c)]
    assert not left, f"processes outlived the demo: {[Path(f'/proc/{c}/cmdline').read_text()[:80] for c in left]}"
    # including a Ray cluster orphaned by the SIGKILLed scheduler (Ray's processes fate-share)
    ray_dir = str(ray_temp_dir(cfg))
    orphans = []
    for cmd in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if ray_dir in cmd.read_bytes().decode(errors="replace") and not process_gone(int(cmd.parent.name)):
                orphans.append(int(cmd.parent.name))
        except OSError:
            continue
    assert not orphans, f"Ray processes of this workspace are still running: {orphans}"
    [report] = list((ws / "reports").iterdir())
    s = json.loads((report / "summary.json").read_text())

    # every stage was SIGKILLed once and restarted by the supervisor
    killed = {k["service"] for k in s["chaos_kills"]}
    assert killed == set(CHAOS_ORDER) == {"ingest", "serve", "reward", "scheduler", "collector", "controller",
                                          "gateway"}, s["chaos_kills"]
    assert all(s["restarts"][k] >= 1 for k in killed), s["restarts"]

    # nothing acknowledged was lost, nothing duplicated (exactly-once ingest)
    from looprl.storage.events import EventLog

    el = EventLog(ws / "events")
    rows = el.query("SELECT count(*) AS n, count(DISTINCT event_id) AS d FROM feedback").to_pylist()[0]
    assert rows["n"] == rows["d"] == s["feedback_sent"] > 100, (rows, s["feedback_sent"])

    # it learned: the model serving all traffic beats the base on held-out prompts
    why = _learning_record(report, ws)
    assert s["reward_updates"] >= 2 and s["policy_versions"] >= 1, why
    assert s["promoted"] is not None, f"no version was promoted\n{why}"
    assert s["base"]["n"] >= MIN_EVAL and s["served"]["n"] >= MIN_EVAL, why
    assert s["improvement_p"] >= MIN_IMPROVEMENT_P, f"{s['base']} {s['served']}\n{why}"
