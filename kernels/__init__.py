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
    "Kernels", "select", "resolve_auto", "triton_available", "triton_installed",
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


def triton_installed() -> bool:
    """True when triton can be imported (never imports it)."""
    return importlib.util.find_spec("triton") is not None


def resolve_auto(moe_lora: str, logprob: str, device: torch.device | str | None) -> tuple[str, str]:
    """Concrete (moe_lora, logprob) for a model on ``device``: an "auto" setting becomes triton on
    CUDA when triton is installed, else the torch kernels (torch / chunked) on CUDA, and peft / naive
    on the CPU, where the fused paths bring no speed for small models (benchmarks/ppo.py). Explicit
    settings are kept."""
    cuda = device is not None and torch.device(device).type == "cuda"
    fast = cuda and triton_installed()
    if moe_lora == "auto":
        moe_lora = "triton" if fast else "torch" if cuda else "peft"
    if logprob == "auto":
        logprob = "triton" if fast else "chunked" if cuda else "naive"
    return moe_lora, logprob


def select(cfg: Any, device: torch.device | str | None = None) -> Kernels:
    """Kernels from a `KernelsConfig` (or anything with its fields) for a model on ``device``
    ("auto" settings resolved by `resolve_auto`; None: the CPU). Fails fast if triton is asked for
    but missing."""
    moe_lora, logprob = resolve_auto(cfg.moe_lora, cfg.logprob, device)
    k = Kernels(moe_lora, logprob, int(cfg.logprob_chunk_size))
    if k.moe_lora not in ("peft", "torch", "triton"):
        raise ValueError(f"kernels.moe_lora must be peft|torch|triton, got {k.moe_lora!r}")
    if k.logprob not in ("naive", "chunked", "triton"):
        raise ValueError(f"kernels.logprob must be naive|chunked|triton, got {k.logprob!r}")
    if "triton" in (k.moe_lora, k.logprob) and not triton_available():
        raise RuntimeError("cfg.kernels asks for triton, but triton or CUDA is missing (pip install -e .[gpu])")
    return k
