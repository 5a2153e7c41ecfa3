"""LoRA adapters for tests and benchmarks of the serving tier and the canary (nothing here runs in
production).

- ``make_adapter``: a peft LoRA adapter on a base with *non-zero* B matrices (so it changes
  outputs), optionally on the fused MoE expert parameters via ``target_parameters``.
- ``publish_adapter``: the same, published into a registry as kind "policy".
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM


def make_adapter(base_dir: str | Path, out_dir: str | Path, *, seed: int = 1, rank: int = 4,
                 target_modules: list[str] | None = None,
                 target_parameters: list[str] | None = ("experts.gate_up_proj", "experts.down_proj"),
                 scale: float = 1.0) -> Path:
    """A LoRA adapter with random non-zero A and B (peft ``init_lora_weights=False``)."""
    transformers.logging.set_verbosity_error()
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    cfg = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=list(target_modules or ["q_proj", "v_proj"]),
        target_parameters=list(target_parameters) if target_parameters else None, init_lora_weights=False,
    )
    torch.manual_seed(seed)
    peft_model = get_peft_model(base, cfg)
    if scale != 1.0:
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_B" in n:
                    p.mul_(scale)
    out = Path(out_dir)
    peft_model.save_pretrained(out)
    for junk in out.glob("README.md"):
        junk.unlink()
    return out


def publish_adapter(registry, base_dir: str | Path, base_checksum: str, *, seed: int = 1, **kw) -> str:
    """Build an adapter and publish it as a new "policy" version. Returns the version ("v<N>")."""
    with tempfile.TemporaryDirectory() as tmp:
        make_adapter(base_dir, Path(tmp) / "a", seed=seed, **kw)
        return registry.publish("policy", Path(tmp) / "a", base_checksum=base_checksum).version
