"""PPO end to end without Ray: a programmatic reward with a known optimum (cheerful words) goes up,
KL stays in budget, expert LoRA weights move, the router and the base stay frozen, and the
candidate lands in the registry in peft format."""

import json

import pytest
import torch
from fixtures_policy import PPO_TRAINED_STEPS as STEPS
from safetensors.torch import load_file

from looprl.policy.model import base_checksum, load_base
from looprl.ops.sim.scoring import CheerfulScorer
from looprl.storage.registry import Registry

torch.set_num_threads(1)  # 2 threads on busy shared cores spin and crawl


@pytest.fixture(scope="module")
def trained(ppo_trained):
    return ppo_trained


def test_reward_goes_up_within_kl_budget(trained):
    cfg, result = trained
    rewards = [h["reward_mean"] for h in result.history]
    assert len(rewards) == STEPS
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.4 and last > 2 * first, f"reward did not rise clearly: {rewards}"
    kls = [h["kl"] for h in result.history]
    budget = 2 * cfg.policy.target_kl  # nats per completion; the gate's default max_kl is the same
    assert max(kls) < budget, f"KL left the budget: {kls}"
    # the adaptive controller moved its coefficient with the measured KL (down while under target)
    coefs = [h["kl_coef"] for h in result.history]
    assert coefs[0] == pytest.approx(cfg.policy.init_kl_coef) and coefs[-1] != pytest.approx(coefs[0], rel=1e-3)


def test_step_logs_carry_the_diagnostics(trained):
    _, result = trained
    m = result.manifest
    curve = m.metrics["curve"]
    for key in ("reward_mean", "kl", "clip_fraction", "entropy", "value_loss", "explained_variance",
                "tokens_per_s", "expert_load_max_over_mean"):
        assert all(key in row for row in curve), key
    assert all(row["tokens_per_s"] > 0 for row in curve)
    n_experts = json.loads((trained[0].base_path / "config.json").read_text())["num_local_experts"]
    assert all(1.0 <= row["expert_load_max_over_mean"] <= n_experts for row in curve)


def test_candidate_is_a_peft_adapter_with_moving_expert_lora(trained):
    cfg, result = trained
    m = result.manifest
    reg = Registry(cfg.registry_dir)
    manifest, d = reg.open("policy", m.version, base_checksum=base_checksum(cfg.base_path))
    assert {"adapter_model.safetensors", "adapter_config.json", "value_head.safetensors"} <= set(manifest.files)
    # and its copy in vLLM's layout (looprl.policy.vllm_layout), checksummed with the rest
    assert {"vllm/adapter_model.safetensors", "vllm/adapter_config.json"} <= set(manifest.files)
    assert manifest.status == "candidate"
    assert manifest.extra["reward_version"] == CheerfulScorer.version
    acfg = json.loads((d / "adapter_config.json").read_text())
    assert acfg["r"] == cfg.policy.lora_rank
    # policy.target_* "auto": the family's targets (attention, fused experts), recorded as resolved
    assert set(acfg["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"} == set(manifest.extra["target_modules"])
    assert set(acfg["target_parameters"]) == {"experts.gate_up_proj", "experts.down_proj"}
    assert manifest.base_family == "qwen3_moe"
    weights = load_file(str(d / "adapter_model.safetensors"))
    expert_b = {k: v for k, v in weights.items() if ".mlp.experts." in k and "lora_B" in k}
    attn_b = {k: v for k, v in weights.items() if "self_attn" in k and "lora_B" in k}
    # lora_B starts at zero: a non-zero B means the expert (and attention) LoRA really trained
    assert expert_b and all(v.abs().max() > 1e-4 for v in expert_b.values())
    assert attn_b and all(v.abs().max() > 1e-4 for v in attn_b.values())
    assert not any(".mlp.gate." in k for k in weights), "the router must not be adapted"


def test_router_and_base_weights_stay_frozen(trained):
    """Loading the candidate on a fresh base and merging it changes experts, never the router."""
    from peft import PeftModel

    cfg, result = trained
    _, d = Registry(cfg.registry_dir).open("policy", result.manifest.version)
    base, _ = load_base(cfg.base_path)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = PeftModel.from_pretrained(base, d).merge_and_unload()
    after = merged.state_dict()
    routers = [k for k in before if k.endswith("mlp.gate.weight")]
    experts = [k for k in before if k.endswith("mlp.experts.gate_up_proj") or k.endswith("mlp.experts.down_proj")]
    assert routers and experts
    assert all(torch.equal(before[k], after[k]) for k in routers)
    assert all(not torch.equal(before[k], after[k]) for k in experts)


def test_prometheus_metrics_follow_the_steps(trained):
    from prometheus_client import REGISTRY

    cfg, _ = trained
    n_experts = json.loads((cfg.base_path / "config.json").read_text())["num_local_experts"]
    assert REGISTRY.get_sample_value("looprl_policy_steps_total") >= STEPS
    loads = [REGISTRY.get_sample_value("looprl_policy_expert_load_ratio", {"expert": str(i)}) for i in range(n_experts)]
    assert all(x is not None for x in loads) and sum(loads) == pytest.approx(1.0, abs=1e-3)
    assert REGISTRY.get_sample_value("looprl_policy_kl_nats") is not None
