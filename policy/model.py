"""The base-model contract every stage (policy, reward, serving) goes through at run time: load the
base checkpoint, fingerprint it, render a conversation, and the prompt set shipped with the base.

Rendering is the tokenizer's chat template, the same in every stage: a prompt (``Chat``: system
prompt, history, last user turn) becomes ``render_prompt_ids`` (template with the generation
prompt, tokenized without extra special tokens), its completion ``completion_ids`` follows
directly, and the answer ends with the template's end-of-turn token (``stop_token_ids``). A base
whose tokenizer has no template gets ``DEFAULT_CHAT_TEMPLATE``, with a warning.

The base itself is a local Hugging Face checkpoint directory (config.json, safetensors weights,
a tokenizer with an eos token; one without a pad token pads with unk or eos, logged) of a
Mixture-of-Experts family ``looprl.policy.families`` supports (Qwen3-MoE, Mixtral, OLMoE,
Qwen2-MoE, DeepSeek-V3); anything else, or a corrupt file, is refused naming the directory and
file, and nothing is downloaded. ``looprl init`` builds a tiny one (``looprl.ops.sim.base``) or
links the workspace to yours (``--base PATH``). The shipped prompts (``data/prompts.txt``, ``data/prompts_heldout.txt``)
are short user questions split into train and held-out sets *by template*, so a held-out prompt
is phrased in a way the policy never trained on.

Every stage loads the base where ``model.device`` / ``model.dtype`` say (``resolve_placement`` ->
``load_base(path, device=..., dtype=...)``, ``looprl.policy.placement``), checkpoints its decoder
layers when training with ``model.gradient_checkpointing`` (``enable_gradient_checkpointing``),
and first checks that its configuration fits the device's memory (``check_memory``,
``looprl.policy.memory``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from looprl.ops.core.chat import Chat
from looprl.ops.core.log import get_logger
from looprl.policy.families import BaseModelError, UnsupportedModel, inspect_checkpoint  # noqa: F401  (the contract)
from looprl.policy.memory import MemoryBudgetError, MemoryPlan, check_memory  # noqa: F401  (the contract)
from looprl.policy.placement import (  # noqa: F401  (the contract: device, dtype, checkpointing)
    Placement, enable_gradient_checkpointing, model_device, resolve_placement,
)
from looprl.storage.registry import checksum_dir

if TYPE_CHECKING:  # heavy imports stay lazy: `looprl --help` must not import transformers
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

DATA_DIR = Path(__file__).parent / "data"
# transformers 5 MoE experts: "batched_mm" is 5-15x slower than the per-expert loop on CPU,
# "grouped_mm" needs torch._grouped_mm (GPU). The per-expert "eager" loop is the fast CPU path.
CPU_EXPERTS_IMPLEMENTATION = "eager"

log = get_logger(__name__)

# The tiny base's chat template (``looprl init`` writes it into the tokenizer): a single user turn
# renders as "question: ...\nanswer:", the format the base is pre-trained on, and an answer ends
# with eos. Also the fallback for a base whose tokenizer has none.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ 'question: ' + message['content'] + '\n' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ 'answer:' + message['content'] + eos_token + '\n' }}"
    "{%- else -%}{{ message['role'] + ': ' + message['content'] + '\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'answer:' }}{%- endif -%}"
)


def _read_prompts(name: str) -> list[str]:
    return [line.strip() for line in (DATA_DIR / name).read_text().splitlines() if line.strip()]


def shipped_prompts() -> list[str]:
    """The training prompts shipped with the base."""
    return _read_prompts("prompts.txt")


def heldout_prompts() -> list[str]:
    """Fresh prompts, phrased by templates the training prompts never use."""
    return _read_prompts("prompts_heldout.txt")


def load_base(path: str | Path, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
              ) -> tuple["PreTrainedModel", "PreTrainedTokenizerFast"]:
    """(model in eval mode, tokenizer) from a base directory; errors name the directory.

    The model is placed on ``device`` (None: the CPU) in ``dtype`` (None: float32 on the CPU,
    bfloat16 on a GPU); stages pass ``resolve_placement(cfg.model)``. On the CPU the experts run
    transformers' per-expert "eager" loop, on a GPU transformers' default (grouped_mm)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    inspect_checkpoint(path)  # config.json, supported family, readable safetensors: errors name the file
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    device = torch.device(device) if device is not None else torch.device("cpu")
    if dtype is None:
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    extra = {"experts_implementation": CPU_EXPERTS_IMPLEMENTATION} if device.type == "cpu" else {}
    try:  # nothing is downloaded: the directory holds everything
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True, **extra)
    except Exception as e:  # transformers and safetensors raise OSError, ValueError, SafetensorError, ...
        raise BaseModelError(f"base model directory {path}: cannot load the model ({type(e).__name__}: {e})") from e
    model = model.to(device)
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise BaseModelError(f"base model directory {path}: cannot load the tokenizer ({type(e).__name__}: {e})") from e
    ensure_pad_token(tok, path)
    ensure_chat_template(tok, path)
    return model.eval(), tok


def base_checksum(path: str | Path) -> str:
    """The identity of a base checkpoint (sha256 over its weights and config files)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"base model directory {path} does not exist (run `looprl init` or set model.base_path)")
    return checksum_dir(path)


def ensure_pad_token(tok: "PreTrainedTokenizerFast", where: object = "the tokenizer") -> None:
    """Give a tokenizer without a pad token (Mixtral's) one: its unk token, else eos (logged).
    Padding is always masked, so which token pads does not change what the model computes; unk
    first keeps eos meaning only "end of answer"."""
    if tok.eos_token_id is None:
        raise BaseModelError(f"base model directory {where}: the tokenizer has no eos_token")
    if tok.pad_token_id is None:
        fallback = "unk_token" if tok.unk_token_id is not None else "eos_token"
        tok.pad_token = getattr(tok, fallback)
        log.warning(f"base tokenizer has no pad token; padding with its {fallback}", base=str(where),
                    pad_token=tok.pad_token, pad_token_id=tok.pad_token_id)


# ---------------------------------------------------------------------- rendering
def ensure_chat_template(tok: "PreTrainedTokenizerFast", where: object = "the tokenizer") -> None:
    """Give a tokenizer without a chat template the default one (logged: the base was not
    trained on it, so a real chat model should ship its own)."""
    if not getattr(tok, "chat_template", None):
        log.warning("base tokenizer has no chat template; using looprl's default (question:/answer:)",
                    base=str(where))
        tok.chat_template = DEFAULT_CHAT_TEMPLATE


def render_prompt(tok: "PreTrainedTokenizerFast", prompt: Chat | str) -> str:
    """The conversation as the model sees it, up to and including the generation prompt."""
    return tok.apply_chat_template(Chat.parse(prompt).to_dicts(), tokenize=False, add_generation_prompt=True)


def render_prompt_ids(tok: "PreTrainedTokenizerFast", prompt: Chat | str) -> list[int]:
    """Token ids of ``render_prompt``. The template writes its own special tokens (a bos, role
    markers), so the tokenizer adds none."""
    return list(tok(render_prompt(tok, prompt), add_special_tokens=False)["input_ids"])


def completion_ids(tok: "PreTrainedTokenizerFast", completion: str) -> list[int]:
    """Token ids of an answer's text as it follows the rendered prompt."""
    return list(tok(str(completion), add_special_tokens=False)["input_ids"])


def end_of_turn_id(tok: "PreTrainedTokenizerFast") -> int:
    """The token that closes an assistant turn in this template (e.g. ``<|im_end|>``), else eos."""
    cached = getattr(tok, "_looprl_end_of_turn", None)
    if cached is not None:
        return cached
    marker = "\u2063looprl\u2063"
    found = int(tok.eos_token_id)
    try:
        text = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
                                       tokenize=False, add_generation_prompt=False)
    except Exception as e:  # a template that refuses an assistant turn: eos it is
        log.warning("chat template cannot render an assistant turn; eos ends answers", error=str(e)[:200])
        text = ""
    if marker in text:
        special = set(tok.all_special_ids) | {int(i) for i in getattr(tok, "added_tokens_decoder", {})}
        tail = tok(text.split(marker, 1)[1], add_special_tokens=False)["input_ids"]
        found = next((int(i) for i in tail if int(i) in special), found)
    tok._looprl_end_of_turn = found
    return found


def stop_token_ids(tok: "PreTrainedTokenizerFast", model: "PreTrainedModel | None" = None,
                   extra: tuple[str, ...] | list[str] = ()) -> list[int]:
    """Tokens that end an answer: the template's end of turn, eos, the generation config's eos
    ids, and ``extra`` token strings (``model.stop_tokens``); end of turn first."""
    ids = [end_of_turn_id(tok), int(tok.eos_token_id)]
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    ids += [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
    for t in extra:
        tid = tok.convert_tokens_to_ids(t)
        if tid is None or tid == tok.unk_token_id:
            raise ValueError(f"model.stop_tokens: {t!r} is not a token of the base's tokenizer")
        ids.append(int(tid))
    return list(dict.fromkeys(ids))
