"""Small builders for tests and benchmarks of the serving tier (nothing here runs in production).

- ``build_tiny_base``: a random-init tiny Qwen3-MoE causal LM + a byte-level BPE tokenizer trained
  on a few sentences, saved with ``save_pretrained``. Used when ``looprl.policy.model`` (the real,
  pre-trained base) is not available or too slow for a unit test.
- ``make_adapter``: a peft LoRA adapter on that base with *non-zero* B matrices (so it changes
  outputs), optionally on the fused MoE expert parameters via ``target_parameters``.
- ``publish_adapter``: the same, published into a registry as kind "policy".
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

SENTENCES = [
    "hello world, what a happy sunny day it is",
    "the cat sat on the mat and looked at the dog",
    "thank you, that is wonderful and great news",
    "please tell me a story about a brave little robot",
    "the weather today is cloudy with a chance of rain",
    "I love learning new things every single day",
    "numbers: one two three four five six seven eight nine ten",
    "question: what is the capital of france? answer: paris",
]


def build_tiny_base(out_dir: str | Path, *, vocab_size: int = 320, hidden: int = 32, layers: int = 2,
                    experts: int = 4, max_positions: int = 256, seed: int = 0) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(SENTENCES * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")
    cfg = Qwen3MoeConfig(
        vocab_size=len(fast), hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=hidden // 2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
        num_experts=experts, num_experts_per_tok=2, max_position_embeddings=max_positions,
        eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, bos_token_id=fast.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(cfg)
    with torch.no_grad():  # larger logits than the default init, so greedy outputs vary with the prompt
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


def make_adapter(base_dir: str | Path, out_dir: str | Path, *, seed: int = 1, rank: int = 4,
                 target_modules: list[str] | None = None,
                 target_parameters: list[str] | None = ("experts.gate_up_proj", "experts.down_proj"),
                 scale: float = 1.0) -> Path:
    """A LoRA adapter with random non-zero A and B (peft ``init_lora_weights=False``)."""
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

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
