"""A tiny random-init MoE base for tests and benchmarks when no pre-trained base is at hand.

The real base comes from `looprl.policy.model.create_base` (pre-trained, its own tokenizer);
this one only needs the same architecture and a tokenizer with pad/eos and the cheerful words.
"""

from __future__ import annotations

from pathlib import Path

from looprl.ops.preference import POSITIVE_WORDS

WORDS = sorted(POSITIVE_WORDS) + """the a and is was it to of in on at for with my your we they he she
day sky sea park road city house tree dog cat bird food water book music game team trip morning night
walk run sit talk see look went came made said gave told saw felt went have had do did go get make
old new big small long short red blue green grey cold dry late early very quite just also then now
here there this that what why how when where who which some many much more most every each other
time year home work school friend family rain wind snow cloud river hill field town street car bus""".split()


def build_random_base(out_dir: Path, seed: int = 0, init_range: float = 0.1, hidden_size: int = 32,
                      num_layers: int = 2, num_experts: int = 4, expert_size: int = 32) -> Path:
    """A random-init Qwen3-MoE (top-2 routing) and a word-level tokenizer, saved to out_dir."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

    specials = ["<pad>", "<eos>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(WORDS)))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cfg = Qwen3MoeConfig(
            vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
            moe_intermediate_size=expert_size, num_hidden_layers=num_layers, num_attention_heads=4,
            num_key_value_heads=2, head_dim=hidden_size // 4, num_experts=num_experts, num_experts_per_tok=2,
            max_position_embeddings=128, norm_topk_prob=True, eos_token_id=vocab["<eos>"],
            pad_token_id=vocab["<pad>"], tie_word_embeddings=False,
            # wider than the default 0.02: with a random lm_head of std 0.02 no hidden state can move the
            # next-token distribution far, and a random base would be untrainable by LoRA.
            initializer_range=init_range,
        )
        model = Qwen3MoeForCausalLM(cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir
