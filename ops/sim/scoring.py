"""Programmatic rewards with a known optimum: the default simulated user's taste, counted directly
instead of learned by a reward model (``looprl policy train --scorer cheerful``), and any hidden
preference read as a reward (an oracle reward model). Tests and benchmarks train and judge PPO with
them; they have the interface of ``looprl.policy.scoring.Scorer``."""

from __future__ import annotations

import math

import torch

from looprl.ops.core.chat import Chat
from looprl.ops.sim.preference import Preference, positive_word_count


class CheerfulScorer:
    """Reward = number of cheerful words (``preference.POSITIVE_WORDS``), capped."""

    version = "programmatic:cheerful"

    def __init__(self, cap: int = 4):
        self.cap = cap

    def score(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        return torch.tensor([float(min(self.cap, positive_word_count(c))) for c in completions])


class PreferenceScorer:
    """Reward = the log-odds of a hidden preference's P(thumbs-up): what a reward model fitted to
    the users' thumbs and comparisons (Bradley-Terry) would score at best."""

    def __init__(self, preference: Preference, name: str):
        self.preference = preference
        self.version = f"programmatic:preference:{name}"

    def score(self, prompts: list[Chat | str], completions: list[str]) -> torch.Tensor:
        out = []
        for prompt, completion in zip(prompts, completions, strict=True):
            p = self.preference(prompt.last_user() if isinstance(prompt, Chat) else prompt, completion)
            p = min(max(p, 1e-3), 1.0 - 1e-3)  # a preference may say 0 or 1: finite rewards
            out.append(math.log(p / (1.0 - p)))
        return torch.tensor(out, dtype=torch.float32)
