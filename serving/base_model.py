"""The serving tier's access to the base model: the shared ``looprl.policy.model`` contract (load,
fingerprint, render prompts), so the server renders prompts exactly as the trainer does and binds
adapters to the same base checksum the registry records."""

from __future__ import annotations

from looprl.policy.model import base_checksum, format_prompt
from looprl.policy.model import load_base as load_model

__all__ = ["base_checksum", "format_prompt", "load_model"]
