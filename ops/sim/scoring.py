"""A programmatic reward with a known optimum (``looprl policy train --scorer cheerful``): the
default simulated user's taste, counted directly instead of learned by a reward model. Tests and
benchmarks train and judge PPO with it; it has the interface of ``looprl.policy.scoring.Scorer``."""

from __future__ import annotations

import torch

from looprl.ops.sim.preference import positive_word_count


class CheerfulScorer:
    """Reward = number of cheerful words (``preference.POSITIVE_WORDS``), capped."""

    version = "programmatic:cheerful"

    def __init__(self, cap: int = 4):
        self.cap = cap

    def score(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        return torch.tensor([float(min(self.cap, positive_word_count(c))) for c in completions])
