"""policy.degenerate_penalty: a reward model that scores empty or looping answers highest does not
pull PPO towards them when the penalty is on (the gate would reject such a candidate)."""

import torch

from looprl.ops.core.config import load_config
from looprl.policy.trainer import train

torch.set_num_threads(1)  # 2 threads on busy shared cores spin and crawl

POLICY = dict(rollout_batch_size=8, minibatch_size=4, max_new_tokens=6, steps=12, checkpoint_every=12,
              recent_prompts=0, seed=5, init_kl_coef=0.0, learning_rate=2e-2, offpolicy=False)


class LovesDegenerate:
    """A reward model gone wrong: the fewer distinct characters, the better. An empty answer is
    best, one token over and over next: PPO finds empty answers within 4 steps."""

    version = "programmatic:loves-degenerate"

    def score(self, prompts, completions):
        return torch.tensor([-float(len(set(c))) for c in completions])


def _degenerate(tmp_path, name, policy_base, **policy):
    cfg = load_config(environ={}, workspace=tmp_path / name, model={"base_path": str(policy_base)},
                      policy={**POLICY, **policy})
    curve = train(cfg, scorer=LovesDegenerate(), use_ray=False, publish=False).history
    assert len(curve) == 12 and all(0.0 <= h["degenerate_fraction"] <= 1.0 for h in curve)
    return [h["degenerate_fraction"] for h in curve]


def test_the_penalty_keeps_ppo_from_degenerate_answers(tmp_path, policy_base):
    free = _degenerate(tmp_path, "free", policy_base)
    capped = _degenerate(tmp_path, "capped", policy_base, degenerate_penalty=1.0)
    assert free[:2] == capped[:2]  # the same first samples: only the rewards differ
    late_free, late_capped = sum(free[-4:]) / 4, sum(capped[-4:]) / 4
    assert late_free >= 0.5, f"the reward model did not pull the free run towards empty answers: {free}"
    assert late_capped < late_free - 0.3, f"free {free}, capped {capped}"
