"""The policy stage's view of the base model: load it, fingerprint it, render prompts.

`looprl.policy.model` (the base-model code shared with the reward stage) owns how the base is
built and how prompts are rendered. Everything in the PPO trainer and the gate goes through the
three functions below, so the trainer does not care whether that module is the full one or not.
"""

from __future__ import annotations

from pathlib import Path

import torch

from looprl.ops.log import get_logger

log = get_logger(__name__)

try:  # the shared base-model contract (reward engineer's issue)
    from looprl.policy import model as _model
except ImportError:  # pragma: no cover - only before policy/model.py exists
    _model = None


def load_base(path: str | Path, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a Hugging Face checkpoint directory; clear error if it is missing."""
    import transformers

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"base model directory {path} has no config.json (run `looprl init` first)")
    transformers.utils.logging.disable_progress_bar()  # one "Loading weights" bar per actor is noise
    if _model is not None and hasattr(_model, "load_base"):
        model, tok = _model.load_base(path, dtype=dtype)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        raise ValueError(f"tokenizer in {path} has no pad_token (needed for batched rollouts)")
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer in {path} has no eos_token (needed to end completions)")
    model.eval()
    return model, tok


def base_checksum(path: str | Path) -> str:
    if _model is not None and hasattr(_model, "base_checksum"):
        return _model.base_checksum(path)
    from looprl.storage.registry import checksum_dir

    return checksum_dir(Path(path))


def format_prompt(text: str) -> str:
    """How a user prompt is rendered for the model (the serving tier renders it the same way)."""
    if _model is not None and hasattr(_model, "format_prompt"):
        return _model.format_prompt(text)
    return text.strip() + "\n"


def shipped_heldout_prompts() -> list[str]:
    """Held-out prompts shipped with the base (phrased unlike any training prompt), or []."""
    fn = getattr(_model, "heldout_prompts", None) if _model is not None else None
    if callable(fn):
        return [p for p in fn() if p.strip()]
    data = Path(__file__).parent / "data" / "prompts_heldout.txt"
    if data.is_file():
        return [line.strip() for line in data.read_text().splitlines() if line.strip()]
    return []


def shipped_prompts() -> list[str]:
    """The prompt set shipped with the base model (policy/data), or [] if there is none."""
    if _model is not None:
        for name in ("shipped_prompts", "load_prompts", "default_prompts"):
            fn = getattr(_model, name, None)
            if callable(fn):
                try:
                    return [p for p in fn() if p.strip()]
                except TypeError:
                    continue
        for name in ("PROMPTS", "DEFAULT_PROMPTS"):
            if isinstance(getattr(_model, name, None), (list, tuple)):
                return list(getattr(_model, name))
    data = Path(__file__).parent / "data" / "prompts.txt"
    if data.is_file():
        return [line.strip() for line in data.read_text().splitlines() if line.strip()]
    return []
