"""The reward model: r(prompt, completion) -> one float.

Default form: the frozen base MoE, its own LoRA adapter (by default on the targets
``looprl.policy.families`` discovers for the base's family: attention, routed and shared experts)
and an ensemble of K scalar heads (``reward.ensemble_heads``) on the pooled features
(``RewardModel.features``): the score is the heads' mean, their spread the model's uncertainty.
With ``reward.ensemble_adapters`` A > 1 the model holds A independent LoRA adapters on the one
frozen base (peft adapters "default", "adapter1", ...), each with its own K heads, trained apart
from different random starts: the score is the mean of all A x K heads. It
reads an answer as it was served: the conversation rendered with the base's chat template
(``render_prompt_ids``), the completion's tokens, and the end-of-turn token that closes the answer
(``end_of_turn_id``). A version in the registry (kind ``reward``) holds only what was trained:

    reward_model.safetensors   LoRA tensors ("lora.<name>") + heads ("head.weight" (K, F), "head.bias" (K,);
                               a version saved with one head, (1, F), loads as a one-head ensemble);
                               adapter i > 0 of an A-adapter model: "adapter<i>.lora.<name>", "adapter<i>.head.*"
    reward_config.json         LoRA settings, max_seq_len, text format, base checksum, ensemble_adapters

and it is tied to the base checkpoint's checksum: loading it on another base is refused.

Alternative form: any sequence-classification checkpoint directory (``reward.checkpoint_path``,
``AutoModelForSequenceClassification`` with ``num_labels=1``) scores instead; it is fixed (the
updater does not train it).

Public API (used by the policy trainer and the promotion gate):
``load_reward_model(cfg, version=None) -> RewardModel``; ``RewardModel.score(prompts,
completions) -> torch.Tensor`` (float32, shape (n,), no grad; the ensemble mean);
``RewardModel.version``. Uncertainty: ``score_members`` (A x K, n) and ``score_with_uncertainty``
(mean, std).
"""

from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import transformers
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from looprl.kernels import select as select_kernels
from looprl.ops.core.config import LooprlConfig, RewardConfig
from looprl.ops.core.log import get_logger
from looprl.ops.core.chat import Chat
from looprl.policy.families import resolve_targets
from looprl.policy.model import (
    base_checksum, completion_ids, enable_gradient_checkpointing, end_of_turn_id, ensure_chat_template, load_base,
    Placement, model_device, render_prompt_ids, resolve_placement,
)
from looprl.storage.registry import Registry, RegistryError

log = get_logger(__name__)

KIND = "reward"
WEIGHTS_FILE = "reward_model.safetensors"
CONFIG_FILE = "reward_config.json"
TEXT_FORMAT = "chat_template(prompt, add_generation_prompt) + completion + end_of_turn"
# What the heads read (``RewardModel.features``), by name -> width in hidden sizes. A version
# records its own in reward_config.json ("features"); one saved before that entry is "last".
#   last        the hidden state of the last token (the end of turn);
#   last_match  that, and the mean prompt hidden state times the mean answer hidden state
#               (elementwise): a term where the question and the answer meet directly, so what the
#               user likes can depend on what they asked (reward/README.md, "Features");
#   echo        last_match, and the answer's hidden states summed over the tokens that echo the
#               question (their id occurs in the prompt) and over the others, each divided by the
#               answer's length: whether the answer stays with what was asked, or what it says that
#               was not asked, is read token by token, where a mean over the answer dilutes it;
#   echo_sum    echo with those two sums divided by a fixed SUM_TOKENS instead of the answer's
#               length: how much of something an answer says, not how dense it is in it. With
#               means, a second sentence that adds nothing the user likes dilutes the first and
#               scores lower, though the user likes both answers alike (reward/README.md, "Features").
FEATURES = {"last": 1, "last_match": 2, "echo": 4, "echo_sum": 4}
# echo_sum's divisor: about one short answer's tokens, so its sums are on the scale of echo's means
# (the heads' initialisation and learning rate stay right for both).
SUM_TOKENS = 16.0
# encode()'s mask: 0 padding, then the segment of each real token
PROMPT_TOKEN, ANSWER_TOKEN = 1, 2


def adapter_name(i: int) -> str:
    """peft's name of the reward model's adapter ``i`` (the first keeps peft's "default", so a
    one-adapter model is the model of versions saved before ensemble adapters)."""
    return "default" if i == 0 else f"adapter{i}"


def _state_prefix(i: int) -> str:
    """Where adapter ``i``'s tensors live in a version's safetensors ("" for the first)."""
    return "" if i == 0 else f"{adapter_name(i)}."


class RewardModelError(RegistryError):
    """A reward version or checkpoint cannot be used (bad weights, wrong base, missing files)."""


def encode_answer(tok: Any, prompt: Chat | str, completion: str, max_len: int) -> list[int]:
    """The served token sequence of one answer, at most ``max_len`` tokens: the rendered prompt,
    the completion, the end of turn. Too long, the prompt loses its oldest tokens first (down to
    half the budget), then the completion its last ones; the end of turn always stays."""
    p, a = _answer_parts(tok, prompt, completion, max_len)
    return p + a


def _answer_parts(tok: Any, prompt: Chat | str, completion: str, max_len: int) -> tuple[list[int], list[int]]:
    """``encode_answer`` split into (prompt ids, answer ids with the end of turn)."""
    p, c = render_prompt_ids(tok, prompt), completion_ids(tok, completion)
    budget = max_len - 1
    keep_c = min(len(c), max(budget - len(p), budget // 2))
    keep_p = min(len(p), budget - keep_c)
    return p[len(p) - keep_p:], c[:keep_c] + [end_of_turn_id(tok)]


def feature_width(features: str, hidden_size: int, source: str = "reward.features") -> int:
    """F for ``features`` on a base of ``hidden_size``; an unknown name is refused, naming ``source``."""
    if features not in FEATURES:
        raise RewardModelError(f"{source}: unknown reward features {features!r} (this version of looprl "
                               f"reads {sorted(FEATURES)})")
    return FEATURES[features] * hidden_size


class EnsembleHead(nn.Module):
    """K scalar linear heads on the same features: ``weight`` (K, F), ``bias`` (K,) -> (B, K).
    K = 1 is the single head of versions saved before ensembles (same tensor names)."""

    def __init__(self, in_features: int, n_heads: int = 1, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.n_heads = in_features, n_heads
        self.weight = nn.Parameter(torch.empty(n_heads, in_features, device=device))
        self.bias = nn.Parameter(torch.zeros(n_heads, device=device))
        # Random (not zero) rows, each its own draw: with LoRA's B at zero, a zero head would leave
        # the LoRA without gradient at the start (a saddle that costs ~100 steps), and identical
        # rows would make the ensemble's members agree for no reason. The biases start at 0.
        nn.init.normal_(self.weight, std=in_features ** -0.5)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.weight.T + self.bias

    def resized(self, n_heads: int) -> "EnsembleHead":
        """A copy with ``n_heads`` heads: the first ones kept, new ones copies of the existing heads
        (cycled) plus a small random nudge, so a model trained with fewer heads keeps its scores and
        the new heads diverge as they train on their own bootstrap weights."""
        out = EnsembleHead(self.in_features, n_heads, device=self.weight.device)
        with torch.no_grad():
            idx = torch.arange(n_heads, device=self.weight.device) % self.n_heads
            out.weight.copy_(self.weight[idx])
            out.bias.copy_(self.bias[idx])
            if n_heads > self.n_heads:
                out.weight[self.n_heads:] += 0.1 * self.in_features ** -0.5 * torch.randn_like(out.weight[self.n_heads:])
        return out


class RewardModel(nn.Module):
    """Frozen base + LoRA adapter(s) + an ensemble of scalar heads per adapter (or a fixed
    sequence-classification checkpoint).

    ``heads[i]`` reads the features of peft adapter ``adapter_name(i)``. ``features`` and ``head``
    are those of the active adapter (``using(i)``; the first outside it), so the training loop sees
    one adapter at a time; ``members`` and the scores read every adapter."""

    def __init__(self, backbone: nn.Module, tokenizer: Any, head: EnsembleHead | list[EnsembleHead] | None, *,
                 version: str | None, base_checksum: str | None, max_seq_len: int,
                 lora_settings: dict[str, Any] | None = None, classifier: bool = False, features: str = "last"):
        super().__init__()
        self.feature_kind = features  # a FEATURES name; the heads read self.feature_dim of them
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.heads = nn.ModuleList([] if head is None else [head] if isinstance(head, EnsembleHead) else head)
        self._active = 0
        self.version = version
        self.base_checksum = base_checksum
        self.max_seq_len = max_seq_len
        self.lora_settings = lora_settings or {}
        self.classifier = classifier

    # ---- adapters ----
    @property
    def head(self) -> EnsembleHead | None:
        """The active adapter's heads (None for a sequence-classification checkpoint)."""
        return self.heads[self._active] if len(self.heads) else None

    @property
    def n_adapters(self) -> int:
        return max(1, len(self.heads))

    @property
    def active_adapter(self) -> int:
        """The adapter ``features``/``head`` read now (``using``)."""
        return self._active

    @contextmanager
    def using(self, i: int) -> Iterator[None]:
        """Make adapter ``i`` the one ``features``/``head``/``batch_loss`` see, then switch back.
        peft's ``set_adapter`` also marks the active adapter trainable and the others frozen;
        which parameters train is this model's business (all adapters while the updater owns it,
        none once loaded for scoring), so every flag is put back as it was. The active adapter is
        the model's state: one thread scores or trains a model at a time (serving's comparer
        holds a lock)."""
        if not 0 <= i < self.n_adapters:
            raise IndexError(f"reward model adapter {i}: it has {self.n_adapters}")
        if self.n_adapters == 1:  # nothing to switch (and a checkpoint classifier has no adapters)
            yield
            return
        flags = [(p, p.requires_grad) for p in self.backbone.parameters()]
        previous = self._active
        self.backbone.set_adapter(adapter_name(i))
        self._active = i
        try:
            yield
        finally:
            self.backbone.set_adapter(adapter_name(previous))
            self._active = previous
            for p, flag in flags:
                p.requires_grad_(flag)

    def adapter_parameters(self, i: int) -> list[nn.Parameter]:
        """Adapter ``i``'s trainable parameters: its LoRA tensors and its heads."""
        if self.n_adapters == 1:
            return self.trainable_parameters()
        tag = f".{adapter_name(i)}."
        lora = [p for n, p in self.backbone.named_parameters() if "lora_" in n and tag in n and p.requires_grad]
        return lora + [p for p in self.heads[i].parameters() if p.requires_grad]

    # ---- construction ----
    @classmethod
    def fresh(cls, cfg: LooprlConfig, seed: int | None = None, features: str | None = None,
              adapters: int | None = None) -> "RewardModel":
        """A new reward model on the configured base: LoRA at init (a no-op) and random heads,
        reading ``features`` (None: ``reward.features``), with ``adapters`` independent adapters
        (None: ``reward.ensemble_adapters``), each from its own random start."""
        rc = cfg.reward
        features = rc.features if features is None else features
        adapters = rc.ensemble_adapters if adapters is None else adapters
        torch.manual_seed(rc.seed if seed is None else seed)
        placement = resolve_placement(cfg.model)
        base, tok = load_base(cfg.base_path, device=placement.device, dtype=placement.dtype)
        if cfg.model.gradient_checkpointing:  # the updater trains this model
            enable_gradient_checkpointing(base)
        settings = lora_settings(rc, base)
        backbone = _attach_lora(base, settings, adapters)
        use_kernels(backbone, cfg)
        heads = []
        for _ in range(adapters):  # float32 whatever the backbone's dtype
            head = EnsembleHead(feature_size(base, features), rc.ensemble_heads, device=placement.device)
            with torch.no_grad():  # the question-answer term starts silent: a fresh model scores as "last" does
                head.weight[:, base.config.hidden_size:] = 0.0
            heads.append(head)
        return cls(backbone, tok, heads, version=None, base_checksum=base_checksum(cfg.base_path),
                   max_seq_len=rc.max_seq_len, lora_settings=settings, features=features)

    # ---- encoding ----
    def encode(self, prompts: list[Chat | str], completions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids and mask; each row is ``encode_answer`` (ends with the end of turn).
        The mask is 0 on padding, PROMPT_TOKEN on the prompt, ANSWER_TOKEN on the answer and its
        end of turn (``forward`` attends to every nonzero position)."""
        if len(prompts) != len(completions):
            raise ValueError(f"score: {len(prompts)} prompts but {len(completions)} completions")
        tok = self.tokenizer
        pad = tok.pad_token_id
        rows = [_answer_parts(tok, p, c, self.max_seq_len) for p, c in zip(prompts, completions)]
        width = max(len(p) + len(a) for p, a in rows)
        x = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (p, a) in enumerate(rows):
            x[i, : len(p) + len(a)] = torch.tensor(p + a)
            mask[i, : len(p)] = PROMPT_TOKEN
            mask[i, len(p): len(p) + len(a)] = ANSWER_TOKEN
        return x, mask

    # ---- forward ----
    @property
    def device(self) -> torch.device:
        return model_device(self.backbone)

    @property
    def n_heads(self) -> int:
        """Heads over all adapters: the rows of ``members``/``score_members``."""
        return 1 if not len(self.heads) else sum(h.n_heads for h in self.heads)

    @property
    def feature_dim(self) -> int:
        """F, the width of ``features``: what the heads read."""
        return self.head.in_features

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The pooled float32 features (B, F) the heads read (F = ``self.feature_dim``), on the
        model's device, as ``self.feature_kind`` says (``FEATURES``): the hidden state of the last
        real token (the end of turn), for "last_match" and "echo" the mean prompt hidden state times
        the mean answer hidden state, for "echo" the answer's hidden states summed over the tokens
        whose id occurs in the prompt and over the rest, each over the answer's length ("echo_sum":
        over ``SUM_TOKENS``).
        ``attention_mask`` is ``encode``'s (segments marked)."""
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        attend = (attention_mask > 0).long()
        hidden = _decoder(self.backbone)(input_ids=input_ids, attention_mask=attend).last_hidden_state.float()
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        last = hidden[rows, attend.sum(dim=1) - 1]  # right padding: the last real token (the end of turn)
        if self.feature_kind == "last":
            return last  # the heads read float32 features of a bf16 backbone
        prompt = (attention_mask == PROMPT_TOKEN).unsqueeze(-1).float()
        answer = (attention_mask == ANSWER_TOKEN).unsqueeze(-1).float()
        if not bool(answer.any(dim=1).all()):
            raise ValueError("reward features: every row needs its answer tokens marked in the mask "
                             "(RewardModel.encode's ANSWER_TOKEN)")
        length = answer.sum(dim=1)
        u = (hidden * prompt).sum(dim=1) / prompt.sum(dim=1).clamp_min(1.0)
        v = (hidden * answer).sum(dim=1) / length
        if self.feature_kind == "last_match":
            return torch.cat([last, u * v], dim=-1)
        # (B, T, T) id comparisons: a few thousand per row at reward.max_seq_len, cheap next to the backbone
        same = (input_ids.unsqueeze(2) == input_ids.unsqueeze(1)) & (attention_mask == PROMPT_TOKEN).unsqueeze(1)
        echo = (same.any(dim=2).unsqueeze(-1) & (answer > 0)).float()
        per = length if self.feature_kind == "echo" else torch.full_like(length, SUM_TOKENS)
        echoed = (hidden * echo).sum(dim=1) / per
        other = (hidden * (answer - echo)).sum(dim=1) / per
        return torch.cat([last, u * v, echoed, other], dim=-1)

    def members(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Every head's float32 reward, (B, A x K) (adapter by adapter), with gradients to the LoRA
        and the heads."""
        if self.classifier:
            input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
            return self.backbone(input_ids=input_ids, attention_mask=attention_mask).logits[:, :1].float()
        if self.n_adapters == 1:
            return self.head(self.features(input_ids, attention_mask))
        out = []
        for i in range(self.n_adapters):
            with self.using(i):
                out.append(self.head(self.features(input_ids, attention_mask)))
        return torch.cat(out, dim=-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Scalar float32 rewards (B,): the ensemble's mean, on the model's device, with gradients
        to the LoRA and head parameters. Inputs move to the model's device."""
        return self.members(input_ids, attention_mask).mean(dim=-1)

    @torch.no_grad()
    def score_members(self, prompts: list[Chat | str], completions: list[str], batch_size: int = 64) -> torch.Tensor:
        """Every head's float32 reward, shape (A x K, len(prompts)), batched, no grad, on the CPU."""
        if len(prompts) != len(completions):
            raise ValueError(f"score: {len(prompts)} prompts but {len(completions)} completions")
        was_training = self.training
        self.eval()
        out = []
        try:
            for i in range(0, len(prompts), batch_size):
                x, m = self.encode(prompts[i: i + batch_size], completions[i: i + batch_size])
                out.append(self.members(x, m))
        finally:
            self.train(was_training)
        return torch.cat(out).T.contiguous().cpu() if out else torch.zeros((self.n_heads, 0), dtype=torch.float32)

    def score(self, prompts: list[Chat | str], completions: list[str], batch_size: int = 64) -> torch.Tensor:
        """float32 rewards (the ensemble's mean), shape (len(prompts),), batched, no grad."""
        return self.score_members(prompts, completions, batch_size).mean(dim=0)

    def score_with_uncertainty(self, prompts: list[Chat | str], completions: list[str],
                               batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) over all heads, each float32 (n,); the std is 0 with one head."""
        members = self.score_members(prompts, completions, batch_size)
        return members.mean(dim=0), members.std(dim=0, correction=0)

    # ---- trainable state ----
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The tensors a version stores: LoRA ("lora.<name>") and head ("head.<name>"), those of
        adapter i > 0 under "adapter<i>."."""
        if self.classifier:
            raise RewardModelError("a sequence-classification checkpoint reward model is fixed; it has no trainable state")
        state = {}
        for i, head in enumerate(self.heads):
            pre = _state_prefix(i)
            lora = get_peft_model_state_dict(self.backbone, adapter_name=adapter_name(i))
            state.update({f"{pre}lora.{k}": v.detach().to("cpu", copy=True).contiguous() for k, v in lora.items()})
            state.update({f"{pre}head.{k}": v.detach().to("cpu", copy=True).contiguous()
                          for k, v in head.state_dict().items()})
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor], source: str = "state") -> None:
        _check_finite(state, source)
        expected = set(self.trainable_state())
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise RewardModelError(f"{source}: tensors do not match the reward model "
                                   f"(missing {missing[:3]}, unexpected {extra[:3]})")
        for i in range(self.n_adapters):
            pre = _state_prefix(i)
            lora = {k[len(pre + "lora."):]: v for k, v in state.items() if k.startswith(pre + "lora.")}
            head = {k[len(pre + "head."):]: v for k, v in state.items() if k.startswith(pre + "head.")}
            w, f = head["weight"], self.heads[i].in_features
            if w.ndim != 2 or w.shape[1] != f or head["bias"].shape != (w.shape[0],):
                raise RewardModelError(f"{source}: {pre}head.weight {tuple(w.shape)} / {pre}head.bias "
                                       f"{tuple(head['bias'].shape)} do not fit heads on {f} features (K, F) / (K,)")
            result = set_peft_model_state_dict(self.backbone, lora, adapter_name=adapter_name(i))
            unexpected = getattr(result, "unexpected_keys", None)
            if unexpected:
                raise RewardModelError(f"{source}: unexpected LoRA tensors {unexpected[:3]}")
            if w.shape[0] != self.heads[i].n_heads:  # a version with another number of heads (e.g. one)
                self.heads[i] = EnsembleHead(f, w.shape[0], device=self.heads[i].weight.device)
            self.heads[i].load_state_dict(head)

    def resize_heads(self, n_heads: int) -> None:
        """Use ``n_heads`` heads per adapter from now on (see ``EnsembleHead.resized``)."""
        for i, head in enumerate(self.heads):
            if n_heads != head.n_heads:
                self.heads[i] = head.resized(n_heads)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def save(self, out_dir: str | Path, extra_config: dict[str, Any] | None = None) -> Path:
        """Write the version files (safetensors + JSON) into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = self.trainable_state()
        _check_finite(state, "reward model to save")
        save_file(state, str(out / WEIGHTS_FILE), metadata={"base_checksum": self.base_checksum or "",
                                                              "format": "looprl-reward-v1"})
        conf = {"format": "looprl-reward-v1", "text_format": TEXT_FORMAT, "max_seq_len": self.max_seq_len,
                "base_checksum": self.base_checksum, "lora": self.lora_settings,
                "hidden_size": self.head.in_features, "features": self.feature_kind,
                "ensemble_heads": self.head.n_heads, "ensemble_adapters": self.n_adapters, **(extra_config or {})}
        (out / CONFIG_FILE).write_text(json.dumps(conf, indent=2, sort_keys=True))
        return out


# ---------------------------------------------------------------------------------------------


def feature_size(base: nn.Module, features: str = "last", source: str = "reward.features") -> int:
    """F, the width of ``RewardModel.features`` of kind ``features`` on ``base``: what the heads read."""
    return feature_width(features, base.config.hidden_size, source)


def lora_settings(rc: RewardConfig, base: nn.Module) -> dict[str, Any]:
    """LoRA settings of a fresh reward model on ``base``, targets resolved: the config's lists, or
    the family's (``"auto"``, ``looprl.policy.families``). A version stores them as resolved."""
    targets = resolve_targets(base, rc.target_modules, rc.target_parameters, section="reward")
    return {"r": rc.lora_rank, "lora_alpha": rc.lora_alpha, **targets.as_config()}


def _attach_lora(base: nn.Module, settings: dict[str, Any], adapters: int = 1) -> nn.Module:
    """``base`` wrapped by peft with ``adapters`` LoRA adapters of ``settings`` (each its own random
    start), all trainable, the first active."""
    for p in base.parameters():
        p.requires_grad_(False)
    # stored targets are checked against this base too: each must match, none may reach a router
    targets = resolve_targets(base, settings["target_modules"] or [], settings["target_parameters"] or [],
                              section="reward")
    lc = LoraConfig(r=settings["r"], lora_alpha=settings["lora_alpha"], lora_dropout=0.0,
                    target_modules=targets.target_modules or None,
                    target_parameters=targets.target_parameters or None, bias="none")
    with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5 (harmless)
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(base, lc)
        for i in range(1, adapters):
            model.add_adapter(adapter_name(i), lc)
    if adapters > 1:
        model.set_requires_grad([adapter_name(i) for i in range(adapters)], True)
    return model


def use_kernels(backbone: nn.Module, cfg: LooprlConfig) -> None:
    """Route the LoRA'd experts through ``kernels.moe_lora`` as the PPO learner does ("auto": the
    fused kernel on a GPU, peft's own path on the CPU)."""
    k = select_kernels(cfg.kernels, model_device(backbone))
    if k.moe_lora != "peft":
        k.patch_model(backbone)


def _decoder(backbone: nn.Module) -> nn.Module:
    """The transformer body (no lm_head) of the peft-wrapped causal LM; LoRA is injected in place."""
    causal_lm = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
    return causal_lm.model


def _check_finite(state: dict[str, torch.Tensor], source: str) -> None:
    for name, t in state.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise RewardModelError(f"{source}: tensor {name} has NaN or infinite values; refused")


def load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file, turning any decoding problem into an error naming the file."""
    if path.suffix != ".safetensors":
        raise RewardModelError(f"{path}: only safetensors weights are accepted")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises SafetensorError / OSError on corrupt headers
        raise RewardModelError(f"{path}: unreadable safetensors file ({e})") from e


def load_from_dir(cfg: LooprlConfig, version_dir: Path, version: str | None,
                  expected_base: str | None = None) -> RewardModel:
    """Build the reward model from version files in ``version_dir`` (already checksum-verified)."""
    conf_path = version_dir / CONFIG_FILE
    if not conf_path.is_file():
        raise RewardModelError(f"{version_dir}: missing {CONFIG_FILE}")
    try:
        conf = json.loads(conf_path.read_text())
        settings = conf["lora"]
        max_seq_len = int(conf["max_seq_len"])
        stored_base = conf["base_checksum"]
        features = conf.get("features", "last")  # versions saved before the entry read the last token
        adapters = int(conf.get("ensemble_adapters", 1))  # versions saved before the entry have one
        if adapters < 1:
            raise ValueError(f"ensemble_adapters {adapters} < 1")
    except (ValueError, KeyError, TypeError) as e:
        raise RewardModelError(f"{conf_path}: invalid reward config ({e!r})") from e
    current_base = expected_base or base_checksum(cfg.base_path)
    if stored_base != current_base:
        raise RewardModelError(f"{conf_path}: reward model was trained on base {str(stored_base)[:12]}, "
                               f"but the configured base {cfg.base_path} is {current_base[:12]}")
    state = load_weights_file(version_dir / WEIGHTS_FILE)
    _check_finite(state, str(version_dir / WEIGHTS_FILE))
    placement = resolve_placement(cfg.model)
    base, tok = load_base(cfg.base_path, device=placement.device, dtype=placement.dtype)
    n_features = feature_size(base, features, source=f"{conf_path}: features")
    heads = []
    for i in range(adapters):
        head_w = state.get(f"{_state_prefix(i)}head.weight")
        if head_w is None or head_w.ndim != 2 or head_w.shape[0] < 1 or head_w.shape[1] != n_features:
            raise RewardModelError(f"{version_dir / WEIGHTS_FILE}: {_state_prefix(i)}head.weight missing or not of "
                                   f"shape (K, {n_features})")
        heads.append(EnsembleHead(n_features, head_w.shape[0], device=placement.device))
    backbone = _attach_lora(base, settings, adapters)
    use_kernels(backbone, cfg)
    model = RewardModel(backbone, tok, heads, version=version,
                        base_checksum=current_base, max_seq_len=max_seq_len, lora_settings=settings,
                        features=features)
    model.load_trainable_state(state, source=str(version_dir / WEIGHTS_FILE))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def load_checkpoint(path: str | Path, max_seq_len: int = 128, placement: Placement | None = None) -> RewardModel:
    """A fixed reward model from any sequence-classification checkpoint (num_labels=1), on
    ``placement`` (None: float32 on the CPU)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise RewardModelError(f"reward.checkpoint_path {path} has no config.json")
    transformers.logging.set_verbosity_error()
    try:
        clf = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, use_safetensors=True, dtype=placement.dtype if placement else torch.float32)
    except (OSError, ValueError) as e:
        raise RewardModelError(f"reward.checkpoint_path {path}: cannot load a sequence-classification model ({e})") from e
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    ensure_chat_template(tok, path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if tok.eos_token_id is None:
        raise RewardModelError(f"reward.checkpoint_path {path}: tokenizer has no eos_token")
    clf.config.pad_token_id = tok.pad_token_id
    _check_finite(dict(clf.state_dict()), f"reward.checkpoint_path {path}")
    for p in clf.parameters():
        p.requires_grad_(False)
    if placement is not None:
        clf.to(placement.device)
    return RewardModel(clf, tok, None, version=f"checkpoint:{path.name}", base_checksum=None,
                       max_seq_len=max_seq_len, classifier=True).eval()


def load_reward_model(cfg: LooprlConfig, version: str | None = None) -> RewardModel:
    """The configured checkpoint, else the given or latest published reward version (verified).

    Raises ``RewardModelError``/``RegistryError`` naming the problem: no version published yet,
    a corrupted file (checksum), a version trained on another base, or non-finite weights."""
    if cfg.reward.checkpoint_path is not None:
        return load_checkpoint(cfg.reward.checkpoint_path, cfg.reward.max_seq_len, resolve_placement(cfg.model))
    reg = Registry(cfg.registry_dir)
    if version is None:
        version = reg.pointer(KIND, "latest")
        if version is None:
            raise RewardModelError(f"no reward model published yet in {cfg.registry_dir} "
                                   "(run `looprl reward update` once feedback has arrived)")
    current_base = base_checksum(cfg.base_path)
    manifest, vdir = reg.open(KIND, version, base_checksum=current_base)
    model = load_from_dir(cfg, vdir, manifest.version, expected_base=current_base)
    log.info("reward model loaded", version=manifest.version, base=current_base[:12])
    return model
