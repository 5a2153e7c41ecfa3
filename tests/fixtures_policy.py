"""Fixtures of the policy tests: the shared tiny MoE base (`tiny_base`) and configs pointing at it."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def policy_base(tiny_base) -> Path:
    """The base checkpoint the policy tests train on: the session's pre-trained tiny base."""
    return Path(tiny_base)


@pytest.fixture
def policy_cfg(tmp_path, policy_base):
    """A factory of small, fast PPO configs in a fresh workspace, on the session's tiny base."""
    from looprl.ops.core.config import load_config

    def make(**policy):
        base = dict(rollout_batch_size=16, minibatch_size=8, max_new_tokens=8, ppo_epochs=2, steps=4,
                    checkpoint_every=2, recent_prompts=0)
        base.update(policy)
        return load_config(environ={}, workspace=tmp_path / "ws", model={"base_path": str(policy_base)},
                           policy=base)

    return make


PPO_TRAINED_STEPS = 30


@pytest.fixture(scope="session")
def ppo_trained(tmp_path_factory, policy_base):
    """One PPO run at the default PPO settings against the cheerful-word reward, shared by the
    training and gate tests: (cfg, TrainResult). Read-only: copy its registry before changing it."""
    import torch

    from looprl.ops.core.config import load_config
    from looprl.ops.sim.scoring import CheerfulScorer
    from looprl.policy.trainer import train

    torch.set_num_threads(1)
    cfg = load_config(environ={}, workspace=tmp_path_factory.mktemp("ppo-trained"),
                      model={"base_path": str(policy_base)},
                      policy=dict(steps=PPO_TRAINED_STEPS, checkpoint_every=10, recent_prompts=0))
    return cfg, train(cfg, scorer=CheerfulScorer(), use_ray=False, resume=False)


def trained_registry_copy(tmp_path_factory, ppo_trained, name: str, **sections):
    """A workspace holding a copy of ``ppo_trained``'s registry (tests that publish or gate write
    to it), on the same base and PPO settings, plus config ``sections``: (cfg, trained version)."""
    import shutil

    from looprl.ops.core.config import load_config

    trained_cfg, result = ppo_trained
    ws = tmp_path_factory.mktemp(name)
    shutil.copytree(trained_cfg.registry_dir, ws / "registry")
    cfg = load_config(environ={}, workspace=ws, model={"base_path": str(trained_cfg.base_path)},
                      policy=trained_cfg.policy.model_dump(), **sections)
    return cfg, result.manifest.version
