"""SIGKILL of the reward updater (a real subprocess) while training, committing or publishing:
the registry never shows a partial version, and the restarted updater resumes from its committed
state without training any event twice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from looprl.ops.core.config import load_config
from looprl.ops.sim.feedback import SimulatedLog, simulate_feedback
from looprl.reward import updater as U
from looprl.reward.model import KIND, load_reward_model
from looprl.storage.registry import Registry

torch.set_num_threads(1)

# The child runs one update and SIGKILLs itself at the chosen point.
CHILD = textwrap.dedent("""
    import os, signal, sys, shutil
    import torch
    torch.set_num_threads(1)
    from looprl.ops.core.config import load_config
    from looprl.storage.events import EventLog
    from looprl.reward import updater as U, train as T
    from looprl.reward.state import StateStore

    ws, events, base, where = sys.argv[1:5]
    cfg = load_config(environ={}, workspace=ws, model={"base_path": base},
                      reward={"min_new_events": 1, "epochs_per_update": 1, "max_user_share": 1.0})
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    if where == "train":  # in the middle of the training loop
        real, calls = T.batch_loss, [0]
        def batch_loss(*a, **k):
            calls[0] += 1
            if calls[0] == 3:
                die()
            return real(*a, **k)
        T.batch_loss = batch_loss
    elif where == "commit":  # consumed ids appended, state.json not yet replaced
        StateStore.commit = lambda self, state: die()
    elif where == "publish":  # committed; registry copy half done (inside its temp dir)
        real_copy = shutil.copyfile
        def copyfile(src, dst, *a, **k):
            out = real_copy(src, dst, *a, **k)
            if "/registry/" in str(dst) and ".tmp-" in str(dst):
                die()
            return out
        shutil.copyfile = copyfile
    U.RewardUpdater(cfg, connect=EventLog(events).connect).update()
    print("finished without being killed")
""")


def consumed(cfg) -> list[str]:
    path = cfg.state_dir / "reward" / "consumed.log"
    return [line.split("\t")[1] for line in path.read_text().splitlines()] if path.is_file() else []


def registry_is_whole(cfg) -> list[str]:
    """Every visible version verifies; returns the versions."""
    reg = Registry(cfg.registry_dir)
    kind_dir = cfg.registry_dir / KIND
    visible = reg.versions(KIND)
    if kind_dir.is_dir():
        # No directory that looks like a version lacks its manifest (readers would trip on it).
        assert sorted(p.name for p in kind_dir.iterdir() if p.is_dir() and p.name.startswith("v")) == visible
    for v in visible:
        reg.verify(KIND, v)
    latest = reg.pointer(KIND)
    assert latest is None or latest in visible
    return visible


@pytest.mark.parametrize("where", ["train", "commit", "publish"])
def test_sigkill_then_resume(where, tmp_path, tiny_base):
    ws, events_dir = tmp_path / "ws", tmp_path / "events"
    cfg = load_config(environ={}, workspace=ws, model={"base_path": str(tiny_base)},
                      # all 60 events in one update: simulate_feedback's 8 users, their shares not capped
                      reward={"min_new_events": 1, "epochs_per_update": 1, "max_user_share": 1.0})
    views = SimulatedLog(events_dir)
    batch = simulate_feedback(60, seed=11)
    views.append(batch)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(script), str(ws), str(events_dir), str(tiny_base), where],
                          capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == -9, proc.stdout + proc.stderr[-3000:]

    assert registry_is_whole(cfg) == []  # killed before any version was complete
    if where == "publish":
        assert list((cfg.registry_dir / KIND).glob(".tmp-*"))  # the half copy exists, invisible
    state_file = cfg.state_dir / "reward" / "state.json"
    committed = json.loads(state_file.read_text())["update"] if state_file.is_file() else 0
    assert committed == (1 if where == "publish" else 0)

    with U.RewardUpdater(cfg, connect=views.connect) as up:
        if where == "publish":
            # The committed update is published on restart, without training it again.
            assert up.state.update == 1 and not up.state.pending_publish and up.state.published == "v1"
            assert up.update() is None
        else:
            # Nothing was committed: the update is redone from scratch, once.
            r = up.update()
            assert r.update == 1 and r.new_events == 60 and r.version == "v1"
    assert registry_is_whole(cfg) == ["v1"]
    ids = consumed(cfg)
    assert len(ids) == len(set(ids)) == 60 and set(ids) == set(batch.event_ids)
    m = Registry(cfg.registry_dir).latest(KIND)
    assert m.extra["update"] == 1 and m.watermark["consumed_events"] == 60
    assert load_reward_model(cfg).version == "v1"
    hist = [json.loads(x) for x in (cfg.state_dir / "reward_history.jsonl").read_text().splitlines()]
    assert [h["update"] for h in hist] == [1]
