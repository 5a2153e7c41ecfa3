"""Where and in what precision every stage runs the base model (part of the base-model contract,
re-exported by ``looprl.policy.model``).

``resolve_placement(cfg.model)`` turns ``model.device`` ("auto" | "cpu" | "cuda" | "cuda:N") and
``model.dtype`` ("auto" | "float32" | "bfloat16" | "float16") into a ``Placement`` (a
``torch.device`` and a ``torch.dtype``): "auto" is the first CUDA GPU when torch sees one, else the
CPU; dtype "auto" is bfloat16 on a GPU (float16 on one without bf16) and float32 on the CPU. A
CUDA device asked for on a machine where torch has no CUDA is refused with a ``ConfigError`` naming
``model.device``. ``load_base(path, device=..., dtype=...)`` places the model; inputs then follow
the model (``model_device``), never a hard-coded ``.cuda()``.

Only the frozen base weights take ``dtype``. LoRA factors (peft keeps them float32 on a bf16/fp16
base), the value head, the reward head, the optimizer state, log-probs, scores, advantages and
every PPO statistic are float32.

``enable_gradient_checkpointing(model)`` (``model.gradient_checkpointing``) recomputes each decoder
layer in the backward pass with ``torch.utils.checkpoint(use_reentrant=False)``. transformers' own
switch acts only in training mode, and the PPO learner keeps its model in eval mode (no dropout,
so the old and new policy forwards are identical); this wrapper acts whenever gradients are
recorded and no KV cache is passed, so sampling and scoring (no grad) never pay for it, and it
gives the same gradients as without.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from looprl.ops.core.config import ConfigError, ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def describe(self) -> str:
        name = torch.cuda.get_device_name(self.device) if self.is_cuda else "CPU"
        return f"{self.device} ({name}), {str(self.dtype).removeprefix('torch.')}"


def _no_cuda_reason() -> str:
    if torch.version.cuda is None:
        return f"this torch build ({torch.__version__}) has no CUDA support"
    return "torch sees no CUDA GPU (driver missing, or CUDA_VISIBLE_DEVICES hides them)"


def _current_cuda_index() -> int:
    # current_device() would initialise CUDA in a process (a Ray driver) that only plans
    return torch.cuda.current_device() if torch.cuda.is_initialized() else 0


def resolve_device(setting: str) -> torch.device:
    """The torch device of a ``model.device`` setting; "cuda" without CUDA is a ``ConfigError``."""
    if setting == "cpu":
        return CPU
    if setting == "auto":
        return torch.device("cuda", _current_cuda_index()) if torch.cuda.is_available() else CPU
    if not setting.startswith("cuda"):
        raise ConfigError(f"config key 'model.device': {setting!r} is not a device (auto, cpu, cuda or cuda:N)")
    if not torch.cuda.is_available():
        raise ConfigError(f"config key 'model.device' is {setting!r} but {_no_cuda_reason()}: "
                          "set model.device to \"auto\" or \"cpu\"")
    dev = torch.device(setting)
    index = _current_cuda_index() if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise ConfigError(f"config key 'model.device' is {setting!r} but only {torch.cuda.device_count()} "
                          "CUDA device(s) are visible")
    return torch.device("cuda", index)


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The weights' dtype of a ``model.dtype`` setting on ``device``."""
    if setting != "auto":
        try:
            return DTYPES[setting]
        except KeyError:
            raise ConfigError(f"config key 'model.dtype': {setting!r} is not one of auto, "
                              f"{', '.join(DTYPES)}") from None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_placement(mc: ModelConfig) -> Placement:
    """(device, dtype) of ``cfg.model`` on this machine."""
    device = resolve_device(mc.device)
    return Placement(device, resolve_dtype(mc.dtype, device))


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's parameters (where its inputs must go)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return CPU


# ---------------------------------------------------------------------- gradient checkpointing
def _checkpointed_forward(forward):
    def run(*args: Any, **kwargs: Any):
        # A cache passed in would be written twice (forward and recompute); without gradients
        # there is nothing to save memory on.
        if torch.is_grad_enabled() and kwargs.get("past_key_values") is None and not kwargs.get("use_cache"):
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    run.looprl_checkpointed = True
    return run


def enable_gradient_checkpointing(model: nn.Module) -> int:
    """Checkpoint every decoder layer of a transformers model (possibly peft-wrapped). Returns the
    number of layers; a model without transformers' decoder layers is refused."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    done: list[str] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, GradientCheckpointingLayer) or any(name.startswith(d + ".") for d in done):
            continue
        if not getattr(mod.forward, "looprl_checkpointed", False):
            # an instance attribute shadows the class's forward; it wraps the bound original
            mod.forward = _checkpointed_forward(mod.forward)
        done.append(name)
    if not done:
        raise ValueError(f"model.gradient_checkpointing: {type(model).__name__} has no transformers decoder "
                         "layers to checkpoint")
    return len(done)
