"""The gate's generalisation guard: the candidate is judged on two suites, held-out prompts of the
training forms and question forms training never samples. A candidate that gains on the training
forms but answers the held-out forms with empty answers, or regresses there beyond the margin, is
rejected with a reason naming the held-out suite; the report carries both suites' numbers."""

import json

import pytest
import torch
from peft import PeftModel

from fixtures_policy import trained_registry_copy
from looprl.ops.core.chat import Chat
from looprl.ops.core.config import load_config
from looprl.ops.sim.scoring import CheerfulScorer
from looprl.policy.forward import position_ids_for
from looprl.policy.gate import (HELDOUT_FORMS, TRAIN_FORMS, GateError, decide, evaluate,
                                gate_suites)
from looprl.policy.lora import save_adapter
from looprl.policy.model import base_checksum, end_of_turn_id, heldout_prompts, load_base, shipped_prompts
from looprl.policy.prompts import is_heldout
from looprl.policy.rollout import degenerate_flags, encode_prompts
from looprl.storage.registry import Registry

torch.set_num_threads(1)  # 2 threads on busy shared cores spin and crawl

HELDOUT_FORMS_SET = {Chat.user(p) for p in heldout_prompts()}


class FormScorer:
    """A preference that depends on the question's form: users asking the training forms like
    cheerful words, users asking the held-out forms dislike them."""

    version = "programmatic:cheerful-by-form"

    def score(self, prompts, completions):
        sign = torch.tensor([-1.0 if Chat.parse(p) in HELDOUT_FORMS_SET else 1.0 for p in prompts])
        return CheerfulScorer().score(prompts, completions) * sign


@pytest.fixture(scope="module")
def guard_env(tmp_path_factory, ppo_trained):
    """A workspace whose registry holds the session's cheerful-trained candidate (a copy: tests publish)."""
    return trained_registry_copy(tmp_path_factory, ppo_trained, "gate-guard", gate=dict(heldout_prompts=32))


def _mute_on_heldout_forms(cfg, version: str, out, steps: int = 20, lr: float = 3e-3):
    """The trained adapter, fine-tuned to end its turn at once on the held-out forms' prompts and not
    on the training forms': still better on training forms, empty answers on the others. 20 steps:
    after 10 the muting still spilled onto 6-21% of the training forms' answers on some bases."""
    base, tok = load_base(cfg.base_path)
    model = PeftModel.from_pretrained(base, Registry(cfg.registry_dir).version_dir("policy", version),
                                      is_trainable=True)
    held, train = [Chat.user(p) for p in heldout_prompts()], [Chat.user(p) for p in shipped_prompts()]
    ids, mask = encode_prompts(tok, held + train, cfg.policy.max_prompt_tokens)
    ends = torch.tensor([1.0] * len(held) + [0.0] * len(train))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_for(mask), logits_to_keep=1).logits
        logp_end = torch.log_softmax(logits[:, -1].float(), -1)[:, end_of_turn_id(tok)]
        loss = -(ends * logp_end + (1 - ends) * torch.log1p(-logp_end.exp().clamp(max=1 - 1e-6))).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_adapter(model, out)
    return Registry(cfg.registry_dir).publish("policy", out, base_checksum=base_checksum(cfg.base_path),
                                              reason="muted on held-out forms").version


def test_empty_answers_on_heldout_forms_are_rejected_despite_training_form_gains(guard_env, tmp_path):
    cfg, trained = guard_env
    v = _mute_on_heldout_forms(cfg, trained, tmp_path / "muted")
    report = evaluate(cfg, v, CheerfulScorer())
    n = report.numbers
    assert report.decision == "rejected"
    # better on the training forms, by the win-rate rule itself: it is the held-out suite that rejects
    assert n["train_forms_win_rate"] > cfg.gate.min_win_rate and n["train_forms_reward_gain"] > 0, n
    assert not any(r.startswith("train forms") for r in report.reasons), report.reasons
    assert n["heldout_forms_empty_share"] >= 0.5 and n["heldout_forms_incumbent_degenerate_share"] <= 0.1, n
    assert n["train_forms_degenerate_share"] <= cfg.gate.max_degenerate_increase, n
    # the mean answer lengths show where the answers shrank
    assert n["heldout_forms_answer_tokens"] < n["heldout_forms_incumbent_answer_tokens"] / 2, n
    assert n["train_forms_answer_tokens"] > n["heldout_forms_answer_tokens"] + 2, n
    assert any(r.startswith("held-out forms:") and "degenerate" in r and "gate.max_degenerate_increase" in r
               for r in report.reasons), report.reasons


def test_regression_on_heldout_forms_beyond_the_margin_is_rejected(guard_env):
    cfg, trained = guard_env
    report = evaluate(cfg, trained, FormScorer())
    n = report.numbers
    # both suites' numbers, each over its own half of the slots; the old keys cover all slots
    assert n["train_forms_samples"] == n["heldout_forms_samples"] == 16 and n["heldout_samples"] == 32
    assert n["heldout_forms_source"] == "shipped" and n["incumbent"] == "base"
    assert n["win_rate"] == pytest.approx((n["train_forms_win_rate"] + n["heldout_forms_win_rate"]) / 2)
    for suite in (TRAIN_FORMS, HELDOUT_FORMS):
        assert n[f"{suite}_reward_gain"] == pytest.approx(
            n[f"{suite}_candidate_reward_mean"] - n[f"{suite}_incumbent_reward_mean"])
        assert n[f"{suite}_kl_to_base"] > 0 and n[f"{suite}_degenerate_share"] <= 0.1
    assert n["train_forms_reward_gain"] > 0 > n["heldout_forms_reward_gain"], n
    z = n["heldout_forms_reward_gain_std"]
    assert z == pytest.approx(n["heldout_forms_reward_gain"] / n["reward_std"]) and z < -cfg.gate.max_heldout_regression
    assert report.decision == "rejected"
    assert any(r.startswith("held-out forms: mean reward") for r in report.reasons), report.reasons

    # the same measured regression against a wider margin is not a reason, a narrower one is
    def heldout_reasons(margin):
        gate = cfg.gate.model_copy(update={"max_heldout_regression": margin})
        return [r for r in decide(gate, n, "base") if "gate.max_heldout_regression" in r]

    assert heldout_reasons(-z * 1.1) == [] and len(heldout_reasons(-z * 0.9)) == 1


def _numbers(win_rate=0.7, z=0.0, deg=(0.0, 0.0), inc_deg=(0.0, 0.0)) -> dict:
    n = {"win_rate": win_rate, "kl_to_base": 1.0}
    for (suite, d), i in zip(zip((TRAIN_FORMS, HELDOUT_FORMS), deg), inc_deg):
        n.update({f"{suite}_samples": 12, f"{suite}_reward_gain": z * 2, f"{suite}_reward_gain_std": z,
                  f"{suite}_degenerate_share": d, f"{suite}_incumbent_degenerate_share": i,
                  f"{suite}_empty_share": d, f"{suite}_repetitive_share": 0.0})
    n[f"{TRAIN_FORMS}_reward_gain"] = 1.0
    return n


def test_decide_margins_and_degenerate_increase():
    gate = load_config(environ={}).gate
    assert decide(gate, _numbers(z=-0.1), "v3") == []  # a small held-out regression passes
    [r] = decide(gate, _numbers(z=-0.5), "v3")
    assert r.startswith("held-out forms:") and "vs v3" in r and "on train forms +1.000" in r
    assert decide(gate, _numbers(deg=(0.15, 0.0), inc_deg=(0.1, 0.0)), "v3") == []  # +0.05: within 0.1
    [r] = decide(gate, _numbers(deg=(0.3, 0.0)), "v3")
    assert r.startswith("train forms:") and "30% degenerate" in r
    n = _numbers()
    n["heldout_forms_samples"] = 0  # no held-out-forms prompts: nothing to judge there
    n["heldout_forms_reward_gain_std"] = float("nan")
    assert decide(gate, n, "base") == []


def test_degenerate_flags():
    toks = [[], [7], [1, 2], [3, 3, 3, 3], [1, 2, 1, 2, 1, 2],
            [1, 2, 3, 4, 5, 1, 2, 3, 6, 5]]  # "the dog is old . the dog is big ." is fine
    texts = ["", "a", "  ", "x", "y", "z"]
    short, rep = degenerate_flags(toks, texts, min_answer_tokens=2, min_distinct_token_ratio=0.5)
    assert short == [True, True, True, False, False, False]  # whitespace only counts as empty
    assert rep == [False, False, False, True, True, False]


def test_suites_split_slots_and_keep_forms_apart(tmp_path):
    cfg = load_config(environ={}, workspace=tmp_path / "ws", gate=dict(heldout_prompts=24))
    s = gate_suites(cfg)
    assert len(s.train_forms) == len(s.heldout_forms) == 12 and s.heldout_source == "shipped"
    assert all(is_heldout(p) and p not in HELDOUT_FORMS_SET for p in s.train_forms)
    assert set(s.heldout_forms) <= HELDOUT_FORMS_SET and len(set(s.heldout_forms)) == 12
    # the held-out forms the hash also holds out are kept for final evaluation (the demo's eval users)
    assert not any(is_heldout(p) for p in s.heldout_forms)
    assert s.prompts == s.train_forms + s.heldout_forms
    off = gate_suites(cfg.model_copy(update={"gate": cfg.gate.model_copy(update={"heldout_forms_share": 0.0})}))
    assert off.heldout_forms == [] and len(off.train_forms) == 24


def test_suite_file_minus_training_prompts(tmp_path):
    forms = heldout_prompts()
    trained = next(p for p in forms if not is_heldout(p))  # a held-out form the product trains on
    (tmp_path / "train.txt").write_text("\n".join(shipped_prompts()[:40] + [trained]) + "\n")
    suite = tmp_path / "suite.jsonl"
    rows = [{"prompt": trained}, {"prompt": "which way to the harbour"},
            {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "name the river"}]}]
    suite.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = load_config(environ={}, workspace=tmp_path / "ws", policy=dict(prompts_file=str(tmp_path / "train.txt")),
                      gate=dict(heldout_prompts=8, heldout_suite_file=str(suite)))
    s = gate_suites(cfg)
    assert s.heldout_source == str(suite) and len(s.heldout_forms) == 4
    assert Chat.user(trained) not in s.heldout_forms  # trained on: not a held-out form here
    assert {p.last_user() for p in s.heldout_forms} == {"which way to the harbour", "name the river"}

    suite.write_text(json.dumps({"prompt": trained}) + "\n")
    with pytest.raises(GateError, match="gate.heldout_suite_file .*every prompt is also a training prompt"):
        gate_suites(cfg)
    suite.write_text("{not json\n")
    with pytest.raises(GateError, match=r"gate.heldout_suite_file .*suite.jsonl:1"):
        gate_suites(cfg)
    missing = cfg.model_copy(update={"gate": cfg.gate.model_copy(update={"heldout_suite_file": tmp_path / "no"})})
    with pytest.raises(GateError, match="gate.heldout_suite_file .* does not exist"):
        gate_suites(missing)
