"""Small random-weight checkpoints of the Mixture-of-Experts families looprl supports, for tests
(nothing here runs in production, nothing is downloaded).

``build_checkpoint(family, out_dir)`` writes what a real Hugging Face checkpoint directory holds:
config.json and safetensors weights (``save_pretrained`` of the transformers-5 architecture, 2
layers, 4 experts top-2), generation_config.json whose eos ids list the end-of-turn token(s), and
a tokenizer made here with the ``tokenizers`` library (a byte-level BPE learnt from a few hundred
words, so decoding and re-encoding an answer gives back its tokens) with the family's special
tokens and a chat template in the family's style:

- qwen3_moe, qwen2_moe: ChatML ``<|im_start|>role\\n...<|im_end|>``; pad ``<|endoftext|>``;
- mixtral: ``<s>[INST] ... [/INST] answer</s>``, and no pad token (as Mixtral ships);
- olmoe: tulu ``<|user|>\\n...`` / ``<|assistant|>\\n...<|endoftext|>``;
- deepseek_v3: ``<｜User｜>...<｜Assistant｜>...<｜end▁of▁sentence｜>``, one dense first layer,
  shared experts, low-rank q and kv (MLA).

``build_unsupported`` writes a tiny Llama (dense, no experts); ``corrupt_checkpoint`` copies a
checkpoint and breaks one file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

FAMILIES = ("qwen3_moe", "mixtral", "olmoe", "qwen2_moe", "deepseek_v3")

HIDDEN, LAYERS, EXPERTS, TOP_K, EXPERT_DIM = 32, 2, 4, 2, 32

_WORDS = (
    "the a an cat dog bird fish tree river mountain city road house garden window door table chair "
    "book letter story song music picture color red green blue yellow small large old new quick slow "
    "happy sad bright dark warm cold early late morning evening night day week year today tomorrow "
    "what why how when where who which is are was were be been have has had do does did can could "
    "will would should may might must say said tell told ask asked answer question think know see "
    "look find give take make go come run walk read write learn teach help play work rest sleep eat "
    "drink water bread apple coffee tea milk sun moon star rain snow wind cloud sky sea hello thanks "
    "please yes no maybe always never often sometimes here there this that these those my your our "
    "their his her its one two three four five many few more most some any every each all good bad"
).split()


def _corpus() -> list[str]:
    """A few hundred short sentences over the word list (deterministic, no download)."""
    n = len(_WORDS)
    return [" ".join(_WORDS[(i * k + j * 7) % n] for j in range(6)) + ("?" if i % 3 == 0 else ".")
            for i in range(120) for k in (1, 3, 5)]


# family -> special tokens (bos, eos, pad or None, unk or None, extra specials) and chat template
_CHATML = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)
_MIXTRAL = (
    "{{ bos_token }}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{%- set ns.system = message['content'] + '\n\n' -%}"
    "{%- elif message['role'] == 'user' -%}{{ '[INST] ' + ns.system + message['content'] + ' [/INST]' }}"
    "{%- set ns.system = '' -%}"
    "{%- elif message['role'] == 'assistant' -%}{{ message['content'] + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
_TULU = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ '<|system|>\n' + message['content'] + '\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}"
)
_DEEPSEEK = (
    "{{ bos_token }}"
    "{%- for message in messages -%}{%- if message['role'] == 'system' -%}{{ message['content'] }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '<｜Assistant｜>' + message['content'] + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<｜Assistant｜>' }}{%- endif -%}"
)

TOKENS = {
    "qwen3_moe": dict(bos=None, eos="<|im_end|>", pad="<|endoftext|>", unk=None,
                      extra=["<|im_start|>"], end_of_turn=["<|im_end|>", "<|endoftext|>"], template=_CHATML),
    "qwen2_moe": dict(bos=None, eos="<|im_end|>", pad="<|endoftext|>", unk=None,
                      extra=["<|im_start|>"], end_of_turn=["<|im_end|>", "<|endoftext|>"], template=_CHATML),
    "mixtral": dict(bos="<s>", eos="</s>", pad=None, unk="<unk>", extra=[], end_of_turn=["</s>"],
                    template=_MIXTRAL),
    "olmoe": dict(bos="<|endoftext|>", eos="<|endoftext|>", pad="<|padding|>", unk=None,
                  extra=["<|system|>", "<|user|>", "<|assistant|>"], end_of_turn=["<|endoftext|>"], template=_TULU),
    "deepseek_v3": dict(bos="<｜begin▁of▁sentence｜>", eos="<｜end▁of▁sentence｜>", pad="<｜▁pad▁｜>", unk=None,
                        extra=["<｜User｜>", "<｜Assistant｜>"], end_of_turn=["<｜end▁of▁sentence｜>"],
                        template=_DEEPSEEK),
}


def build_tokenizer(family: str, vocab_size: int = 400):
    """A PreTrainedTokenizerFast with the family's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spec = TOKENS[family]
    specials = list(dict.fromkeys(t for t in (spec["unk"], spec["bos"], spec["eos"], spec["pad"], *spec["extra"]) if t))
    tk = Tokenizer(models.BPE(unk_token=spec["unk"]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(_corpus(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    named = {k + "_token": spec[k] for k in ("bos", "eos", "pad", "unk") if spec[k]}
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, additional_special_tokens=spec["extra"] or None,
                                  model_max_length=1 << 16, **named)
    tok.chat_template = spec["template"]
    return tok


def model_config(family: str, vocab_size: int, ids: dict[str, int | None]):
    """The transformers config of a tiny model of ``family``."""
    import transformers

    common = dict(vocab_size=vocab_size, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, num_experts_per_tok=TOP_K,
                  tie_word_embeddings=False, bos_token_id=ids["bos"], eos_token_id=ids["eos"],
                  pad_token_id=ids["pad"])
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**common, head_dim=8, intermediate_size=64, moe_intermediate_size=EXPERT_DIM,
                                           num_experts=EXPERTS, decoder_sparse_step=1, mlp_only_layers=[])
    if family == "mixtral":
        return transformers.MixtralConfig(**common, intermediate_size=EXPERT_DIM, num_local_experts=EXPERTS)
    if family == "olmoe":
        return transformers.OlmoeConfig(**common, intermediate_size=EXPERT_DIM, num_experts=EXPERTS)
    if family == "qwen2_moe":
        return transformers.Qwen2MoeConfig(**common, intermediate_size=64, moe_intermediate_size=EXPERT_DIM,
                                           shared_expert_intermediate_size=EXPERT_DIM, num_experts=EXPERTS,
                                           decoder_sparse_step=1, mlp_only_layers=[])
    if family == "deepseek_v3":
        return transformers.DeepseekV3Config(
            **{**common, "num_key_value_heads": 4}, intermediate_size=64, moe_intermediate_size=EXPERT_DIM,
            n_routed_experts=EXPERTS, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
            q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def build_checkpoint(family: str, out_dir: str | Path, seed: int = 0) -> Path:
    """A small random-weight checkpoint of ``family`` in ``out_dir`` (created). Returns the path."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig

    transformers.logging.set_verbosity_error()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(family)
    ids = {k: tok.convert_tokens_to_ids(TOKENS[family][k]) if TOKENS[family][k] else None for k in ("bos", "eos", "pad")}
    config = model_config(family, len(tok), ids)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos"], pad_token_id=ids["pad"],
        eos_token_id=[tok.convert_tokens_to_ids(t) for t in TOKENS[family]["end_of_turn"]])
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def build_unsupported(out_dir: str | Path) -> Path:
    """A tiny Llama (dense MLP, no experts): a causal LM of a family looprl does not support."""
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    out = Path(out_dir)
    tok = build_tokenizer("qwen3_moe")
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def corrupt_checkpoint(src: str | Path, out_dir: str | Path, how: str = "truncate") -> Path:
    """A copy of checkpoint ``src`` with one broken file.

    how: "truncate" (weights cut in half), "garble" (weights' header overwritten), "config"
    (config.json not JSON)."""
    out = Path(out_dir)
    shutil.copytree(src, out)
    weights = next(out.glob("*.safetensors"))
    if how == "truncate":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif how == "garble":
        data = bytearray(weights.read_bytes())
        data[8:40] = b"\xff" * 32
        weights.write_bytes(bytes(data))
    elif how == "config":
        (out / "config.json").write_text(json.dumps(json.loads((out / "config.json").read_text()))[:-20])
    else:
        raise ValueError(f"unknown corruption {how!r}")
    return out
