"""LoRA on the MoE policy: attention projections plus the experts.

The targets come from ``looprl.policy.families`` (``policy.target_modules``/``target_parameters``,
"auto" by default): per family, the attention projections, the routed experts and any shared
experts. transformers 5 stores each layer's routed experts as two stacked parameters,
``mlp.experts.gate_up_proj`` (E, 2I, H) and ``mlp.experts.down_proj`` (E, H, I), so peft reaches
them through ``target_parameters`` (one LoRA per expert). Routers and gates (``mlp.gate``,
``shared_expert_gate``) are never adapted: moving them would shift which experts see which tokens,
which the base's load balance was trained for. The saved adapter lists the resolved targets, so it
is a standard peft directory (``PeftModel.from_pretrained`` on the same base).

Rollout workers receive the adapter as a plain state dict (``lora_state`` -> ``load_lora_state``),
a few hundred KB, instead of the model.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from torch import nn

from looprl.ops.core.config import PolicyConfig
from looprl.policy.families import LoraTargets, adapted_routers, resolve_targets, skeleton

ADAPTER = "default"


def lora_config(pcfg: PolicyConfig, targets: LoraTargets) -> LoraConfig:
    return LoraConfig(
        r=pcfg.lora_rank,
        lora_alpha=pcfg.lora_alpha,
        # an empty list, not None: peft would fill None in with its own defaults for the model type
        target_modules=targets.target_modules,
        target_parameters=list(targets.target_parameters),
        lora_dropout=0.0,  # no dropout: rollouts and the learner must compute the same policy
        bias="none",
        task_type="CAUSAL_LM",
    )


def policy_targets(model: nn.Module, pcfg: PolicyConfig) -> LoraTargets:
    """The LoRA targets ``attach_lora`` uses on this base (the config's lists, or discovered)."""
    return resolve_targets(model, pcfg.target_modules, pcfg.target_parameters, section="policy")


def base_policy_targets(base_path: str | Path, pcfg: PolicyConfig) -> LoraTargets:
    """``policy_targets`` of the base checkpoint at ``base_path``, from its module tree alone."""
    return policy_targets(skeleton(base_path), pcfg)


def attach_lora(model: nn.Module, pcfg: PolicyConfig) -> PeftModel:
    """Wrap a base model with a fresh (zero-delta) LoRA adapter; only LoRA weights train."""
    targets = policy_targets(model, pcfg)
    with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5 (harmless)
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, lora_config(pcfg, targets))
    router = adapted_routers(peft_model)
    if router:  # a target list that reaches the router would silently retrain routing
        raise ValueError(f"LoRA targets reach the MoE router, which must stay frozen: {router[:3]}")
    peft_model.eval()  # no dropout anywhere; PPO needs identical old/new forward passes
    return peft_model


def reset_lora(model: PeftModel, seed: int) -> None:
    """Make the adapter fresh again, as a function of ``seed`` alone: every A drawn as peft draws it
    (Kaiming-uniform, a=sqrt(5), the default of ``nn.Linear``), every B zero, so the delta is zero.

    The draws come from one CPU generator in module order and are then copied to the factors'
    device: the same seed gives the same adapter on any device, on a new model or on one that has
    trained before (a kept trainer actor starting its next job)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, module in model.named_modules():
            if isinstance(module, LoraLayer) and ADAPTER in module.lora_A:
                a, b = module.lora_A[ADAPTER].weight, module.lora_B[ADAPTER].weight
                fresh = torch.empty(a.shape, dtype=torch.float32)
                nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=g)
                a.copy_(fresh)
                b.zero_()
                if module.lora_B[ADAPTER].bias is not None:
                    module.lora_B[ADAPTER].bias.zero_()


def lora_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """The adapter's weights as a detached CPU state dict (peft naming, no adapter name)."""
    sd = get_peft_model_state_dict(model, adapter_name=ADAPTER)
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items()}


def load_lora_state(model: PeftModel, state: dict[str, torch.Tensor]) -> None:
    """Copy a state dict from `lora_state` into the model; unknown or missing keys are errors."""
    expected = set(get_peft_model_state_dict(model, adapter_name=ADAPTER))
    if set(state) != expected:
        extra, missing = sorted(set(state) - expected), sorted(expected - set(state))
        raise KeyError(f"LoRA state does not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    set_peft_model_state_dict(model, state, adapter_name=ADAPTER)


def trainable_lora_parameters(model: PeftModel) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def expert_lora_parameters(model: PeftModel) -> dict[str, torch.Tensor]:
    """The LoRA factors that act on the experts (used by tests to check experts really train)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad and ".mlp.experts." in n}


def save_adapter(model: PeftModel, out_dir: Path) -> Path:
    """Standard peft format: adapter_model.safetensors + adapter_config.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def load_adapter(base: nn.Module, adapter_dir: Path, adapter_name: str = ADAPTER) -> PeftModel:
    model = PeftModel.from_pretrained(base, adapter_dir, adapter_name=adapter_name, is_trainable=False)
    model.eval()
    return model
