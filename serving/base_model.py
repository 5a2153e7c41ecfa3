"""The serving tier's access to the base model, through the shared ``looprl.policy.model`` contract
(load, fingerprint, render prompts) so that the server renders prompts exactly as the trainer does.
Falls back to plain transformers loading when that module is not installed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

try:
    from looprl.policy import model as _shared
except ImportError:  # pragma: no cover - only before policy/model.py exists
    _shared = None


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(model, tokenizer) from a checkpoint directory; clear errors naming the directory."""
    import transformers

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"base model directory {path} has no config.json (run `looprl init` or set model.base_path)")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if _shared is not None and hasattr(_shared, "load_base"):
        model, tok = _shared.load_base(path, dtype=dtype)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None or tok.eos_token_id is None:
        raise ValueError(f"tokenizer in {path} needs pad_token and eos_token")
    return model.eval(), tok


def base_checksum(path: str | Path) -> str:
    if _shared is not None and hasattr(_shared, "base_checksum"):
        return _shared.base_checksum(path)
    from looprl.storage.registry import checksum_dir

    return checksum_dir(Path(path))


def format_prompt(text: str) -> str:
    if _shared is not None and hasattr(_shared, "format_prompt"):
        return _shared.format_prompt(text)
    return text.strip() + "\n"
