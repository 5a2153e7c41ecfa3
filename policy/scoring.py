"""What PPO maximizes: anything with ``.score(prompts, completions) -> (B,) float32`` and ``.version``.

In production that is the newest reward model published in the registry, pinned for a whole run
(resuming a run re-loads the same version). Tests and benchmarks use `CheerfulScorer`, a
programmatic reward with the same interface whose optimum is known.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from looprl.ops.core.config import LooprlConfig
from looprl.ops.preference import positive_word_count


@runtime_checkable
class Scorer(Protocol):
    version: str

    def score(self, prompts: list[str], completions: list[str]) -> torch.Tensor: ...


class CheerfulScorer:
    """Reward = number of cheerful words (looprl.ops.preference.POSITIVE_WORDS), capped."""

    version = "programmatic:cheerful"

    def __init__(self, cap: int = 4):
        self.cap = cap

    def score(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        return torch.tensor([float(min(self.cap, positive_word_count(c))) for c in completions])


class RegistryScorer:
    """A published reward model, loaded lazily (so a Ray worker loads it, not the driver's pickle)."""

    def __init__(self, cfg: LooprlConfig, version: str):
        self.cfg, self.version = cfg, version
        self._model = None

    def __getstate__(self):  # ship the recipe to workers, never the weights
        return {"cfg": self.cfg, "version": self.version, "_model": None}

    def score(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        if self._model is None:
            from looprl.reward.model import load_reward_model

            self._model = load_reward_model(self.cfg, version=self.version)
        with torch.no_grad():
            return self._model.score(prompts, completions).float().cpu()


def registry_scorer(cfg: LooprlConfig, version: str | None = None) -> RegistryScorer:
    """The reward model to train against: `version`, or the newest published one."""
    from looprl.storage.registry import Registry, RegistryError

    if version is None:
        latest = Registry(cfg.registry_dir).latest("reward")
        if latest is None:
            raise RegistryError(
                f"no reward model published in {cfg.registry_dir}/reward: train one first (looprl reward), "
                "or pass a programmatic scorer"
            )
        version = latest.version
    return RegistryScorer(cfg, version)


def scorer_from_name(cfg: LooprlConfig, name: str, version: str | None = None) -> Scorer:
    """CLI helper: "registry" (newest or given reward version) or "cheerful" (programmatic)."""
    if name == "registry":
        return registry_scorer(cfg, version)
    if name == "cheerful":
        return CheerfulScorer()
    raise ValueError(f"unknown scorer {name!r}: expected 'registry' or 'cheerful'")
