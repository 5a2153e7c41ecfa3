"""The tiny Mixture-of-Experts base model shared by every stage (policy, reward, serving).

``create_base`` builds it from scratch, offline, in well under two minutes on two CPU cores:

1. a template grammar generates a small English corpus of question/answer documents
   (``format_prompt(question) + answer + eos``);
2. a byte-level BPE tokenizer is trained on that corpus with the ``tokenizers`` library and saved
   as a ``PreTrainedTokenizerFast`` (bos/eos/pad set, so ``AutoTokenizer.from_pretrained`` works);
3. a Qwen3-MoE (or Mixtral) causal LM built from its transformers config class is pre-trained on
   the corpus for ``cfg.model.pretrain_steps`` steps and saved with ``save_pretrained``
   (safetensors).

The corpus uses the cheerful words of ``looprl.ops.preference.POSITIVE_WORDS`` in a minority of
sentences (``CHEERFUL_RATE``): the base policy then says them sometimes (PPO has something to
explore) but rarely (the simulated users are mostly unimpressed until PPO finds them).

Prompts shipped with the base (``prompt_set``) are short user questions split into train and
held-out sets *by template*, so a held-out prompt is phrased in a way the policy never trained on.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Literal

import torch

from looprl.ops.core.log import get_logger
from looprl.storage.registry import checksum_dir

if TYPE_CHECKING:  # heavy imports stay lazy: `looprl --help` must not import transformers
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

    from looprl.ops.core.config import LooprlConfig, ModelConfig

log = get_logger(__name__)

DATA_DIR = Path(__file__).parent / "data"
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
# transformers 5 MoE experts: "batched_mm" is 5-15x slower than the per-expert loop on CPU,
# "grouped_mm" needs torch._grouped_mm (GPU). The per-expert "eager" loop is the fast CPU path.
CPU_EXPERTS_IMPLEMENTATION = "eager"
CHEERFUL_RATE = 0.12  # fraction of corpus sentences that carry one cheerful word

# ---------------------------------------------------------------------------------------------
# Prompt rendering (the serving tier and the trainer both go through this one function)
# ---------------------------------------------------------------------------------------------


def format_prompt(text: str) -> str:
    """How a user prompt is rendered for the model; the completion follows directly after it."""
    return f"question: {' '.join(str(text).split())}\nanswer:"


# ---------------------------------------------------------------------------------------------
# Corpus and prompt grammar
# ---------------------------------------------------------------------------------------------

CHEERFUL = ("good", "great", "happy", "bright", "kind", "warm", "sunny", "love")
TOPICS = (
    "dog", "cat", "house", "park", "city", "sea", "garden", "river", "forest", "beach", "market",
    "school", "road", "tree", "bird", "book", "song", "food", "weather", "morning", "trip", "team",
    "town", "car", "boat", "hill", "lake", "room", "village", "train", "shop", "farm", "bridge",
    "street", "window", "kitchen", "game", "horse", "island", "field",
)
PEOPLE = ("man", "woman", "boy", "girl", "friend", "teacher", "farmer", "child", "cook", "driver")
PLACES = ("park", "house", "river", "shop", "school", "hill", "lake", "market", "farm", "bridge", "town")
ADJS = (
    "old", "new", "big", "small", "quiet", "busy", "tall", "short", "red", "blue", "green", "grey",
    "cold", "dry", "long", "slow", "fast", "calm", "plain", "round", "dark", "wet", "soft", "loud",
    "wide", "still", "brown", "flat", "full", "empty",
)
VERBS = ("walks", "runs", "sits", "waits", "looks", "stays", "goes", "comes", "stands", "rests")
PAST = ("saw", "visited", "found", "passed", "watched", "left", "cleaned", "painted", "counted", "read")
TIMES = ("today", "last night", "in the morning", "at noon", "every day", "on monday", "this week", "after lunch")
COLORS_OF_SKY = ("grey", "blue", "dark", "pale", "clear")

# Prompt templates: the train split and a held-out split phrased differently.
TRAIN_TEMPLATES = (
    "tell me about the {t}", "describe the {t}", "what is the {t} like", "say something about the {t}",
    "write a line about the {t}", "talk about the {t}",
)
HELDOUT_TEMPLATES = ("how is the {t}", "what do you think of the {t}", "give me a note on the {t}")


def prompt_set(split: Literal["train", "heldout", "all"] = "train") -> list[str]:
    """The shipped product prompts: short user questions about a topic, split by template."""
    templates = {"train": TRAIN_TEMPLATES, "heldout": HELDOUT_TEMPLATES,
                 "all": TRAIN_TEMPLATES + HELDOUT_TEMPLATES}.get(split)
    if templates is None:
        raise ValueError(f"prompt split {split!r}: expected 'train', 'heldout' or 'all'")
    return [tpl.format(t=t) for tpl in templates for t in TOPICS]


def shipped_prompts() -> list[str]:
    """Training prompts: the shipped file, or the train split of the prompt grammar."""
    path = DATA_DIR / "prompts.txt"
    if path.is_file():
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return prompt_set("train")


def heldout_prompts() -> list[str]:
    """Fresh prompts, phrased by templates the training prompts never use."""
    path = DATA_DIR / "prompts_heldout.txt"
    if path.is_file():
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return prompt_set("heldout")


def _sentence(rng: random.Random, topic: str, cheerful: bool) -> str:
    adj = rng.choice(CHEERFUL) if cheerful else rng.choice(ADJS)
    if cheerful and adj == "love":
        return rng.choice((f"i love the {topic}.", f"we love the {topic} {rng.choice(TIMES)}."))
    if cheerful and adj == "kind":
        return f"a kind {rng.choice(PEOPLE)} {rng.choice(VERBS)} to the {topic}."
    form = rng.randrange(7)
    if form == 0:
        return f"the {topic} is {adj}."
    if form == 1:
        return f"a {adj} {rng.choice(PEOPLE)} {rng.choice(VERBS)} to the {topic}."
    if form == 2:
        return f"the {topic} {rng.choice(VERBS)} near the {adj} {rng.choice(PLACES)}."
    if form == 3:
        return f"we {rng.choice(PAST)} the {adj} {topic} {rng.choice(TIMES)}."
    if form == 4:
        return f"it was {adj} {rng.choice(TIMES)}."
    if form == 5:
        return f"the {rng.choice(PEOPLE)} {rng.choice(PAST)} the {topic} and it was {adj}."
    return f"the sky over the {topic} was {adj if cheerful else rng.choice(COLORS_OF_SKY)}."


def answer(rng: random.Random, topic: str, cheerful_rate: float = CHEERFUL_RATE) -> str:
    """One to three sentences about ``topic``; each is cheerful with probability ``cheerful_rate``."""
    n = rng.choice((1, 2, 2, 3))
    return " ".join(_sentence(rng, topic, rng.random() < cheerful_rate) for _ in range(n))


def corpus(n_docs: int, seed: int = 0, cheerful_rate: float = CHEERFUL_RATE) -> list[str]:
    """Question/answer documents (without special tokens) over the training prompt templates.

    Only training templates appear, so held-out prompts stay unseen in their phrasing."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        topic = rng.choice(TOPICS)
        question = rng.choice(TRAIN_TEMPLATES).format(t=topic)
        docs.append(format_prompt(question) + " " + answer(rng, topic, cheerful_rate))
    return docs


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int) -> "PreTrainedTokenizerFast":
    """A byte-level BPE (any input text round-trips; the corpus words become single tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, EOS, BOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tk.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   padding_side="right", model_max_length=1 << 16)


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


def build_config(mc: "ModelConfig", tok: "PreTrainedTokenizerFast"):
    """A transformers config for the tiny MoE from ``cfg.model``."""
    if mc.hidden_size % mc.num_heads:
        raise ValueError(f"model.hidden_size ({mc.hidden_size}) must be divisible by model.num_heads ({mc.num_heads})")
    if mc.num_heads % mc.num_kv_heads:
        raise ValueError(f"model.num_heads ({mc.num_heads}) must be divisible by model.num_kv_heads ({mc.num_kv_heads})")
    if mc.experts_per_token > mc.num_experts:
        raise ValueError(f"model.experts_per_token ({mc.experts_per_token}) > model.num_experts ({mc.num_experts})")
    common = dict(
        vocab_size=len(tok), hidden_size=mc.hidden_size, num_hidden_layers=mc.num_layers,
        num_attention_heads=mc.num_heads, num_key_value_heads=mc.num_kv_heads,
        head_dim=mc.hidden_size // mc.num_heads, num_experts_per_tok=mc.experts_per_token,
        max_position_embeddings=mc.max_position_embeddings, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
        rope_theta=10_000.0, router_aux_loss_coef=0.01,
    )
    if mc.family == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(
            **common, num_experts=mc.num_experts, moe_intermediate_size=mc.expert_intermediate_size,
            intermediate_size=2 * mc.expert_intermediate_size, norm_topk_prob=True, decoder_sparse_step=1,
        )
    if mc.family == "mixtral":
        from transformers import MixtralConfig

        return MixtralConfig(**common, num_local_experts=mc.num_experts, intermediate_size=mc.expert_intermediate_size)
    raise ValueError(f"model.family {mc.family!r}: expected 'qwen3_moe' or 'mixtral'")


def _batches(ids: list[list[int]], batch_size: int, pad_id: int, rng: random.Random) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        batch = rng.sample(ids, batch_size)
        width = max(map(len, batch))
        x = torch.full((batch_size, width), pad_id, dtype=torch.long)
        mask = torch.zeros((batch_size, width), dtype=torch.long)
        for i, seq in enumerate(batch):
            x[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
        yield x, mask


@dataclass
class PretrainStats:
    steps: int
    first_loss: float
    final_loss: float
    seconds: float


def pretrain(model: "PreTrainedModel", tok: "PreTrainedTokenizerFast", docs: list[str], steps: int,
             batch_size: int = 32, lr: float = 3e-3, seed: int = 0, progress: bool = True) -> PretrainStats:
    """Next-token pre-training on ``docs`` (each ending in eos); AdamW, warmup + cosine decay."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    ids = [tok(d).input_ids + [tok.eos_token_id] for d in docs]
    ids = [s[: model.config.max_position_embeddings] for s in ids]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(1, steps)))))
    model.train()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc="pre-training base", unit="step", leave=False)
    t0, first, loss_ema = time.perf_counter(), float("nan"), float("nan")
    data = _batches(ids, min(batch_size, len(ids)), tok.pad_token_id, rng)
    for step in range(steps):
        x, mask = next(data)
        labels = x.masked_fill(mask == 0, -100)
        out = model(input_ids=x, attention_mask=mask, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        lv = out.loss.item()
        if step == 0:
            first, loss_ema = lv, lv
        loss_ema = 0.9 * loss_ema + 0.1 * lv
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_ema:.3f}")
    if bar is not None:
        bar.close()
    model.eval()
    return PretrainStats(steps=steps, first_loss=first, final_loss=loss_ema, seconds=time.perf_counter() - t0)


def create_base(cfg: "LooprlConfig", out_dir: str | Path | None = None, progress: bool = True,
                n_docs: int = 4000, batch_size: int = 32) -> Path:
    """Build, pre-train and save the tiny MoE base and its tokenizer; returns the directory.

    Writes into a temporary sibling directory and renames it at the end, so a crash never
    leaves a half-written base that other stages would load."""
    import shutil
    import tempfile

    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # our own bar, not "Writing model shards"
    mc = cfg.model
    out = Path(out_dir) if out_dir is not None else cfg.base_path
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    torch.manual_seed(mc.seed)
    threads = torch.get_num_threads()
    # A model this small is dominated by per-op overhead: one thread is as fast as two on an idle
    # machine and several times faster on a busy one (measured: 0.05 s/step vs 0.25 s/step).
    torch.set_num_threads(1 if mc.hidden_size <= 256 else min(2, threads))
    try:
        docs = corpus(n_docs, seed=mc.seed)
        tok = train_tokenizer(docs, mc.vocab_size)
        config = build_config(mc, tok)
        config._experts_implementation = CPU_EXPERTS_IMPLEMENTATION
        model = AutoModelForCausalLM.from_config(config, experts_implementation=CPU_EXPERTS_IMPLEMENTATION)
        stats = pretrain(model, tok, docs, mc.pretrain_steps, batch_size=batch_size, seed=mc.seed, progress=progress)
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.bos_token_id = tok.bos_token_id
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        torch.set_num_threads(threads)
    log.info("base model created", path=str(out), family=mc.family, params=sum(p.numel() for p in model.parameters()),
             vocab=len(tok), steps=stats.steps, first_loss=round(stats.first_loss, 3),
             final_loss=round(stats.final_loss, 3), seconds=round(time.perf_counter() - t0, 1))
    return out


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


@torch.no_grad()
def generate(model: "PreTrainedModel", tok: "PreTrainedTokenizerFast", prompts: list[str], max_new_tokens: int = 24,
             temperature: float = 1.0, seed: int | None = 0, greedy: bool = False) -> list[str]:
    """Completions (text after the rendered prompt, up to eos) for user prompts, batched.

    Left-pads a copy of the tokenizer so every row's prompt ends at the same position."""
    if not prompts:
        return []
    rendered = [format_prompt(p) for p in prompts]
    enc = [tok(r).input_ids for r in rendered]
    width = max(map(len, enc))
    x = torch.full((len(enc), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(x)
    for i, seq in enumerate(enc):
        x[i, width - len(seq):] = torch.tensor(seq)
        mask[i, width - len(seq):] = 1
    if seed is not None:
        torch.manual_seed(seed)
    out = model.generate(
        input_ids=x, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=not greedy,
        temperature=temperature if not greedy else None, top_k=0 if not greedy else None, top_p=None,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    new = out[:, width:]
    texts = []
    for row in new.tolist():
        if tok.eos_token_id in row:
            row = row[: row.index(tok.eos_token_id)]
        texts.append(tok.decode([t for t in row if t != tok.pad_token_id], skip_special_tokens=True).strip())
    return texts
