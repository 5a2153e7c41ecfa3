"""The KL stop (policy.stop_kl): a run whose trailing rollout KL reaches the stop ends there and
publishes its newest checkpoint saved under it, not the weights it reached."""

import torch
from safetensors.torch import load_file

from looprl.ops.core.config import load_config
from looprl.ops.sim.scoring import CheerfulScorer
from looprl.policy.checkpoint import RunDir, runs_root
from looprl.policy.trainer import KL_STOP_WINDOW, train
from looprl.storage.registry import Registry

torch.set_num_threads(1)  # 2 threads on busy shared cores spin and crawl

POLICY = dict(rollout_batch_size=8, minibatch_size=4, max_new_tokens=6, steps=10, checkpoint_every=2,
              recent_prompts=0, seed=3, init_kl_coef=0.0, learning_rate=2e-2, offpolicy=False)


def _trailing(kl: list[float], done: int) -> float:
    w = kl[max(0, done - KL_STOP_WINDOW):done]
    return sum(w) / len(w)


def test_kl_stop_publishes_the_last_checkpoint_under_it(tmp_path, policy_base):
    def cfg(name: str, **policy):
        return load_config(environ={}, workspace=tmp_path / name, model={"base_path": str(policy_base)},
                           policy={**POLICY, **policy})

    # without a stop: every step runs; its KL curve says where a stop would fall (same seed, same steps)
    free = train(cfg("free"), scorer=CheerfulScorer(), use_ray=False)
    kl = [h["kl"] for h in free.manifest.metrics["curve"]]
    assert len(kl) == 10 and free.manifest.metrics["kl_stop"] is None
    stop_kl = (_trailing(kl, 2) + max(_trailing(kl, d) for d in range(3, 11))) / 2
    assert stop_kl > _trailing(kl, 2), f"the KL never rose after the first checkpoint: {kl}"
    good, stopped_at = None, None
    for done in range(1, 11):
        if good is not None and _trailing(kl, done) >= stop_kl:
            stopped_at = done
            break
        if done % 2 == 0 and _trailing(kl, done) < stop_kl:
            good = done
    assert good is not None and stopped_at is not None

    at_stop = {}

    def on_step(step, stats, backend):
        at_stop["value_head"] = {k: v.clone() for k, v in backend.learner.value_head.state_dict().items()}

    c = cfg("stopped", stop_kl=stop_kl)
    r = train(c, scorer=CheerfulScorer(), use_ray=False, on_step=on_step)
    m = r.manifest.metrics
    assert m["kl_stop"]["step"] == stopped_at and m["kl_stop"]["published_step"] == good
    assert m["kl_stop"]["trailing_kl"] >= stop_kl
    assert [h["kl"] for h in m["curve"]] == kl[:stopped_at]  # the steps before the stop ran as without it
    assert m["steps"] == stopped_at
    # the reward and KL at the end are the published checkpoint's; the KL coefficient is the newest
    assert m["kl_last"] == sum(kl[max(0, good - 3):good]) / len(kl[max(0, good - 3):good])
    assert m["kl_coef_last"] == m["curve"][-1]["kl_coef_next"]

    # the published weights are the checkpoint's, not those the run reached at the stop
    _, d = Registry(c.registry_dir).open("policy", r.manifest.version)
    ckpt = RunDir(runs_root(c.state_dir) / r.run_id).checkpoints / f"step-{good:06d}"
    published, saved = load_file(str(d / "value_head.safetensors")), load_file(str(ckpt / "value_head.safetensors"))
    assert published.keys() == saved.keys() and all(torch.equal(published[k], saved[k]) for k in saved)
    assert not all(torch.equal(published[k], at_stop["value_head"][k]) for k in saved)
    lora, saved_lora = load_file(str(d / "adapter_model.safetensors")), load_file(str(ckpt / "adapter.safetensors"))
    assert lora.keys() == saved_lora.keys() and all(torch.equal(lora[k], saved_lora[k]) for k in lora)
