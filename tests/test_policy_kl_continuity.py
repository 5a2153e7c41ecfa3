"""The KL coefficient is one controller across runs: a run continuing a version starts from the
coefficient the newest run ended with, also when that run's candidate was rejected."""

import pytest
import torch

from looprl.ops.core.config import load_config
from looprl.ops.sim.scoring import CheerfulScorer
from looprl.policy.trainer import train
from looprl.storage.registry import Registry

torch.set_num_threads(1)  # 2 threads on busy shared cores spin and crawl


def test_a_run_continues_the_newest_runs_kl_coefficient(tmp_path, policy_base):
    cfg = load_config(environ={}, workspace=tmp_path / "ws", model={"base_path": str(policy_base)},
                      policy=dict(rollout_batch_size=8, minibatch_size=4, max_new_tokens=6, steps=4,
                                  checkpoint_every=4, recent_prompts=0, offpolicy=False, init_kl_coef=0.3,
                                  target_kl=50.0, continue_from="newest_gated"))
    reg = Registry(cfg.registry_dir)

    def run() -> tuple[str, list[float], float]:
        m = train(cfg, scorer=CheerfulScorer(), use_ray=False, resume=False).manifest
        return m.version, [h["kl_coef"] for h in m.metrics["curve"]], m.metrics["kl_coef_last"]

    v1, coefs1, last1 = run()  # from the base: the configured coefficient
    assert coefs1[0] == pytest.approx(0.3) and last1 < 0.3  # far under the target: the controller lowers it
    reg.set_status("policy", v1, "gated", "test")
    v2, coefs2, last2 = run()  # continues v1, weights and coefficient
    assert reg.manifest("policy", v2).parent == v1 and coefs2[0] == pytest.approx(last1) and last2 < last1
    reg.set_status("policy", v2, "rejected", "test: over the KL cap")
    v3, coefs3, _ = run()  # continues v1 again (v2 left the line), with v2's coefficient, not v1's
    assert reg.manifest("policy", v3).parent == v1
    assert coefs3[0] == pytest.approx(last2) and coefs3[0] != pytest.approx(last1)
