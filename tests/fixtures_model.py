"""The shared tiny pre-trained MoE base (`tiny_base`), built once per test session.

Same code path as `looprl init` (`create_base`) with a smaller pre-training budget, so every
stage's tests run against a base that writes word-like answers, in ~15 s of one CPU core."""

from __future__ import annotations

from pathlib import Path

import pytest

TINY_PRETRAIN_STEPS = 250
TINY_DOCS = 2500


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """Path of a tiny pre-trained base checkpoint dir (config.json, model.safetensors, tokenizer)."""
    from looprl.ops.core.config import load_config
    from looprl.ops.sim.base import create_base

    root = tmp_path_factory.mktemp("tiny-base")
    cfg = load_config(environ={}, workspace=root / "ws", model={"pretrain_steps": TINY_PRETRAIN_STEPS})
    return create_base(cfg, out_dir=root / "base", progress=False, n_docs=TINY_DOCS)


@pytest.fixture(scope="session")
def tiny_base_cfg(tiny_base, tmp_path_factory):
    """A config factory whose model.base_path is the session's tiny base (fresh workspace per call)."""
    from looprl.ops.core.config import load_config

    def make(workspace: Path | None = None, **sections):
        ws = workspace or tmp_path_factory.mktemp("ws")
        model = {"base_path": str(tiny_base), **sections.pop("model", {})}
        return load_config(environ={}, workspace=ws, model=model, **sections)

    return make


@pytest.fixture(scope="session")
def family_checkpoint(tmp_path_factory):
    """``family -> Path``: a small random-weight checkpoint of each supported MoE family
    (tests/families_testing.py), built on first use, once per session. Tests copy it before
    changing anything in it."""
    from families_testing import build_checkpoint

    root = tmp_path_factory.mktemp("families")
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_checkpoint(family, root / family)
        return built[family]

    return get
