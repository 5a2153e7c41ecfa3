"""Start-up memory check: each stage estimates what its configuration needs on its device and
refuses to start, naming the figure, the memory available and the config keys to change, instead
of running out of memory mid-job (part of the base-model contract, re-exported by
``looprl.policy.model``).

``check_memory(cfg, stage, placement, ...)`` with stage "reward" (the updater), "policy" (the PPO
trainer), "gate" or "serving" runs before the stage loads a model. It builds the base from its
``config.json`` on the meta device (transformers' exact parameter shapes, fused experts included,
no memory) and finds the LoRA targets the stage would use (``looprl.policy.families``); it reads
no weights.

Available memory: ``model.memory_budget_gb`` when set, else ``torch.cuda.mem_get_info`` (free) on a
GPU, else the RAM the OS reports available (psutil, /proc/meminfo). A stage is refused when its
estimate exceeds ``HEADROOM`` (90%) of that: the CUDA context, allocator fragmentation and kernel
workspaces are not in the formula.

The formula (b = bytes per element of ``model.dtype``; P the base's parameters; L the LoRA
parameters, r x (in + out) per targeted weight matrix and expert; H hidden size, V vocabulary,
q/kv the per-token query and key+value widths, E experts, k experts per token, I expert
intermediate size; T = prompt + answer tokens):

- weights: P x b per copy of the base a stage holds (the PPO trainer: the policy and the reward
  model it scores with; the reward updater: the model it trains and the published one it compares
  against; the gate: candidate policy and reward model; serving: one);
- LoRA and optimizer: 16 bytes per trainable parameter (float32 weight, gradient, two AdamW
  moments); inference-only adapters 4 bytes per parameter;
- activations kept for the backward pass, per token and decoder layer:
  (4H + 2q + kv + E + k(H + 3I)) x b; with ``model.gradient_checkpointing`` only each layer's
  input (H x b per layer) plus one layer's worth; a forward without gradients keeps about one
  layer alive: (2H + q + kv + 3kI) x b per token;
- log-probs: "naive" holds the (tokens, V) logits in the model dtype and twice in float32 (plus
  their gradient when training); "chunked"/"triton" the same for a (tokens, chunk) slice;
- peft's expert-LoRA path ("peft" moe_lora with expert targets) materialises W + BA for every
  expert: one copy of each MoE layer's expert weights is kept per layer when training, one layer's
  at a time otherwise;
- KV cache: rows x T x layers x kv x b (PPO rollouts: the rollout batch; serving:
  ``serving.max_batch_size`` x ``serving.max_context_tokens``, a bound the engine enforces);
- the PPO trainer's activations are the largest of its three phases (rollout: KV cache + prefill;
  old-policy/base evaluation, a minibatch at a time, without gradients; one minibatch with
  gradients).

Attention scores are not counted: SDPA's fused kernels do not materialise them. The estimate is a
planning figure, not a guarantee; ``benchmarks/gpu_loop.py`` prints it beside the measured peak.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from looprl.kernels import resolve_auto
from looprl.ops.core.config import ConfigError, LooprlConfig
from looprl.ops.core.log import get_logger
from looprl.policy.families import Targets, count_parameters, family_of, read_config, resolve_targets, weight_files
from looprl.policy.placement import Placement, resolve_placement

log = get_logger(__name__)

GiB = 1024 ** 3
HEADROOM = 0.9
Stage = Literal["reward", "policy", "gate", "serving"]
STAGE_NAMES = {"reward": "reward updater", "policy": "PPO trainer", "gate": "promotion gate",
               "serving": "embedded server"}


class MemoryBudgetError(ConfigError):
    """A stage's configuration needs more memory than its device has; the message says what to change."""


# ---------------------------------------------------------------------- the base's shape
@dataclass(frozen=True)
class BaseShape:
    """What the estimate needs from a checkpoint directory, without loading its weights: the
    model built from its config.json on the meta device (transformers' own parameter layout,
    fused experts included, no memory)."""

    path: Path
    model: nn.Module = field(repr=False)
    params: int
    layers: int
    hidden: int
    vocab: int
    q_dim: int
    kv_dim: int  # key + value elements per token and layer
    experts: int
    top_k: int
    expert_inter: int
    expert_params: int  # routed expert weights, all layers
    moe_layers: int
    max_positions: int

    @classmethod
    def of(cls, path: str | Path) -> "BaseShape":
        path = Path(path)
        return _base_shape(path, (path / "config.json").stat().st_mtime_ns if (path / "config.json").is_file() else 0)

    def lora_params(self, rank: int, target_modules: Targets, target_parameters: Targets, section: str) -> int:
        """LoRA parameters of rank ``rank`` on the targets peft would adapt in this base
        (``looprl.policy.families.resolve_targets``: "auto" discovers them per family)."""
        targets = resolve_targets(self.model, target_modules, target_parameters, section=section)
        mods, params = dict(self.model.named_modules()), dict(self.model.named_parameters())
        n = 0
        for name in targets.modules:
            w = getattr(mods[name], "weight", None)
            if w is not None and w.dim() >= 2:
                n += rank * (w.shape[-1] + w.shape[-2]) * math.prod(w.shape[:-2])
        for name in targets.parameters:
            w = params[name]
            n += rank * (w.shape[-1] + w.shape[-2]) * math.prod(w.shape[:-2])
        return n

    def lora_on_experts(self, target_modules: Targets, target_parameters: Targets, section: str) -> bool:
        """True when the targets reach the routed experts (peft's path then materialises them)."""
        targets = resolve_targets(self.model, target_modules, target_parameters, section=section)
        return any(".experts." in n for n in (*targets.modules, *targets.parameters))

    def train_elems(self) -> int:
        """Activation elements kept for backward, per token and decoder layer."""
        h, k, i = self.hidden, self.top_k, self.expert_inter
        return 4 * h + 2 * self.q_dim + self.kv_dim + self.experts + k * (h + 3 * i)

    def infer_elems(self) -> int:
        """Activation elements alive in a forward without gradients, per token."""
        return 2 * self.hidden + self.q_dim + self.kv_dim + 3 * self.top_k * self.expert_inter


@functools.lru_cache(maxsize=4)
def _base_shape(path: Path, _mtime: int) -> BaseShape:
    from transformers import AutoConfig, AutoModelForCausalLM

    # the errors loading would give (no config.json, bad JSON, unsupported family), naming the file
    family_of(read_config(path), where=f"base model directory {path}")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot estimate memory: {path}/config.json does not describe a causal LM "
                         f"transformers can build ({e})") from None
    text = config.get_text_config()

    def get(*keys: str, default: int = 0) -> int:
        for k in keys:
            v = getattr(text, k, None)
            if isinstance(v, int) and v > 0:
                return v
        return default

    hidden, heads = get("hidden_size"), get("num_attention_heads", default=1)
    if get("kv_lora_rank"):  # multi-head latent attention (DeepSeek-V3): transformers caches full K and V
        qk = get("qk_nope_head_dim") + get("qk_rope_head_dim")
        q_dim, kv_dim = heads * qk, heads * (qk + get("v_head_dim"))
    else:
        head_dim = get("head_dim", default=hidden // heads)
        q_dim, kv_dim = heads * head_dim, 2 * get("num_key_value_heads", default=heads) * head_dim
    named = dict(model.named_parameters())
    experts = [n for n in named if ".experts." in n]
    n_experts = get("num_experts", "num_local_experts", "n_routed_experts")
    return BaseShape(
        path=path, model=model, params=sum(t.numel() for t in named.values()), layers=get("num_hidden_layers"),
        hidden=hidden, vocab=get("vocab_size"), q_dim=q_dim, kv_dim=kv_dim, experts=n_experts,
        top_k=get("num_experts_per_tok", default=1) if n_experts else 1,
        expert_inter=get("moe_intermediate_size", "intermediate_size", default=4 * hidden),
        expert_params=sum(named[n].numel() for n in experts), moe_layers=len({n.split(".experts.")[0] for n in experts}),
        max_positions=get("max_position_embeddings", default=2048))


# ---------------------------------------------------------------------- the plan
@dataclass
class MemoryPlan:
    stage: Stage
    placement: Placement
    parts: dict[str, int]  # what -> bytes
    keys: dict[str, object]  # config keys that move the figure -> their current values
    available: int = 0
    available_from: str = ""

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.total <= HEADROOM * self.available

    def message(self) -> str:
        parts = ", ".join(f"{k} {gib(v)}" for k, v in self.parts.items() if v)
        keys = ", ".join(f"{k} (now {v})" for k, v in self.keys.items())
        return (f"the {STAGE_NAMES[self.stage]} needs about {gib(self.total)} on {self.placement.describe()} "
                f"({parts}), but {gib(self.available)} is available ({self.available_from}; a stage plans for at most "
                f"{HEADROOM:.0%} of it): change {keys}, or set model.memory_budget_gb if this machine has more to give")


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= 0.01 * GiB else f"{n / 1024 ** 2:.1f} MiB"


def _logits_bytes(tokens: int, vocab: int, b: int, logprob: str, chunk: int, grad: bool) -> int:
    width = vocab if logprob == "naive" else min(chunk, vocab)
    return tokens * width * (b + 8 + (4 if grad else 0))


def _peft_experts_bytes(shape: BaseShape, b: int, grad: bool) -> int:
    per_layer = shape.expert_params // max(shape.moe_layers, 1)
    return shape.expert_params * b + 2 * per_layer * 4 if grad else 2 * per_layer * b


def _rollout_bytes(shape: BaseShape, b: int, rows: int, prompt: int, answer: int) -> int:
    kv = rows * (prompt + answer) * shape.layers * shape.kv_dim * b
    prefill = rows * prompt * shape.infer_elems() * b
    return kv + prefill + rows * shape.vocab * 8


def _train_bytes(shape: BaseShape, b: int, tokens: int, checkpointing: bool) -> int:
    per_token = shape.layers * shape.hidden + shape.train_elems() if checkpointing \
        else shape.layers * shape.train_elems()
    return tokens * per_token * b


def plan(cfg: LooprlConfig, stage: Stage, placement: Placement | None = None, *, policy_copies: int = 1,
         reward_copies: int = 1) -> MemoryPlan:
    """The estimate of ``stage`` (see the module docstring). ``policy_copies`` / ``reward_copies``:
    copies of the policy base and of the reward model the stage's processes on this device hold."""
    pl = placement or resolve_placement(cfg.model)
    b = torch.empty((), dtype=pl.dtype).element_size()
    base = BaseShape.of(cfg.serving.base_path or cfg.base_path) if stage == "serving" else BaseShape.of(cfg.base_path)
    moe_lora, logprob = resolve_auto(cfg.kernels.moe_lora, cfg.kernels.logprob, pl.device)
    chunk = cfg.kernels.logprob_chunk_size
    ckpt = cfg.model.gradient_checkpointing
    def shown(setting: str, resolved: str) -> str:
        return setting if setting == resolved else f"{setting}: {resolved}"

    mkeys: dict[str, object] = {"model.dtype": shown(cfg.model.dtype, str(pl.dtype).removeprefix("torch."))}
    kkeys: dict[str, object] = {"kernels.logprob": shown(cfg.kernels.logprob, logprob),
                                "kernels.moe_lora": shown(cfg.kernels.moe_lora, moe_lora)}
    p, rc = cfg.policy, cfg.reward

    def reward_weights(copies: int) -> int:
        if copies <= 0:
            return 0
        if cfg.reward.checkpoint_path is None:
            return copies * base.params * b
        # any sequence-classification checkpoint: its parameter count from the safetensors headers
        src = Path(cfg.reward.checkpoint_path)
        return copies * count_parameters(weight_files(src)) * b

    parts: dict[str, int] = {}
    if stage == "policy":
        t = p.max_prompt_tokens + p.max_new_tokens
        lora = base.lora_params(p.lora_rank, p.target_modules, p.target_parameters, "policy") \
            + base.hidden * (base.hidden + 2) + 1
        peft_experts = moe_lora == "peft" and base.lora_on_experts(p.target_modules, p.target_parameters, "policy")
        rollout = _rollout_bytes(base, b, p.rollout_batch_size, p.max_prompt_tokens, p.max_new_tokens)
        mb = min(p.minibatch_size, p.rollout_batch_size)
        evaluate = mb * t * base.infer_elems() * b \
            + _logits_bytes(mb * t, base.vocab, b, logprob, chunk, grad=False) \
            + (_peft_experts_bytes(base, b, grad=False) if peft_experts else 0)
        learn = _train_bytes(base, b, mb * t, ckpt) + _logits_bytes(mb * t, base.vocab, b, logprob, chunk, grad=True) \
            + (_peft_experts_bytes(base, b, grad=True) if peft_experts else 0)
        parts = {"policy weights": policy_copies * base.params * b, "reward-model weights": reward_weights(reward_copies),
                 "LoRA + value head + optimizer": 16 * lora, "activations": max(rollout, evaluate, learn)}
        keys = {"policy.rollout_batch_size": p.rollout_batch_size, "policy.minibatch_size": p.minibatch_size,
                "policy.max_new_tokens": p.max_new_tokens, "policy.max_prompt_tokens": p.max_prompt_tokens,
                "model.gradient_checkpointing": ckpt, **kkeys, **mkeys}
    elif stage == "reward":
        seqs = 2 * rc.batch_size  # a batch of pairs scores two sequences per example
        lora = base.lora_params(rc.lora_rank, rc.target_modules, rc.target_parameters, "reward") + base.hidden + 1
        peft_experts = moe_lora == "peft" and base.lora_on_experts(rc.target_modules, rc.target_parameters, "reward")
        learn = _train_bytes(base, b, seqs * rc.max_seq_len, ckpt) \
            + (_peft_experts_bytes(base, b, grad=True) if peft_experts else 0)
        score = 64 * rc.max_seq_len * base.infer_elems() * b  # RewardModel.score's batches of 64
        # every adapter's weights and gradients; the optimizer's moments of the one adapter training
        adapters = rc.ensemble_adapters
        parts = {"weights (working + published model)": 2 * base.params * b,
                 "LoRA + head + optimizer": (8 * adapters + 8) * lora,
                 "activations": max(learn, score)}
        keys = {"reward.batch_size": rc.batch_size, "reward.max_seq_len": rc.max_seq_len,
                "model.gradient_checkpointing": ckpt, "reward.target_parameters": list(rc.target_parameters),
                "reward.ensemble_adapters": adapters, **mkeys}
    elif stage == "gate":
        n, t = cfg.gate.heldout_prompts, p.max_prompt_tokens + p.max_new_tokens
        lora = base.lora_params(p.lora_rank, p.target_modules, p.target_parameters, "policy")
        peft_experts = moe_lora == "peft" and base.lora_on_experts(p.target_modules, p.target_parameters, "policy")
        evaluate = n * t * base.infer_elems() * b + _logits_bytes(n * t, base.vocab, b, logprob, chunk, grad=False) \
            + (_peft_experts_bytes(base, b, grad=False) if peft_experts else 0)
        parts = {"policy weights": base.params * b, "reward-model weights": reward_weights(reward_copies),
                 "adapters (candidate + incumbent)": 2 * 4 * lora,
                 "activations": max(_rollout_bytes(base, b, n, p.max_prompt_tokens, p.max_new_tokens), evaluate)}
        keys = {"gate.heldout_prompts": n, "policy.max_new_tokens": p.max_new_tokens,
                "policy.max_prompt_tokens": p.max_prompt_tokens, "kernels.logprob": kkeys["kernels.logprob"], **mkeys}
    elif stage == "serving":
        s = cfg.serving
        ctx = min(s.max_context_tokens or base.max_positions, base.max_positions)
        lora = base.lora_params(s.max_lora_rank, p.target_modules, p.target_parameters, "policy")
        peft_experts = s.moe_lora == "peft" and base.lora_on_experts(p.target_modules, p.target_parameters, "policy")
        parts = {"weights": base.params * b, "adapters": s.max_loras * 4 * lora,
                 "KV cache": s.max_batch_size * ctx * base.layers * base.kv_dim * b,
                 "prefill activations": s.max_batch_size * ctx * base.infer_elems() * b + s.max_batch_size * base.vocab * 8
                 + (_peft_experts_bytes(base, b, grad=False) if peft_experts else 0)}
        keys = {"serving.max_batch_size": s.max_batch_size, "serving.max_context_tokens": s.max_context_tokens or ctx,
                "serving.max_loras": s.max_loras, "serving.max_lora_rank": s.max_lora_rank, **mkeys}
    else:
        raise ValueError(f"unknown stage {stage!r} (reward, policy, gate or serving)")
    return MemoryPlan(stage, pl, parts, keys)


# ---------------------------------------------------------------------- what is available
def available_ram() -> int:
    """Bytes of RAM the OS reports available to a new allocation."""
    try:
        import psutil  # optional: present with Ray, not a declared dependency

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def available_memory(placement: Placement, budget_gb: float | None = None) -> tuple[int, str]:
    """(bytes, where the figure comes from) for a stage on ``placement``."""
    if budget_gb is not None:
        return int(budget_gb * GiB), f"model.memory_budget_gb = {budget_gb}"
    if placement.is_cuda:
        free, _ = torch.cuda.mem_get_info(placement.device)
        return int(free), f"free on {placement.device} per torch.cuda.mem_get_info"
    return available_ram(), "RAM available per the OS"


def check_memory(cfg: LooprlConfig, stage: Stage, placement: Placement | None = None, **copies: int) -> MemoryPlan:
    """Estimate ``stage``'s memory and raise ``MemoryBudgetError`` when it does not fit; else log
    the figure and return the plan. Call before loading any model."""
    mp = plan(cfg, stage, placement, **copies)
    mp.available, mp.available_from = available_memory(mp.placement, cfg.model.memory_budget_gb)
    if not mp.fits:
        raise MemoryBudgetError(mp.message())
    log.info("memory plan", stage=stage, device=str(mp.placement.device), needs=gib(mp.total),
             available=gib(mp.available), **{k: gib(v) for k, v in mp.parts.items()})
    return mp
