"""The offline promotion gate: a trained adapter passes and can be promoted; a NaN adapter, a
regressed adapter, a rank-too-large adapter and one targeting missing modules are each rejected
with a reason, and every decision is recorded with its numbers."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fixtures_policy import trained_registry_copy
from looprl.ops.core.config import PolicyConfig
from looprl.policy.model import base_checksum, load_base
from looprl.policy.gate import run_gate
from looprl.policy.lora import attach_lora, save_adapter
from looprl.ops.sim.scoring import CheerfulScorer
from looprl.policy.trainer import train
from looprl.storage import releases
from looprl.storage.registry import Registry, RegistryError
from looprl.storage.releases import TransitionError

torch.set_num_threads(1)  # 2 threads on busy shared cores spin and crawl

SCORER = CheerfulScorer()


@pytest.fixture(scope="module")
def gate_env(tmp_path_factory, ppo_trained):
    """A workspace whose registry holds the session's trained candidate (a copy: the gate writes)."""
    return trained_registry_copy(tmp_path_factory, ppo_trained, "gate", gate=dict(heldout_prompts=48),
                                 serving=dict(max_lora_rank=8))


def _publish_dir(cfg, d: Path, reason: str) -> str:
    return Registry(cfg.registry_dir).publish("policy", d, base_checksum=base_checksum(cfg.base_path),
                                              reason=reason).version


def _fresh_adapter(cfg, out: Path, **policy) -> Path:
    base, _ = load_base(cfg.base_path)
    return save_adapter(attach_lora(base, PolicyConfig(**{**cfg.policy.model_dump(), **policy})), out)


def _copy_of(cfg, version: str, out: Path) -> Path:
    shutil.copytree(Registry(cfg.registry_dir).version_dir("policy", version), out)
    (out / "manifest.json").unlink()
    return out


def promote(cfg, version: str) -> None:
    releases.promote(Registry(cfg.registry_dir), cfg.state_dir, version, "test", by="test", action="manual_promote")


def _decisions(cfg) -> list[dict]:
    path = cfg.state_dir / "gate" / "decisions.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_trained_adapter_is_gated_then_promoted(gate_env):
    cfg, good = gate_env
    reg = Registry(cfg.registry_dir)
    with pytest.raises(TransitionError, match="is candidate: only versions that passed the gate"):
        promote(cfg, good)  # still a candidate
    report = run_gate(cfg, good, SCORER)
    assert report.decision == "gated", report.reason
    n = report.numbers
    assert n["win_rate"] > cfg.gate.min_win_rate and n["kl_to_base"] < cfg.gate.max_kl
    assert n["candidate_reward_mean"] > n["incumbent_reward_mean"] and n["incumbent"] == "base"
    # both suites (tests/test_gate_guard.py): training forms held out by hash, forms training never samples
    assert n["train_forms_samples"] == n["heldout_forms_samples"] == 24 and n["heldout_samples"] == 48
    m = reg.manifest("policy", good)
    assert m.status == "gated" and m.history[-1].numbers["win_rate"] == pytest.approx(n["win_rate"])
    assert _decisions(cfg)[-1]["version"] == good and _decisions(cfg)[-1]["decision"] == "gated"
    promote(cfg, good)
    assert reg.pointer("policy", "promoted") == good and reg.manifest("policy", good).status == "promoted"


def test_nan_adapter_is_rejected(gate_env, tmp_path):
    cfg, good = gate_env
    d = _copy_of(cfg, good, tmp_path / "nan")
    w = load_file(str(d / "adapter_model.safetensors"))
    key = sorted(k for k in w if "lora_B" in k)[0]
    w[key][0, 0] = float("nan")
    save_file(w, str(d / "adapter_model.safetensors"))
    v = _publish_dir(cfg, d, "nan")
    report = run_gate(cfg, v, SCORER)
    assert report.decision == "rejected" and "non-finite" in report.reason and key in report.reason
    assert Registry(cfg.registry_dir).manifest("policy", v).status == "rejected"
    with pytest.raises(TransitionError, match="is rejected"):
        promote(cfg, v)


def test_rank_too_large_and_unknown_targets_are_rejected(gate_env, tmp_path):
    cfg, _ = gate_env
    v = _publish_dir(cfg, _fresh_adapter(cfg, tmp_path / "r16", lora_rank=16, lora_alpha=32), "rank 16")
    report = run_gate(cfg, v, SCORER)
    assert report.decision == "rejected" and "rank 16 exceeds serving.max_lora_rank=8" in report.reason
    assert report.numbers["lora_rank"] == 16

    d = _fresh_adapter(cfg, tmp_path / "targets")
    acfg = json.loads((d / "adapter_config.json").read_text())
    acfg["target_modules"] = ["q_proj", "no_such_proj"]
    (d / "adapter_config.json").write_text(json.dumps(acfg))
    report = run_gate(cfg, _publish_dir(cfg, d, "bad targets"), SCORER)
    assert report.decision == "rejected" and "no_such_proj" in report.reason


def test_regressed_adapter_loses_to_the_promoted_one(gate_env, tmp_path):
    cfg, good = gate_env
    reg = Registry(cfg.registry_dir)
    if reg.pointer("policy", "promoted") != good:  # this test alone: gate + promote the trained one first
        assert run_gate(cfg, good, SCORER).passed
        promote(cfg, good)
    # an untrained (zero-delta) adapter is the base again: a regression against the promoted adapter
    v = _publish_dir(cfg, _fresh_adapter(cfg, tmp_path / "zero"), "regressed")
    report = run_gate(cfg, v, SCORER)
    assert report.decision == "rejected" and "win rate" in report.reason
    assert report.numbers["incumbent"] == good and report.numbers["win_rate"] < 0.5
    assert report.numbers["kl_to_base"] == pytest.approx(0.0, abs=1e-4)
    assert reg.pointer("policy", "promoted") == good  # nothing moved


def test_gate_refuses_missing_and_already_promoted_versions(gate_env):
    cfg, good = gate_env
    with pytest.raises(RegistryError, match="v999"):
        run_gate(cfg, "v999", SCORER)
    if Registry(cfg.registry_dir).manifest("policy", good).status == "promoted":
        with pytest.raises(TransitionError, match="only candidates are gated"):
            run_gate(cfg, good, SCORER)


def _with_promoted(cfg, good: str) -> Registry:
    """The registry, ``good`` promoted (gated first unless an earlier test did it)."""
    reg = Registry(cfg.registry_dir)
    if reg.pointer("policy", "promoted") != good:
        assert run_gate(cfg, good, SCORER).passed
        promote(cfg, good)
    return reg


def test_next_run_continues_from_the_promoted_adapter(gate_env):
    cfg, good = gate_env
    reg = _with_promoted(cfg, good)
    result = train(cfg.model_copy(update={"policy": cfg.policy.model_copy(update={"steps": 1})}),
                   scorer=SCORER, use_ray=False, resume=False)
    m = result.manifest
    assert m.parent == good
    from looprl.policy.checkpoint import RunDir, runs_root

    meta, _ = RunDir(runs_root(cfg.state_dir) / result.run_id).read_meta()
    assert meta["init_from"] == good
    a = load_file(str(reg.version_dir("policy", good) / "adapter_model.safetensors"))
    b = load_file(str(reg.version_dir("policy", m.version) / "adapter_model.safetensors"))
    for k in (k for k in a if "lora_B" in k):
        # one PPO step from the promoted weights: much closer to them than to a fresh (zero) B
        assert (b[k] - a[k]).norm() < 0.5 * a[k].norm(), k


def test_a_run_continues_the_trainer_line_when_asked(gate_env):
    cfg, good = gate_env
    reg = _with_promoted(cfg, good)
    line = cfg.model_copy(update={"policy": cfg.policy.model_copy(update={"steps": 1, "continue_from": "newest_gated"})})
    first = train(line, scorer=SCORER, use_ray=False, resume=False).manifest
    releases.record_gate(reg, first.version, "gated", "test: passed")
    second = train(line, scorer=SCORER, use_ray=False, resume=False).manifest
    assert second.parent == first.version  # not the promoted version: the line's newest gated one
    a = load_file(str(reg.version_dir("policy", first.version) / "adapter_model.safetensors"))
    b = load_file(str(reg.version_dir("policy", second.version) / "adapter_model.safetensors"))
    assert all((b[k] - a[k]).norm() < 0.5 * a[k].norm() for k in a if "lora_B" in k)
    releases.record_gate(reg, second.version, "rejected", "test: refused")
    third = train(line, scorer=SCORER, use_ray=False, resume=False).manifest
    assert third.parent == first.version  # a rejected version ends nothing but itself
    promoted = train(line.model_copy(update={"policy": line.policy.model_copy(update={"continue_from": "promoted"})}),
                     scorer=SCORER, use_ray=False, resume=False).manifest
    assert promoted.parent == good
