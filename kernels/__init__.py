"""looprl.kernels: fused MoE-LoRA experts and chunked log-prob/entropy (torch reference + Triton)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .logprob import (
    chunked_logprobs_and_entropy,
    hidden_states_and_head,
    logprobs_and_entropy,
    naive_logprobs_and_entropy,
)
from .moe_lora import (
    LoRAFactors,
    disable_fused_moe_lora,
    enable_fused_moe_lora,
    fused_layout_problem,
    moe_lora_experts,
    peft_experts_chain,
    peft_lora_factors,
)

__all__ = [
    "Kernels", "select", "triton_available",
    "moe_lora_experts", "LoRAFactors", "peft_lora_factors", "enable_fused_moe_lora", "disable_fused_moe_lora",
    "peft_experts_chain", "fused_layout_problem",
    "logprobs_and_entropy", "chunked_logprobs_and_entropy", "naive_logprobs_and_entropy", "hidden_states_and_head",
]


def triton_available() -> bool:
    """True when triton is installed and a CUDA device is visible (never imports triton)."""
    return importlib.util.find_spec("triton") is not None and torch.cuda.is_available()


@dataclass(frozen=True)
class Kernels:
    """The kernel choices of one `cfg.kernels` section, bound to callables for the trainers."""

    moe_lora: str = "peft"  # "peft" | "torch" | "triton"
    logprob: str = "naive"  # "naive" | "chunked" | "triton"
    logprob_chunk_size: int = 4096

    def patch_model(self, model: nn.Module) -> int:
        """Switch the peft model's LoRA'd experts to `moe_lora` ("peft" restores peft). Returns modules patched."""
        return enable_fused_moe_lora(model, self.moe_lora)

    def logprobs_and_entropy(self, hidden: Tensor, lm_head_weight: Tensor, labels: Tensor,
                             temperature: float = 1.0, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
        """Per-token log p(label) and entropy (float32, labels.shape) from final hidden states."""
        return logprobs_and_entropy(hidden, lm_head_weight, labels, self.logprob, self.logprob_chunk_size,
                                    temperature, ignore_index)


def select(cfg: Any) -> Kernels:
    """Kernels from a `KernelsConfig` (or anything with its fields). Fails fast if triton is asked for
    but missing."""
    k = Kernels(cfg.moe_lora, cfg.logprob, int(cfg.logprob_chunk_size))
    if k.moe_lora not in ("peft", "torch", "triton"):
        raise ValueError(f"kernels.moe_lora must be peft|torch|triton, got {k.moe_lora!r}")
    if k.logprob not in ("naive", "chunked", "triton"):
        raise ValueError(f"kernels.logprob must be naive|chunked|triton, got {k.logprob!r}")
    if "triton" in (k.moe_lora, k.logprob) and not triton_available():
        raise RuntimeError("cfg.kernels asks for triton, but triton or CUDA is missing (pip install -e .[gpu])")
    return k
