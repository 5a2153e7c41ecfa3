"""The one forward pass of the PPO learner: per-token log-probs, entropy, values, router logits.

Everything that needs log p(token) (old policy, reference policy, PPO update, gate KL) calls
`policy_forward`, so the log-prob implementation is one dispatch on ``cfg.kernels.logprob``
(naive full log-softmax, or `looprl.kernels`' chunked version that never builds (N, V) logits).
The expert implementation (``cfg.kernels.moe_lora``) is a model patch applied once when the
model is built (`apply_kernels`). "auto" settings resolve by the model's device
(``looprl.kernels.resolve_auto``: the Triton kernels on a GPU with triton, the torch fused /
chunked kernels on a GPU without, peft / naive on the CPU). Inputs move to the model's device;
log-probs, entropy and values come back float32 on that device whatever the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from looprl.kernels import logprobs_and_entropy, resolve_auto, select
from looprl.ops.core.config import KernelsConfig
from looprl.policy.placement import model_device


@dataclass
class ForwardOut:
    logprobs: Tensor  # (B, T-1): log p(input_ids[:, t+1] | prefix), float32
    entropy: Tensor  # (B, T-1): entropy of the next-token distribution at t, float32
    values: Tensor | None  # (B, T-1): value of the state after the prefix ending at t
    router_logits: tuple[Tensor, ...] | None  # per MoE layer: (B*T, E)


def kernels_for(kcfg: KernelsConfig, device: torch.device | str | None = None):
    """`looprl.kernels.Kernels` for this config on ``device`` (fails fast if the config asks for
    triton without it)."""
    return select(kcfg, device)


def apply_kernels(model: nn.Module, kcfg: KernelsConfig) -> int:
    """Route LoRA'd experts through cfg.kernels.moe_lora ("peft" leaves peft's path). Returns modules patched."""
    k = kernels_for(kcfg, model_device(model))
    if k.moe_lora == "peft":
        return 0
    return k.patch_model(model)


def _causal_lm(model: nn.Module) -> nn.Module:
    # PeftModel -> LoraModel -> XForCausalLM; a plain base model is already the causal LM.
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def position_ids_for(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding, so a padded prompt sees the same positions as an unpadded one."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def policy_forward(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    kcfg: KernelsConfig,
    temperature: float = 1.0,
    value_head: nn.Module | None = None,
    output_router_logits: bool = False,
) -> ForwardOut:
    lm = _causal_lm(model)
    dev = model_device(lm)
    input_ids, attention_mask = input_ids.to(dev), attention_mask.to(dev)
    out = lm.model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_for(attention_mask),
        use_cache=False,
        output_router_logits=output_router_logits,
    )
    hidden = out.last_hidden_state[:, :-1]  # state before each next token
    labels = input_ids[:, 1:]
    logprobs, entropy = _logprobs_and_entropy(hidden, lm.lm_head.weight, labels, kcfg, temperature)
    # The value head reads detached features: the adapter's capacity is spent on the policy and the
    # value loss cannot pull the policy (and no backward through the trunk for the critic).
    values = value_head(hidden.detach()).squeeze(-1).float() if value_head is not None else None
    router = tuple(out.router_logits) if output_router_logits and out.router_logits is not None else None
    return ForwardOut(logprobs, entropy, values, router)


def _logprobs_and_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, kcfg: KernelsConfig,
                          temperature: float) -> tuple[Tensor, Tensor]:
    _, impl = resolve_auto(kcfg.moe_lora, kcfg.logprob, hidden.device)
    return logprobs_and_entropy(hidden, weight, labels, impl, kcfg.logprob_chunk_size, temperature)


class ValueHead(nn.Module):
    """A small MLP critic on the final hidden state."""

    def __init__(self, hidden_size: int, width: int | None = None):
        super().__init__()
        width = width or hidden_size
        self.net = nn.Sequential(nn.Linear(hidden_size, width), nn.Tanh(), nn.Linear(width, 1))
        nn.init.zeros_(self.net[2].weight)  # start predicting 0: no spurious advantages at step 0
        nn.init.zeros_(self.net[2].bias)

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h.float())


def expert_load(router_logits: tuple[Tensor, ...], token_mask: Tensor, top_k: int) -> Tensor:
    """Share of routed (token, slot) pairs per expert, over the masked tokens and all MoE layers: (E,)."""
    mask = token_mask.reshape(-1).bool()
    counts = None
    for logits in router_logits:
        idx = logits[mask.to(logits.device)].topk(top_k, dim=-1).indices.reshape(-1)
        c = torch.bincount(idx, minlength=logits.shape[-1]).float()
        counts = c if counts is None else counts + c
    if counts is None or counts.sum() == 0:
        n = router_logits[0].shape[-1] if router_logits else 1
        return torch.full((n,), 1.0 / n)
    return counts / counts.sum()
