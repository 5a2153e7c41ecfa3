"""What PPO maximizes: anything with ``.score(prompts, completions) -> (B,) float32`` and ``.version``.
Prompts are ``Chat`` conversations (``looprl.ops.core.chat``), completions the answers' text.

In production that is the newest reward model published in the registry, pinned for a whole run
(resuming a run re-loads the same version). Tests, benchmarks and ``--scorer cheerful`` use a
programmatic reward with the same interface whose optimum is known
(``looprl.ops.sim.scoring.CheerfulScorer``).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from looprl.ops.core.chat import Chat
from looprl.ops.core.config import LooprlConfig
from looprl.reward.model import load_reward_model
from looprl.storage.registry import Registry, RegistryError


@runtime_checkable
class Scorer(Protocol):
    version: str

    def score(self, prompts: list[Chat], completions: list[str]) -> torch.Tensor: ...


class RegistryScorer:
    """A published reward model, loaded lazily (so a Ray worker loads it, not the driver's pickle)."""

    # The process that scores loads a copy of the base for it (the start-up memory check counts it).
    loads_reward_model = True

    def __init__(self, cfg: LooprlConfig, version: str):
        self.cfg, self.version = cfg, version
        self._model = None

    def __getstate__(self):  # ship the recipe to workers, never the weights
        return {"cfg": self.cfg, "version": self.version, "_model": None}

    def score(self, prompts: list[Chat], completions: list[str]) -> torch.Tensor:
        if self._model is None:
            self._model = load_reward_model(self.cfg, version=self.version)
        with torch.no_grad():
            return self._model.score(prompts, completions).float().cpu()


def registry_scorer(cfg: LooprlConfig, version: str | None = None) -> RegistryScorer:
    """The reward model to train against: `version`, or the newest published one."""
    if version is None:
        latest = Registry(cfg.registry_dir).latest("reward")
        if latest is None:
            raise RegistryError(
                f"no reward model published in {cfg.registry_dir}/reward: train one first (looprl reward update), "
                "or pass a programmatic scorer"
            )
        version = latest.version
    return RegistryScorer(cfg, version)
