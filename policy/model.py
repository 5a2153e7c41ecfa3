"""The base-model contract every stage (policy, reward, serving) goes through at run time: load the
base checkpoint, fingerprint it, render a user prompt, and the prompt set shipped with the base.

The base itself is any Hugging Face causal-LM checkpoint directory (config.json, safetensors
weights, a tokenizer with pad and eos tokens); ``looprl init`` builds a tiny Mixture-of-Experts one
(``looprl.ops.sim.base``). The shipped prompts (``data/prompts.txt``, ``data/prompts_heldout.txt``)
are short user questions split into train and held-out sets *by template*, so a held-out prompt
is phrased in a way the policy never trained on.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from looprl.storage.registry import checksum_dir

if TYPE_CHECKING:  # heavy imports stay lazy: `looprl --help` must not import transformers
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

DATA_DIR = Path(__file__).parent / "data"
# transformers 5 MoE experts: "batched_mm" is 5-15x slower than the per-expert loop on CPU,
# "grouped_mm" needs torch._grouped_mm (GPU). The per-expert "eager" loop is the fast CPU path.
CPU_EXPERTS_IMPLEMENTATION = "eager"


def format_prompt(text: str) -> str:
    """How a user prompt is rendered for the model; the completion follows directly after it."""
    return f"question: {' '.join(str(text).split())}\nanswer:"


def _read_prompts(name: str) -> list[str]:
    return [line.strip() for line in (DATA_DIR / name).read_text().splitlines() if line.strip()]


def shipped_prompts() -> list[str]:
    """The training prompts shipped with the base."""
    return _read_prompts("prompts.txt")


def heldout_prompts() -> list[str]:
    """Fresh prompts, phrased by templates the training prompts never use."""
    return _read_prompts("prompts_heldout.txt")


def load_base(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple["PreTrainedModel", "PreTrainedTokenizerFast"]:
    """(model in eval mode, tokenizer) from a base directory; errors name the directory."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"base model directory {path} has no config.json (run `looprl init` or set model.base_path)")
    if not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"base model directory {path} has no .safetensors weights")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, experts_implementation=CPU_EXPERTS_IMPLEMENTATION)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None or tok.eos_token_id is None:
        raise ValueError(f"tokenizer in {path} needs pad_token and eos_token")
    return model.eval(), tok


def base_checksum(path: str | Path) -> str:
    """The identity of a base checkpoint (sha256 over its weights and config files)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"base model directory {path} does not exist (run `looprl init` or set model.base_path)")
    return checksum_dir(path)
