"""The PPO job on Ray (one local Ray for the module: starting Ray costs seconds on 2 cores):
same numbers as the in-process loop, a killed rollout worker is restarted and its call retried,
a killed learner fails the job with a clear error instead of hanging, and actors kept between
jobs (the test's Ray is not the job's own, as the scheduler's is not) compute what new ones would."""

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
from looprl.policy.ray_backend import PolicyJobError, init_ray, kept_actors, ray_temp_dir
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
    assert kept_actors() == []  # a failed job leaves no actor for the next one


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
    assert kept_actors() == []


def test_a_learner_that_trained_starts_its_next_job_as_a_new_one(policy_base, tmp_path):
    from looprl.policy.workers import Learner, PPOJob, RolloutWorker

    def learner_and_batch(learner, cfg):
        worker = RolloutWorker(cfg, CheerfulScorer(), model=learner.model, tok=learner.tok)
        return worker.rollout(None, ["what is the sky like", "tell me about cats"] * 2, (1, 2, "rollout", 0))

    first, second = _cfg(tmp_path / "a", policy_base, seed=11), _cfg(tmp_path / "b", policy_base, seed=4)
    new = Learner(second)
    kept = Learner(first)
    kept.learn([learner_and_batch(kept, first)], 0)  # trained: adapter, value head, optimizer, KL all moved
    assert kept.kl_ctl.value != pytest.approx(new.kl_ctl.value)
    kept.start_job(PPOJob("job-2", second, CheerfulScorer()))

    for name, a in new.lora_state().items():
        torch.testing.assert_close(kept.lora_state()[name], a, atol=0, rtol=0, msg=name)
    for name, a in new.value_head.state_dict().items():
        torch.testing.assert_close(kept.value_head.state_dict()[name], a, atol=0, rtol=0, msg=name)
    assert kept.optimizer.state_dict()["state"] == {} and kept.kl_ctl.value == new.kl_ctl.value
    # and the job computes the same numbers from there
    a, b = new.learn([learner_and_batch(new, second)], 0), kept.learn([learner_and_batch(kept, second)], 0)
    for k in ("reward_mean", "kl", "policy_loss", "value_loss", "kl_coef_next"):
        assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), k
    kept.start_job(PPOJob("job-2", second, CheerfulScorer()))  # the same job again: nothing is reset
    assert kept.optimizer.state_dict()["state"] != {}


def test_kept_actors_serve_the_next_job_as_new_ones_would(local_ray, tmp_path, policy_base):
    from looprl.policy.ray_backend import actor_key, kept_actors, kill_kept_actors

    pids = []

    def learner_pid(step, stats, backend):
        if step == 0:
            pids.append(backend.learner_pid())

    first = _cfg(tmp_path / "first", policy_base, seed=21)
    train(first, scorer=CheerfulScorer(), use_ray=True, on_step=learner_pid)
    key = actor_key(first)
    assert len(kept_actors(key)) == 2  # learner + one rollout worker, alive after the job ended

    second = _cfg(tmp_path / "second", policy_base, seed=5)
    assert actor_key(second) == key  # another seed and workspace: the same actors serve it
    warm = train(second, scorer=CheerfulScorer(), use_ray=True, on_step=learner_pid)
    assert pids[1] == pids[0]

    kill_kept_actors()
    assert kept_actors() == []
    third = _cfg(tmp_path / "third", policy_base, seed=5)
    cold = train(third, scorer=CheerfulScorer(), use_ray=True, on_step=learner_pid)
    assert pids[2] != pids[0]
    assert [r["reward_mean"] for r in warm.history] == pytest.approx([r["reward_mean"] for r in cold.history])
    assert [r["kl"] for r in warm.history] == pytest.approx([r["kl"] for r in cold.history], rel=1e-4)
    a, b = _adapter(second, warm.manifest.version), _adapter(third, cold.manifest.version)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)

    # another LoRA shape cannot reuse them: the kept ones go, the new ones stay
    other = _cfg(tmp_path / "other", policy_base, lora_rank=4, steps=1)
    train(other, scorer=CheerfulScorer(), use_ray=True)
    assert kept_actors(key) == [] and len(kept_actors(actor_key(other))) == 2
