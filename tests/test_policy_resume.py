"""SIGKILL a PPO run after a checkpoint, resume it, and end where an uninterrupted run ends."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from looprl.ops.core.config import load_config
from looprl.policy.checkpoint import RunDir, runs_root
from looprl.ops.sim.scoring import CheerfulScorer
from looprl.policy.trainer import train
from looprl.storage.registry import Registry

torch.set_num_threads(1)  # 2 threads on busy shared cores spin and crawl

POLICY = dict(rollout_batch_size=8, minibatch_size=4, max_new_tokens=6, steps=6, checkpoint_every=2,
              recent_prompts=0, seed=7)

# The child trains; with HANG_AT_STEP set it stops after that step (past the step-2 checkpoint,
# before the step-4 one) and waits to be killed, so the kill lands at a known point.
CHILD = r"""
import json, os, sys, time, torch
torch.set_num_threads(1)  # 2 threads on busy shared cores spin and crawl
from looprl.ops.core.config import load_config
from looprl.ops.sim.scoring import CheerfulScorer
from looprl.policy.trainer import train
ws, base, policy = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
hang = int(os.environ.get("HANG_AT_STEP", "-1"))
def on_step(step, stats, backend):
    if step == hang:
        print("HANGING", flush=True)
        time.sleep(120)
cfg = load_config(environ={}, workspace=ws, model={"base_path": base}, policy=policy)
r = train(cfg, run_id="run-a", scorer=CheerfulScorer(), use_ray=False, on_step=on_step)
print("DONE", r.manifest.version, flush=True)
"""


def _child(ws: Path, base: Path, hang: int | None) -> subprocess.Popen:
    env = dict(os.environ, HANG_AT_STEP=str(hang if hang is not None else -1), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", CHILD, str(ws), str(base), json.dumps(POLICY)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)


def _adapter(cfg, version: str) -> dict[str, torch.Tensor]:
    _, d = Registry(cfg.registry_dir).open("policy", version)
    return load_file(str(d / "adapter_model.safetensors"))


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, policy_base):
    ws = tmp_path / "killed"
    proc = _child(ws, policy_base, hang=3)
    try:
        line = ""
        deadline = time.monotonic() + 120
        while "HANGING" not in line and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                pytest.fail(f"child exited early with {proc.returncode}")
        assert "HANGING" in line, "child never reached the hang point"
        run = RunDir(runs_root(ws / "state") / "run-a")
        assert run.latest_step() == 2  # steps 0-3 done in memory, only the step-2 checkpoint on disk
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not run.is_done()

    # resume in a fresh process: same run id, no hang
    resumed = _child(ws, policy_base, hang=None)
    out, _ = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, out
    version = out.strip().split()[-1]
    assert run.is_done() and run.done_info()["version"] == version

    # the same job, never interrupted
    cfg_ref = load_config(environ={}, workspace=tmp_path / "clean", model={"base_path": str(policy_base)},
                          policy=POLICY)
    ref = train(cfg_ref, run_id="run-a", scorer=CheerfulScorer(), use_ray=False)

    cfg_killed = load_config(environ={}, workspace=ws, model={"base_path": str(policy_base)}, policy=POLICY)
    a, b = _adapter(cfg_killed, version), _adapter(cfg_ref, ref.manifest.version)
    assert a.keys() == b.keys()
    moved = 0.0
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)
        moved = max(moved, float(b[k].abs().max())) if "lora_B" in k else moved
    assert moved > 1e-4, "the adapters trained at all (else equality would be trivial)"
    # the reward curve of the resumed run is the uninterrupted one (history restored from the checkpoint)
    curve_a = Registry(cfg_killed.registry_dir).manifest("policy", version).metrics["curve"]
    curve_b = ref.manifest.metrics["curve"]
    assert [r["reward_mean"] for r in curve_a] == pytest.approx([r["reward_mean"] for r in curve_b], abs=1e-6)


def test_resume_refuses_another_base(tmp_path, policy_base):
    cfg = load_config(environ={}, workspace=tmp_path, model={"base_path": str(policy_base)},
                      policy=dict(POLICY, steps=2))
    train(cfg, run_id="run-b", scorer=CheerfulScorer(), use_ray=False, publish=False)
    meta_path = runs_root(cfg.state_dir) / "run-b" / "run.json"
    meta = json.loads(meta_path.read_text())
    meta["base_checksum"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    (meta_path.parent / "done.json").unlink()
    from looprl.policy.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="base"):
        train(cfg, run_id="run-b", scorer=CheerfulScorer(), use_ray=False)


def test_a_run_publishes_once_and_trains_in_one_process(tmp_path, policy_base):
    from looprl.policy.checkpoint import CheckpointError

    cfg = load_config(environ={}, workspace=tmp_path, model={"base_path": str(policy_base)},
                      policy=dict(POLICY, steps=2))
    first = train(cfg, run_id="run-c", scorer=CheerfulScorer(), use_ray=False)
    run = RunDir(runs_root(cfg.state_dir) / "run-c")
    (run.path / "done.json").unlink()  # as if killed after publishing, before recording it
    again = train(cfg, run_id="run-c", scorer=CheerfulScorer(), use_ray=False)
    assert again.manifest.version == first.manifest.version
    assert Registry(cfg.registry_dir).versions("policy") == [first.manifest.version]

    held = RunDir(runs_root(cfg.state_dir) / "run-d").lock()  # another process is training run-d
    try:
        with pytest.raises(CheckpointError, match="another process"):
            train(cfg, run_id="run-d", scorer=CheerfulScorer(), use_ray=False)
    finally:
        held.release()
