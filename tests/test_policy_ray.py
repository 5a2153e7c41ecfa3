"""The PPO job on Ray (one local Ray for the module: starting Ray costs seconds on 2 cores):
same numbers as the in-process loop, a killed rollout worker is restarted and its call retried,
a killed learner fails the job with a clear error instead of hanging."""

import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from served_testing import write_labelled_answers

from looprl.ops.core.config import load_config
from looprl.policy.ray_backend import PolicyJobError, init_ray, ray_temp_dir
from looprl.policy.served import load_tokenizer
from looprl.ops.sim.scoring import CheerfulScorer
from looprl.policy.trainer import train
from looprl.storage.registry import Registry

ray = pytest.importorskip("ray")
torch.set_num_threads(1)  # 2 threads on busy shared cores spin and crawl

POLICY = dict(rollout_batch_size=8, minibatch_size=4, max_new_tokens=6, steps=3, checkpoint_every=2,
              recent_prompts=0, seed=3, ray_timeout_s=120, offpolicy_samples=4)


def _cfg(ws: Path, base: Path, **policy):
    return load_config(environ={}, workspace=ws, model={"base_path": str(base)}, policy=dict(POLICY, **policy))


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory, policy_base):
    cfg = _cfg(tmp_path_factory.mktemp("ray-ws"), policy_base)
    temp = ray_temp_dir(cfg)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    started = init_ray(cfg, num_cpus=2)
    yield
    if started:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def _adapter(cfg, version):
    _, d = Registry(cfg.registry_dir).open("policy", version)
    return load_file(str(d / "adapter_model.safetensors"))


def test_ray_temp_dir_is_short_enough_for_unix_sockets(tmp_path):
    long_ws = tmp_path / ("w" * 80)
    cfg = load_config(environ={}, workspace=long_ws)
    d = ray_temp_dir(cfg)
    assert len(str(d)) <= 40 and not str(d).startswith(str(long_ws))
    short = load_config(environ={}, workspace=Path("/tmp/ws"))
    assert ray_temp_dir(short) == Path("/tmp/ws/ray")


def test_ray_job_matches_local_and_survives_a_killed_rollout_worker(local_ray, tmp_path, policy_base):
    # with labelled served answers in the log: they travel to the learner actor with the rollouts
    tok = load_tokenizer(policy_base)
    local_cfg = _cfg(tmp_path / "local", policy_base)
    write_labelled_answers(local_cfg.events_dir, tok, 8, max_tokens=POLICY["max_new_tokens"])
    local = train(local_cfg, scorer=CheerfulScorer(), use_ray=False)

    killed = []

    def kill_worker(step, stats, backend):
        if step == 0:
            pid = backend.worker_pids()[0]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    ray_cfg = _cfg(tmp_path / "ray", policy_base)
    write_labelled_answers(ray_cfg.events_dir, tok, 8, max_tokens=POLICY["max_new_tokens"])
    t0 = time.monotonic()
    result = train(ray_cfg, scorer=CheerfulScorer(), use_ray=True, on_step=kill_worker)
    assert killed and time.monotonic() - t0 < 150
    assert result.manifest is not None and result.manifest.status == "candidate"
    # rollout calls carry their weights and seeds, so the retried call recomputes the same batch
    a, b = _adapter(local_cfg, local.manifest.version), _adapter(ray_cfg, result.manifest.version)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)
    assert [r["reward_mean"] for r in result.history] == pytest.approx([r["reward_mean"] for r in local.history])
    assert [r["offpolicy_samples"] for r in result.history] == [r["offpolicy_samples"] for r in local.history] == [4] * 3


def test_killed_learner_fails_the_job_clearly(local_ray, tmp_path, policy_base):
    def kill_learner(step, stats, backend):
        if step == 0:
            os.kill(backend.learner_pid(), signal.SIGKILL)

    cfg = _cfg(tmp_path / "ws", policy_base, steps=4)
    t0 = time.monotonic()
    with pytest.raises(PolicyJobError, match="actor died"):
        train(cfg, scorer=CheerfulScorer(), use_ray=True, on_step=kill_learner)
    assert time.monotonic() - t0 < 120
    assert not list(Registry(cfg.registry_dir).versions("policy"))  # no half-trained candidate


def test_stuck_rollout_times_out_instead_of_hanging(local_ray, tmp_path, policy_base):
    class StuckScorer:  # defined here so Ray pickles it by value
        version = "programmatic:stuck"

        def score(self, prompts, completions):
            time.sleep(60)
            return torch.zeros(len(prompts))

    cfg = _cfg(tmp_path / "ws", policy_base, ray_timeout_s=4)
    t0 = time.monotonic()
    with pytest.raises(PolicyJobError, match=r"^rollout: no answer within 4"):
        train(cfg, scorer=StuckScorer(), use_ray=True)
    assert time.monotonic() - t0 < 45  # actor start + one timeout, never the scorer's 60 s
