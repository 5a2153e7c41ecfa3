"""The reward model: r(prompt, completion) -> one float.

Default form: the frozen base MoE, its own LoRA adapter (by default on the targets
``looprl.policy.families`` discovers for the base's family: attention, routed and shared experts)
and a scalar head on the hidden state of the last token. It reads an answer as it was served: the
conversation rendered with the base's chat template (``render_prompt_ids``), the completion's
tokens, and the end-of-turn token that closes the answer (``end_of_turn_id``). A version in the
registry (kind ``reward``) holds only what was trained:

    reward_model.safetensors   LoRA tensors ("lora.<name>") + head ("head.weight", "head.bias")
    reward_config.json         LoRA settings, max_seq_len, text format, base checksum

and it is tied to the base checkpoint's checksum: loading it on another base is refused.

Alternative form: any sequence-classification checkpoint directory (``reward.checkpoint_path``,
``AutoModelForSequenceClassification`` with ``num_labels=1``) scores instead; it is fixed (the
updater does not train it).

Public API (used by the policy trainer and the promotion gate):
``load_reward_model(cfg, version=None) -> RewardModel``; ``RewardModel.score(prompts,
completions) -> torch.Tensor`` (float32, shape (n,), no grad); ``RewardModel.version``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

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


class RewardModelError(RegistryError):
    """A reward version or checkpoint cannot be used (bad weights, wrong base, missing files)."""


def encode_answer(tok: Any, prompt: Chat | str, completion: str, max_len: int) -> list[int]:
    """The served token sequence of one answer, at most ``max_len`` tokens: the rendered prompt,
    the completion, the end of turn. Too long, the prompt loses its oldest tokens first (down to
    half the budget), then the completion its last ones; the end of turn always stays."""
    p, c = render_prompt_ids(tok, prompt), completion_ids(tok, completion)
    budget = max_len - 1
    keep_c = min(len(c), max(budget - len(p), budget // 2))
    keep_p = min(len(p), budget - keep_c)
    return p[len(p) - keep_p:] + c[:keep_c] + [end_of_turn_id(tok)]


class RewardModel(nn.Module):
    """Frozen base + LoRA + scalar head (or a fixed sequence-classification checkpoint)."""

    def __init__(self, backbone: nn.Module, tokenizer: Any, head: nn.Linear | None, *, version: str | None,
                 base_checksum: str | None, max_seq_len: int, lora_settings: dict[str, Any] | None = None,
                 classifier: bool = False):
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.head = head
        self.version = version
        self.base_checksum = base_checksum
        self.max_seq_len = max_seq_len
        self.lora_settings = lora_settings or {}
        self.classifier = classifier

    # ---- construction ----
    @classmethod
    def fresh(cls, cfg: LooprlConfig, seed: int | None = None) -> "RewardModel":
        """A new reward model on the configured base: LoRA at init (a no-op) and a zero head."""
        rc = cfg.reward
        torch.manual_seed(rc.seed if seed is None else seed)
        placement = resolve_placement(cfg.model)
        base, tok = load_base(cfg.base_path, device=placement.device, dtype=placement.dtype)
        if cfg.model.gradient_checkpointing:  # the updater trains this model
            enable_gradient_checkpointing(base)
        settings = lora_settings(rc, base)
        backbone = _attach_lora(base, settings)
        use_kernels(backbone, cfg)
        head = nn.Linear(base.config.hidden_size, 1)
        # A random (not zero) head: with LoRA's B at zero, a zero head would leave the LoRA without
        # gradient at the start (a saddle that costs ~100 steps); the bias starts at 0.
        nn.init.normal_(head.weight, std=head.in_features ** -0.5)
        nn.init.zeros_(head.bias)
        head.to(placement.device)  # float32 whatever the backbone's dtype
        return cls(backbone, tok, head, version=None, base_checksum=base_checksum(cfg.base_path),
                   max_seq_len=rc.max_seq_len, lora_settings=settings)

    # ---- encoding ----
    def encode(self, prompts: list[Chat | str], completions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids and mask; each row is ``encode_answer`` (ends with the end of turn)."""
        if len(prompts) != len(completions):
            raise ValueError(f"score: {len(prompts)} prompts but {len(completions)} completions")
        tok = self.tokenizer
        pad = tok.pad_token_id
        rows = [encode_answer(tok, p, c, self.max_seq_len) for p, c in zip(prompts, completions)]
        width = max(map(len, rows))
        x = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            x[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return x, mask

    # ---- forward ----
    @property
    def device(self) -> torch.device:
        return model_device(self.backbone)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Scalar float32 rewards (B,), on the model's device, with gradients to the LoRA and head
        parameters. Inputs move to the model's device."""
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        if self.classifier:
            return self.backbone(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()
        hidden = _decoder(self.backbone)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        last = attention_mask.sum(dim=1) - 1  # right padding: index of the last real token (eos)
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return self.head(h.float()).squeeze(-1)  # the head reads float32 features of a bf16 backbone

    @torch.no_grad()
    def score(self, prompts: list[Chat | str], completions: list[str], batch_size: int = 64) -> torch.Tensor:
        """float32 rewards, shape (len(prompts),), batched, no grad."""
        if len(prompts) != len(completions):
            raise ValueError(f"score: {len(prompts)} prompts but {len(completions)} completions")
        was_training = self.training
        self.eval()
        out = []
        try:
            for i in range(0, len(prompts), batch_size):
                x, m = self.encode(prompts[i: i + batch_size], completions[i: i + batch_size])
                out.append(self(x, m))
        finally:
            self.train(was_training)
        return torch.cat(out).cpu() if out else torch.zeros(0, dtype=torch.float32)

    # ---- trainable state ----
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The tensors a version stores: LoRA ("lora.<name>") and head ("head.<name>")."""
        if self.classifier:
            raise RewardModelError("a sequence-classification checkpoint reward model is fixed; it has no trainable state")
        state = {f"lora.{k}": v.detach().to("cpu", copy=True).contiguous()
                 for k, v in get_peft_model_state_dict(self.backbone).items()}
        state.update({f"head.{k}": v.detach().to("cpu", copy=True).contiguous() for k, v in self.head.state_dict().items()})
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor], source: str = "state") -> None:
        _check_finite(state, source)
        lora = {k[len("lora."):]: v for k, v in state.items() if k.startswith("lora.")}
        head = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
        expected = set(self.trainable_state())
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise RewardModelError(f"{source}: tensors do not match the reward model "
                                   f"(missing {missing[:3]}, unexpected {extra[:3]})")
        result = set_peft_model_state_dict(self.backbone, lora)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise RewardModelError(f"{source}: unexpected LoRA tensors {unexpected[:3]}")
        self.head.load_state_dict(head)

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
                "hidden_size": self.head.in_features, **(extra_config or {})}
        (out / CONFIG_FILE).write_text(json.dumps(conf, indent=2, sort_keys=True))
        return out


# ---------------------------------------------------------------------------------------------


def lora_settings(rc: RewardConfig, base: nn.Module) -> dict[str, Any]:
    """LoRA settings of a fresh reward model on ``base``, targets resolved: the config's lists, or
    the family's (``"auto"``, ``looprl.policy.families``). A version stores them as resolved."""
    targets = resolve_targets(base, rc.target_modules, rc.target_parameters, section="reward")
    return {"r": rc.lora_rank, "lora_alpha": rc.lora_alpha, **targets.as_config()}


def _attach_lora(base: nn.Module, settings: dict[str, Any]) -> nn.Module:
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
        return get_peft_model(base, lc)


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
    head_w = state.get("head.weight")
    if head_w is None or head_w.shape != (1, base.config.hidden_size):
        raise RewardModelError(f"{version_dir / WEIGHTS_FILE}: head.weight missing or not of shape "
                               f"(1, {base.config.hidden_size})")
    backbone = _attach_lora(base, settings)
    use_kernels(backbone, cfg)
    model = RewardModel(backbone, tok, nn.Linear(base.config.hidden_size, 1, device=placement.device),
                        version=version,
                        base_checksum=current_base, max_seq_len=max_seq_len, lora_settings=settings)
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
