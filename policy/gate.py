"""The offline promotion gate: should a candidate adapter replace the promoted one?

Checks, cheapest first; the first group failing skips the evaluation (a NaN adapter cannot be
sampled from meaningfully):

1. the version opens (checksums) and was trained on the configured base;
2. its adapter config fits the serving tier (rank <= serving.max_lora_rank) and every target
   module / parameter exists in the base;
3. every weight is finite;
4. on held-out prompts (never trained on, see `prompts.is_heldout`) the candidate and the
   incumbent (the ``promoted`` pointer, or the bare base) each sample one completion per prompt
   slot with the same random numbers; the reward model prefers the candidate's more often than
   ``gate.min_win_rate`` (ties count half), and its KL to the base stays under ``gate.max_kl``.

Every decision is recorded with its numbers in the manifest (through the release contract,
`looprl.storage.releases`, which refuses to re-gate a version that already reached users) and in
``<state_dir>/gate/decisions.jsonl``. Only versions that passed the gate can reach users.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from peft import PeftModel
from safetensors import safe_open

from looprl.ops.core.chat import Chat
from looprl.ops.core.config import LooprlConfig
from looprl.ops.core.log import get_logger
from looprl.policy import metrics
from looprl.policy.forward import apply_kernels, policy_forward
from looprl.policy.model import base_checksum, check_memory, load_base, resolve_placement, stop_token_ids
from looprl.policy.model import heldout_prompts as shipped_heldout_prompts
from looprl.policy.prompts import build_pool, generator, heldout_prompts
from looprl.policy.rollout import Rollout, sample
from looprl.policy.scoring import registry_scorer
from looprl.storage import releases
from looprl.storage.registry import Registry, RegistryError
from looprl.storage.releases import BASE, KIND

log = get_logger(__name__)


class GateError(RuntimeError):
    """The gate cannot judge (e.g. no held-out prompts); the message says why."""


@dataclass
class GateReport:
    version: str
    decision: str  # "gated" | "rejected"
    reasons: list[str] = field(default_factory=list)
    numbers: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.decision == "gated"

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons) if self.reasons else "passed all checks"


# ---------------------------------------------------------------------------------------------
# static checks


def check_adapter_config(cfg: LooprlConfig, adapter_dir: Path, base_model: torch.nn.Module) -> tuple[list[str], dict]:
    """Serving limits and target existence, from adapter_config.json alone."""
    path = adapter_dir / "adapter_config.json"
    try:
        acfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return [f"adapter_config.json unreadable: {e}"], {}
    ranks = [int(acfg.get("r", 0))] + [int(v) for v in (acfg.get("rank_pattern") or {}).values()]
    rank = max(ranks)
    numbers = {"lora_rank": rank, "max_lora_rank": cfg.serving.max_lora_rank}
    reasons = []
    if rank > cfg.serving.max_lora_rank:
        reasons.append(f"LoRA rank {rank} exceeds serving.max_lora_rank={cfg.serving.max_lora_rank}")
    if rank < 1:
        reasons.append(f"adapter_config.json: invalid rank r={acfg.get('r')}")
    modules = acfg.get("target_modules") or []
    if isinstance(modules, str):  # a regex in peft's format: must match something
        missing_m = [] if any(re.fullmatch(modules, n) for n, _ in base_model.named_modules()) else [modules]
    else:
        names = {n.rsplit(".", 1)[-1] for n, _ in base_model.named_modules()}
        missing_m = [m for m in modules if m not in names]
    params = acfg.get("target_parameters") or []
    missing_p = [t for t in params if not any(n.endswith(t) for n, _ in base_model.named_parameters())]
    if missing_m or missing_p:
        reasons.append(f"target modules/parameters not in the base model: {missing_m + missing_p}")
    return reasons, numbers


def nonfinite_tensors(adapter_dir: Path) -> list[str]:
    bad = []
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
        for name in f.keys():
            if not torch.isfinite(f.get_tensor(name)).all():
                bad.append(name)
    return bad


# ---------------------------------------------------------------------------------------------
# evaluation


def _gate_prompts(cfg: LooprlConfig) -> list[Chat]:
    """Held-out traffic prompts (hash split) first, then the base's shipped held-out prompts."""
    pool, _ = build_pool(cfg)
    held = heldout_prompts(pool, cfg.gate.heldout_prompts)
    seen = set(held)
    shipped = [Chat.user(p) for p in shipped_heldout_prompts()]
    random.Random(0).shuffle(shipped)  # a fixed spread over templates and topics, not the file's first rows
    for p in shipped:
        if len(held) >= cfg.gate.heldout_prompts:
            break
        if p not in seen:
            seen.add(p)
            held.append(p)
    if not held:
        raise GateError("no held-out prompts: add prompts (policy.prompts_file) or traffic to the event log")
    n = cfg.gate.heldout_prompts  # cycle: several samples per prompt when the held-out set is small
    return [held[i % len(held)] for i in range(n)]


@torch.no_grad()
def _sample_and_kl(cfg: LooprlConfig, model, tok, prompts: list[Chat], seed_tag: str) -> tuple[Rollout, torch.Tensor]:
    """Completions of the active adapter (same random numbers for every contender) and their KL to the base."""
    p = cfg.policy
    ro = sample(model, tok, prompts, p.max_new_tokens, p.temperature, generator(p.seed, "gate", seed_tag),
                p.max_prompt_tokens, stop_token_ids(tok, model, cfg.model.stop_tokens))
    sl = ro.response_labels_slice()
    logp = policy_forward(model, ro.input_ids, ro.attention_mask, cfg.kernels, p.temperature).logprobs[:, sl]
    with model.disable_adapter():
        ref = policy_forward(model, ro.input_ids, ro.attention_mask, cfg.kernels, p.temperature).logprobs[:, sl]
    kl = ((logp - ref) * ro.response_mask.to(logp.device)).sum(1).cpu()
    return ro, kl


def evaluate(cfg: LooprlConfig, version: str, scorer=None) -> GateReport:
    """Run every check on `version` without recording anything."""
    reg = Registry(cfg.registry_dir)
    checksum = base_checksum(cfg.base_path)
    try:
        manifest, cand_dir = reg.open(KIND, version, base_checksum=checksum)
    except RegistryError as e:
        return GateReport(version, "rejected", [f"registry: {e}"])

    placement = resolve_placement(cfg.model)
    # before loading anything: a gate that cannot fit is a configuration error, not a rejection
    check_memory(cfg, "gate", placement,
                 reward_copies=1 if scorer is None else int(getattr(scorer, "loads_reward_model", False)))
    base, tok = load_base(cfg.base_path, device=placement.device, dtype=placement.dtype)
    reasons, numbers = check_adapter_config(cfg, cand_dir, base)
    bad = nonfinite_tensors(cand_dir)
    if bad:
        reasons.append(f"non-finite weights in adapter_model.safetensors: {bad[:4]}{' ...' if len(bad) > 4 else ''}")
    numbers["nonfinite_tensors"] = len(bad)
    if reasons:
        return GateReport(version, "rejected", reasons, numbers)

    if scorer is None:
        scorer = registry_scorer(cfg)
    incumbent = releases.promoted_version(reg)
    model = PeftModel.from_pretrained(base, cand_dir, adapter_name="candidate", is_trainable=False)
    if incumbent is not None and incumbent != version:
        _, inc_dir = reg.open(KIND, incumbent, base_checksum=checksum)
        model.load_adapter(str(inc_dir), adapter_name="incumbent", is_trainable=False)
    model.eval()
    apply_kernels(model, cfg.kernels)
    prompts = _gate_prompts(cfg)

    model.set_adapter("candidate")
    cand, cand_kl = _sample_and_kl(cfg, model, tok, prompts, "sample")
    if incumbent is not None and incumbent != version:
        model.set_adapter("incumbent")
        inc, _ = _sample_and_kl(cfg, model, tok, prompts, "sample")
    else:
        with model.disable_adapter():  # no promoted adapter yet: the base model is the incumbent
            p = cfg.policy
            inc = sample(model, tok, prompts, p.max_new_tokens, p.temperature, generator(p.seed, "gate", "sample"),
                         p.max_prompt_tokens, stop_token_ids(tok, model, cfg.model.stop_tokens))
    s_cand = scorer.score(prompts, cand.completions).float()
    s_inc = scorer.score(prompts, inc.completions).float()
    wins = (s_cand > s_inc).float() + 0.5 * (s_cand == s_inc).float()
    win_rate, kl = float(wins.mean()), float(cand_kl.mean())
    numbers.update(
        win_rate=win_rate, min_win_rate=cfg.gate.min_win_rate, kl_to_base=kl, max_kl=cfg.gate.max_kl,
        candidate_reward_mean=float(s_cand.mean()), incumbent_reward_mean=float(s_inc.mean()),
        incumbent=incumbent or BASE, reward_version=scorer.version, heldout_samples=len(prompts),
        heldout_distinct_prompts=len(set(prompts)),
    )
    if not math.isfinite(win_rate) or win_rate <= cfg.gate.min_win_rate:
        reasons.append(f"reward-model win rate {win_rate:.3f} vs {incumbent or BASE} is not above "
                       f"gate.min_win_rate={cfg.gate.min_win_rate}")
    if not math.isfinite(kl) or kl >= cfg.gate.max_kl:
        reasons.append(f"KL to base {kl:.3f} nats is not under gate.max_kl={cfg.gate.max_kl}")
    return GateReport(version, "rejected" if reasons else "gated", reasons, numbers)


def run_gate(cfg: LooprlConfig, version: str, scorer=None) -> GateReport:
    """Evaluate `version` and record the decision (manifest status + decisions.jsonl + metric)."""
    reg = Registry(cfg.registry_dir)
    releases.require(reg, version, "gated")  # refuse before the evaluation: a missing version, one that reached users
    report = evaluate(cfg, version, scorer)
    releases.record_gate(reg, version, report.decision, report.reason, report.numbers)
    record = {"at": datetime.now(timezone.utc).isoformat(), **asdict(report), "reason": report.reason}
    path = cfg.state_dir / "gate" / "decisions.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
    metrics.GATE.labels(decision=report.decision).inc()
    log.info("gate decision", version=version, decision=report.decision, reason=report.reason, **report.numbers)
    return report

