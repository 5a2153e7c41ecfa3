"""The offline promotion gate: should a candidate adapter replace the promoted one?

Checks, cheapest first; the first group failing skips the evaluation (a NaN adapter cannot be
sampled from meaningfully):

1. the version opens (checksums) and was trained on the configured base;
2. its adapter config fits the serving tier (rank <= serving.max_lora_rank) and every target
   module / parameter exists in the base;
3. every weight is finite;
4. the candidate and the incumbent (the ``promoted`` pointer, or the bare base) each sample one
   completion per prompt slot, with the same random numbers, on two suites, scored by the reward
   model the gate is given (the newest one by default, `registry_scorer`):

   - *train forms*: prompts of the pool held out by hash (`prompts.is_heldout`): never trained on,
     but phrased like the training prompts (in distribution, unseen);
   - *held-out forms*: question forms training never samples: ``gate.heldout_suite_file``, else
     the base's shipped held-out prompts (`looprl.policy.model.heldout_prompts`), minus any that
     are training prompts of the pool. Of the shipped ones, those also held out by hash come last:
     they are the ones a final evaluation asks (the demo's eval users), which should not measure
     the gate's own selection.

   ``gate.heldout_prompts`` slots are split between them (``gate.heldout_forms_share`` to the
   held-out forms; a suite with no prompts gives its slots to the other). The candidate is rejected
   when

   - its win rate over *all* slots of both suites is not above ``gate.min_win_rate`` (the reward
     model prefers the candidate's answer; ties count half). The union keeps the check's sample
     count (and noise) as before the split; the two suites' own win rates are recorded;
   - its mean reward on the held-out forms is below the incumbent's by more than
     ``gate.max_heldout_regression`` standard deviations of the incumbent's rewards over all slots
     (a unit that means the same for any reward scale; the pooled std of both contenders if the
     incumbent's is 0), whatever it gains on training forms;
   - on either suite, its share of degenerate answers exceeds the incumbent's by more than
     ``gate.max_degenerate_increase``. Degenerate: empty or near-empty (fewer than
     ``gate.min_answer_tokens`` tokens, the end of turn not counted, or only whitespace), or
     repetitive (at least 4 tokens, of which fewer than ``gate.min_distinct_token_ratio`` of the
     length are distinct: "the dog the dog the dog" is, "the dog is old. the dog is big." is not);
   - its KL to the base, mean per completion over all slots, is not under ``gate.max_kl``.

   ``GateReport.numbers`` keeps the keys of the single-suite gate, computed over all slots
   (``win_rate``, ``kl_to_base``, ``candidate_reward_mean``, ``incumbent_reward_mean``,
   ``heldout_samples``, ...), and adds per suite (prefix ``train_forms_`` / ``heldout_forms_``):
   ``samples``, ``distinct_prompts``, ``win_rate``, ``candidate_reward_mean``,
   ``incumbent_reward_mean``, ``reward_gain`` (candidate - incumbent, reward-model units),
   ``reward_gain_std`` (the same in units of ``reward_std``), ``kl_to_base``,
   ``degenerate_share`` and ``incumbent_degenerate_share``, ``empty_share`` and
   ``repetitive_share`` (the candidate's), ``answer_tokens`` and ``incumbent_answer_tokens`` (mean
   tokens per answer, the end of turn not counted: a reward model that learnt a spurious length
   feature shows as a candidate whose answers grow or shrink against the incumbent's, ops/README.md);
   a suite without prompts has ``samples`` 0 only.

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
from looprl.ops.core.config import GateConfig, LooprlConfig
from looprl.ops.core.log import get_logger
from looprl.policy import metrics
from looprl.policy.forward import apply_kernels, policy_forward
from looprl.policy.model import base_checksum, check_memory, load_base, resolve_placement, stop_token_ids
from looprl.policy.model import heldout_prompts as shipped_heldout_prompts
from looprl.policy.prompts import build_pool, generator, heldout_prompts, is_heldout, read_prompt_file
from looprl.policy.rollout import Rollout, answer_tokens, degenerate_flags, sample
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


TRAIN_FORMS, HELDOUT_FORMS = "train_forms", "heldout_forms"
SUITE_LABELS = {TRAIN_FORMS: "train forms", HELDOUT_FORMS: "held-out forms"}


@dataclass
class Suites:
    """The gate's prompt slots: the train-forms suite's, then the held-out-forms suite's."""

    train_forms: list[Chat]
    heldout_forms: list[Chat]
    heldout_source: str  # "shipped", the suite file's path, or "off"

    @property
    def prompts(self) -> list[Chat]:
        return self.train_forms + self.heldout_forms

    def slices(self) -> dict[str, slice]:
        n = len(self.train_forms)
        return {TRAIN_FORMS: slice(0, n), HELDOUT_FORMS: slice(n, n + len(self.heldout_forms))}


def heldout_form_prompts(cfg: LooprlConfig, pool: list[Chat]) -> tuple[list[Chat], str]:
    """The held-out-forms suite, in the order slots take it, and where it came from."""
    training = {p for p in pool if not is_heldout(p)}
    path = cfg.gate.heldout_suite_file
    if path is not None:
        try:
            forms = read_prompt_file(path, field="gate.heldout_suite_file")
        except (OSError, ValueError) as e:
            raise GateError(str(e)) from None
        forms = [p for p in dict.fromkeys(forms) if p not in training]
        if not forms:
            raise GateError(f"gate.heldout_suite_file {path}: every prompt is also a training prompt "
                            "(in policy.prompts_file or recent traffic, not held out by hash)")
        return forms, str(path)
    forms = [Chat.user(p) for p in shipped_heldout_prompts()]
    random.Random(0).shuffle(forms)  # a fixed spread over templates and topics, not the file's first rows
    forms.sort(key=is_heldout)  # stable: the hash-held-out ones (kept for final evaluation) last
    return [p for p in dict.fromkeys(forms) if p not in training], "shipped"


def gate_suites(cfg: LooprlConfig) -> Suites:
    """Split gate.heldout_prompts slots between the two suites (cycling a suite's prompts when it
    has fewer than its slots)."""
    g = cfg.gate
    pool, _ = build_pool(cfg)
    forms, source = heldout_form_prompts(cfg, pool) if g.heldout_forms_share > 0 else ([], "off")
    form_set = set(forms)  # traffic can hold held-out forms (eval requests are logged): not train forms
    train = [p for p in heldout_prompts(pool, len(pool)) if p not in form_set]
    n = g.heldout_prompts
    if not train and not forms:
        raise GateError("no held-out prompts: add prompts (policy.prompts_file, gate.heldout_suite_file) "
                        "or traffic to the event log")
    if not train:
        k = n
    elif not forms or n < 2:
        k = 0
    else:
        k = min(max(round(n * g.heldout_forms_share), 1), n - 1)
    if forms and k == 0:
        log.warning("the gate's held-out-forms suite has no slots", heldout_prompts=n,
                    heldout_forms_share=g.heldout_forms_share)
    if g.heldout_forms_share > 0 and not forms:
        log.warning("no held-out-forms prompts outside the training pool: the gate checks train forms only")
    return Suites([train[i % len(train)] for i in range(n - k)] if train else [],
                  [forms[i % len(forms)] for i in range(k)], source)


@torch.no_grad()
def _kl_to_base(cfg: LooprlConfig, model, ro: Rollout) -> torch.Tensor:
    """Per-completion KL of the active adapter to the base on its own samples (as in training)."""
    p = cfg.policy
    sl = ro.response_labels_slice()
    logp = policy_forward(model, ro.input_ids, ro.attention_mask, cfg.kernels, p.temperature).logprobs[:, sl]
    with model.disable_adapter():
        ref = policy_forward(model, ro.input_ids, ro.attention_mask, cfg.kernels, p.temperature).logprobs[:, sl]
    return ((logp - ref) * ro.response_mask.to(logp.device)).sum(1).cpu()


def _share(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else 0.0


def decide(gate: GateConfig, numbers: dict, incumbent: str) -> list[str]:
    """The evaluation's rejection reasons (none: it passes), from the numbers `evaluate` records."""
    reasons = []
    win_rate, kl = numbers["win_rate"], numbers["kl_to_base"]
    if not math.isfinite(win_rate) or win_rate <= gate.min_win_rate:
        reasons.append(f"reward-model win rate {win_rate:.3f} vs {incumbent} (both suites) is not above "
                       f"gate.min_win_rate={gate.min_win_rate}")
    if numbers.get(f"{HELDOUT_FORMS}_samples"):
        gain, z = numbers[f"{HELDOUT_FORMS}_reward_gain"], numbers[f"{HELDOUT_FORMS}_reward_gain_std"]
        if not math.isfinite(z) or z < -gate.max_heldout_regression:
            train_gain = numbers.get(f"{TRAIN_FORMS}_reward_gain")
            on_train = f"; on train forms {train_gain:+.3f}" if train_gain is not None else ""
            reasons.append(f"held-out forms: mean reward {gain:+.3f} vs {incumbent} ({z:+.2f} incumbent reward std"
                           f"{on_train}) regresses beyond gate.max_heldout_regression={gate.max_heldout_regression} std")
    for suite, label in SUITE_LABELS.items():
        if not numbers.get(f"{suite}_samples"):
            continue
        cand, inc = numbers[f"{suite}_degenerate_share"], numbers[f"{suite}_incumbent_degenerate_share"]
        if cand - inc > gate.max_degenerate_increase:
            reasons.append(
                f"{label}: {cand:.0%} degenerate answers ({numbers[f'{suite}_empty_share']:.0%} empty or under "
                f"gate.min_answer_tokens={gate.min_answer_tokens} tokens, {numbers[f'{suite}_repetitive_share']:.0%} "
                f"repetitive) against {inc:.0%} of {incumbent}'s: up more than "
                f"gate.max_degenerate_increase={gate.max_degenerate_increase}")
    if not math.isfinite(kl) or kl >= gate.max_kl:
        reasons.append(f"KL to base {kl:.3f} nats is not under gate.max_kl={gate.max_kl}")
    return reasons


def _suite_numbers(suite: str, sl: slice, prompts: list[Chat], s_cand, s_inc, kl, flags_cand, flags_inc,
                   lengths: tuple[list[int], list[int]], unit: float) -> dict:
    c, i = s_cand[sl], s_inc[sl]
    if not len(c):
        return {f"{suite}_samples": 0}
    wins = (c > i).float() + 0.5 * (c == i).float()
    gain = float(c.mean() - i.mean())
    (short, rep), (short_i, rep_i) = ([f[sl] for f in flags] for flags in (flags_cand, flags_inc))
    len_c, len_i = (ls[sl] for ls in lengths)
    return {f"{suite}_{k}": v for k, v in dict(
        samples=len(c), distinct_prompts=len(set(prompts[sl])), win_rate=float(wins.mean()),
        candidate_reward_mean=float(c.mean()), incumbent_reward_mean=float(i.mean()), reward_gain=gain,
        reward_gain_std=gain / unit, kl_to_base=float(kl[sl].mean()),
        degenerate_share=_share([a or b for a, b in zip(short, rep)]),
        incumbent_degenerate_share=_share([a or b for a, b in zip(short_i, rep_i)]),
        empty_share=_share(short), repetitive_share=_share(rep),
        answer_tokens=sum(len_c) / len(len_c), incumbent_answer_tokens=sum(len_i) / len(len_i),
    ).items()}


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

    suites = gate_suites(cfg)  # before loading adapters: no prompts is an error, not a rejection
    if scorer is None:
        scorer = registry_scorer(cfg)
    incumbent = releases.promoted_version(reg)
    if incumbent == version:  # re-evaluating the promoted version itself: against the base
        incumbent = None
    model = PeftModel.from_pretrained(base, cand_dir, adapter_name="candidate", is_trainable=False)
    if incumbent is not None:
        _, inc_dir = reg.open(KIND, incumbent, base_checksum=checksum)
        model.load_adapter(str(inc_dir), adapter_name="incumbent", is_trainable=False)
    model.eval()
    apply_kernels(model, cfg.kernels)
    prompts, p = suites.prompts, cfg.policy
    stops = stop_token_ids(tok, model, cfg.model.stop_tokens)

    def draw():  # the same random numbers for every contender
        return sample(model, tok, prompts, p.max_new_tokens, p.temperature, generator(p.seed, "gate", "sample"),
                      p.max_prompt_tokens, stops)

    model.set_adapter("candidate")
    cand = draw()
    cand_kl = _kl_to_base(cfg, model, cand)
    if incumbent is not None:
        model.set_adapter("incumbent")
        inc = draw()
    else:
        with model.disable_adapter():  # no promoted adapter yet: the base model is the incumbent
            inc = draw()
    s_cand = scorer.score(prompts, cand.completions).float().cpu()
    s_inc = scorer.score(prompts, inc.completions).float().cpu()
    wins = (s_cand > s_inc).float() + 0.5 * (s_cand == s_inc).float()
    g = cfg.gate
    toks_cand, toks_inc = answer_tokens(cand, stops), answer_tokens(inc, stops)
    flags_cand, flags_inc = (degenerate_flags(toks, ro.completions, g.min_answer_tokens, g.min_distinct_token_ratio)
                             for toks, ro in ((toks_cand, cand), (toks_inc, inc)))
    lengths = ([len(t) for t in toks_cand], [len(t) for t in toks_inc])
    unit = float(s_inc.std(correction=0)) or float(torch.cat([s_cand, s_inc]).std(correction=0)) or 1.0
    numbers.update(
        win_rate=float(wins.mean()), min_win_rate=g.min_win_rate, kl_to_base=float(cand_kl.mean()), max_kl=g.max_kl,
        candidate_reward_mean=float(s_cand.mean()), incumbent_reward_mean=float(s_inc.mean()),
        incumbent=incumbent or BASE, reward_version=scorer.version, heldout_samples=len(prompts),
        heldout_distinct_prompts=len(set(prompts)), reward_std=unit, heldout_forms_source=suites.heldout_source,
        max_heldout_regression=g.max_heldout_regression, max_degenerate_increase=g.max_degenerate_increase,
        min_answer_tokens=g.min_answer_tokens,
    )
    for suite, sl in suites.slices().items():
        numbers.update(_suite_numbers(suite, sl, prompts, s_cand, s_inc, cand_kl, flags_cand, flags_inc, lengths, unit))
    reasons = decide(g, numbers, incumbent or BASE)
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

