"""Canary statistics (Beta-Binomial sequential test) and the canary state machine on a real registry."""

from __future__ import annotations

import json
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from looprl.ops.canary import Arm, CanaryManager, decide, prob_better
from looprl.ops.core.config import CanaryConfig, load_config
from looprl.storage.registry import Registry, RegistryError
from looprl.storage import releases


def mc_prob_better(c: Arm, k: Arm, n: int = 200_000, seed: int = 0) -> float:
    torch.manual_seed(seed)
    pc = torch.distributions.Beta(torch.tensor(1.0 + c.ups), torch.tensor(1.0 + c.n - c.ups)).sample((n,))
    pk = torch.distributions.Beta(torch.tensor(1.0 + k.ups), torch.tensor(1.0 + k.n - k.ups)).sample((n,))
    return (pc > pk).float().mean().item()


@pytest.mark.parametrize("c,k", [(Arm(30, 50), Arm(20, 50)), (Arm(5, 60), Arm(25, 60)), (Arm(0, 0), Arm(0, 0)),
                                 (Arm(120, 400), Arm(118, 400)), (Arm(3, 3), Arm(0, 10))])
def test_prob_better_matches_monte_carlo(c, k):
    assert prob_better(c, k) == pytest.approx(mc_prob_better(c, k), abs=0.01)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 300), st.integers(0, 300), st.integers(0, 300), st.integers(0, 300))
def test_prob_better_is_a_probability_and_antisymmetric(a, b, c, d):
    cand, ctrl = Arm(min(a, b), max(a, b)), Arm(min(c, d), max(c, d))
    p, q = prob_better(cand, ctrl), prob_better(ctrl, cand)
    assert 0.0 <= p <= 1.0
    assert p + q == pytest.approx(1.0, abs=1e-6)  # ties have probability zero


def test_more_successes_never_lower_the_probability():
    ps = [prob_better(Arm(u, 80), Arm(30, 80)) for u in range(0, 81, 5)]
    assert all(b >= a for a, b in zip(ps, ps[1:])) and ps[0] < 0.01 and ps[-1] > 0.99


def test_bad_counts_are_refused():
    with pytest.raises(ValueError, match="ups=5 n=3"):
        Arm(5, 3)


CFG = CanaryConfig(min_samples=40, promote_probability=0.9, rollback_probability=0.99, max_samples=300)


def test_decide_waits_for_the_minimum_sample():
    d = decide(Arm(39, 39), Arm(0, 100), CFG)  # overwhelming, but too few votes
    assert d.action == "wait" and d.numbers["candidate_n"] == 39


def test_decide_promotes_a_clear_improvement_and_rolls_back_a_regression():
    assert decide(Arm(30, 50), Arm(15, 50), CFG).action == "promote"
    d = decide(Arm(8, 50), Arm(25, 50), CFG)
    assert d.action == "rollback" and d.numbers["prob_better"] < 0.01 and "regression" in d.reason


def test_decide_is_inconclusive_on_equal_rates_until_max_samples():
    assert decide(Arm(25, 50), Arm(25, 50), CFG).action == "wait"
    # a guardrail canary: no significant regression in max_samples votes -> promote
    assert decide(Arm(150, 300), Arm(149, 300), CFG).action == "promote"
    assert decide(Arm(140, 300), Arm(150, 300), CFG).action == "promote"
    strict = CFG.model_copy(update={"promote_on_no_regression": False})
    assert decide(Arm(150, 300), Arm(149, 300), strict).action == "promote"
    assert decide(Arm(140, 300), Arm(150, 300), strict).action == "rollback"
    # a significant regression is rolled back even at max_samples
    assert decide(Arm(110, 300), Arm(150, 300), CFG).action == "rollback"


def test_a_lean_is_needed_at_max_samples_when_configured():
    """max_samples_promote_probability: at max_samples a candidate the users liked more by a hair
    (P(better) 0.53) is rolled back and the incumbent serves on; a clear lean (0.77) still promotes,
    and the guardrail canary ignores the setting."""
    lean = CFG.model_copy(update={"promote_on_no_regression": False, "max_samples_promote_probability": 0.65})
    hair, clear = (Arm(150, 300), Arm(149, 300)), (Arm(158, 300), Arm(149, 300))
    d = decide(*hair, lean)
    assert d.action == "rollback" and 0.5 < d.numbers["prob_better"] < 0.65
    assert "canary.max_samples_promote_probability=0.65" in d.reason
    assert decide(*clear, lean).action == "promote"
    assert decide(*hair, lean.model_copy(update={"max_samples_promote_probability": 0.5})).action == "promote"
    assert decide(*hair, lean.model_copy(update={"promote_on_no_regression": True})).action == "promote"
    # below max_samples the setting changes nothing: the test waits
    assert decide(Arm(75, 150), Arm(74, 150), lean).action == "wait"
    with pytest.raises(ValueError):
        CanaryConfig(max_samples_promote_probability=0.4)


def test_max_samples_counts_on_the_smaller_arm():
    # A 10 % canary: the control arm fills nine times faster. The candidate's 100 votes are a third
    # of max_samples, so the test goes on, though the control has ten times max_samples.
    d = decide(Arm(60, 100), Arm(1800, 3000), CFG)
    assert d.action == "wait" and "inconclusive" in d.reason
    assert decide(Arm(180, 300), Arm(1800, 3000), CFG).action == "promote"


def test_sequential_test_error_rates_by_simulation():
    """Looking after every batch of votes: a truly worse candidate is rolled back far more often
    than it is promoted, and an equal one is rarely rolled back."""
    rng = random.Random(0)

    def run(p_cand: float, p_ctrl: float) -> str:
        c = k = Arm(0, 0)
        while True:
            cu = sum(rng.random() < p_cand for _ in range(10))
            ku = sum(rng.random() < p_ctrl for _ in range(10))
            c, k = Arm(c.ups + cu, c.n + 10), Arm(k.ups + ku, k.n + 10)
            d = decide(c, k, CFG)
            if d.action != "wait":
                return d.action

    worse = [run(0.2, 0.4) for _ in range(100)]
    assert worse.count("rollback") >= 95
    same = [run(0.3, 0.3) for _ in range(100)]
    assert same.count("rollback") <= 15  # false alarms on an equal candidate are rare
    better = [run(0.45, 0.3) for _ in range(100)]
    assert better.count("promote") >= 98


# --------------------------------------------------------------------------- the state machine
def publish(reg: Registry, tmp_path, status: str) -> str:
    src = tmp_path / f"src-{random.random()}"
    src.mkdir()
    save_file({"w": torch.zeros(2)}, str(src / "adapter_model.safetensors"))
    (src / "adapter_config.json").write_text("{}")
    m = reg.publish("policy", src, base_checksum="b" * 64, status="candidate")
    if status != "candidate":
        reg.set_status("policy", m.version, status, f"test: {status}")
    return m.version


class FakeCounts:
    def __init__(self):
        self.by_version: dict[str, Arm] = {}
        self.calls = []

    def __call__(self, versions, since):
        self.calls.append((list(versions), since))
        return {v: self.by_version[v] for v in versions if v in self.by_version}


@pytest.fixture
def manager(tmp_path):
    cfg = load_config(environ={}, workspace=tmp_path / "ws",
                      canary={"min_samples": 20, "max_samples": 200, "traffic_share": 0.3})
    counts = FakeCounts()
    return CanaryManager(cfg, counts=counts), counts, Registry(cfg.registry_dir)


def test_gated_candidate_enters_canary_against_the_base(manager, tmp_path):
    mgr, counts, reg = manager
    publish(reg, tmp_path, "rejected")
    v2 = publish(reg, tmp_path, "gated")
    assert mgr.step() is None
    assert reg.pointer("policy", "canary") == v2 and reg.pointer("policy", "promoted") is None
    m = reg.manifest("policy", v2)
    assert m.status == "canary" and m.history[-1].numbers == {"control": "base", "traffic_share": 0.3}
    [start] = mgr.decisions()
    assert start["action"] == "start" and start["version"] == v2 and start["control"] == "base"


def test_worse_canary_is_rolled_back_with_its_numbers(manager, tmp_path):
    mgr, counts, reg = manager
    v1 = publish(reg, tmp_path, "gated")
    mgr.step()
    counts.by_version = {v1: Arm(3, 30), "base": Arm(15, 30)}
    d = mgr.step()
    assert d.action == "rollback"
    assert counts.calls[-1][0] == [v1, "base"]
    assert reg.pointer("policy", "canary") is None and reg.pointer("policy", "promoted") is None
    m = reg.manifest("policy", v1)
    assert m.status == "rolled_back" and m.history[-1].numbers["candidate_ups"] == 3
    last = mgr.decisions()[-1]
    assert last["action"] == "rollback" and last["numbers"]["control_n"] == 30
    # a rolled-back version never re-enters the canary
    mgr.step()
    assert reg.pointer("policy", "canary") is None


def test_better_canary_is_promoted_and_becomes_the_next_control(manager, tmp_path):
    mgr, counts, reg = manager
    v1 = publish(reg, tmp_path, "gated")
    mgr.step()
    counts.by_version = {v1: Arm(20, 30), "base": Arm(6, 30)}
    assert mgr.step().action == "promote"
    assert reg.pointer("policy", "promoted") == v1 and reg.pointer("policy", "canary") is None
    assert reg.manifest("policy", v1).status == "promoted"
    v2 = publish(reg, tmp_path, "gated")
    mgr.step()
    assert reg.pointer("policy", "canary") == v2
    assert reg.manifest("policy", v2).history[-1].numbers["control"] == v1


def test_waits_while_inconclusive(manager, tmp_path):
    mgr, counts, reg = manager
    v1 = publish(reg, tmp_path, "gated")
    mgr.step()
    counts.by_version = {v1: Arm(10, 25), "base": Arm(10, 25)}
    assert mgr.step().action == "wait"
    assert reg.pointer("policy", "canary") == v1


def test_older_gated_versions_than_the_promoted_one_are_ignored(manager, tmp_path):
    mgr, counts, reg = manager
    publish(reg, tmp_path, "gated")
    v2 = publish(reg, tmp_path, "gated")
    mgr.manual_promote(v2, by="test")
    mgr.step()
    assert reg.pointer("policy", "canary") is None


def test_a_candidate_gated_against_a_replaced_incumbent_waits_for_its_re_gating(manager, tmp_path):
    """Runs that went on during a canary were gated against (and trained from) the version that
    canary replaced: the next canary takes the newest candidate gated against the new one."""
    mgr, counts, reg = manager
    v1 = publish(reg, tmp_path, "candidate")
    releases.record_gate(reg, v1, "gated", "test", {"incumbent": "base"})
    mgr.step()
    v2, v3, v4 = (publish(reg, tmp_path, "candidate") for _ in range(3))
    for v in (v2, v3, v4):  # gated while v1 was on canary, against the base
        releases.record_gate(reg, v, "gated", "test", {"incumbent": "base"})
    counts.by_version = {v1: Arm(20, 30), "base": Arm(6, 30)}
    assert mgr.step().action == "promote"
    releases.record_gate(reg, v2, "gated", "test: re-gated", {"incumbent": v1})
    mgr.step()
    assert reg.pointer("policy", "canary") == v2  # not the newer v3 and v4, judged against the base
    assert releases.gated_against(reg.manifest("policy", v4)) == "base"
    assert releases.gated_against(reg.manifest("policy", v2)) == v1


def test_a_stale_candidate_alone_starts_no_canary(manager, tmp_path):
    mgr, counts, reg = manager
    v1 = publish(reg, tmp_path, "gated")
    mgr.manual_promote(v1, by="test")
    v2 = publish(reg, tmp_path, "candidate")
    releases.record_gate(reg, v2, "gated", "test", {"incumbent": "base"})
    mgr.step()
    assert reg.pointer("policy", "canary") is None
    releases.record_gate(reg, v2, "gated", "test: re-gated", {"incumbent": v1})
    mgr.step()
    assert reg.pointer("policy", "canary") == v2


def test_manual_rollback_restores_the_previous_promoted_version(manager, tmp_path):
    mgr, counts, reg = manager
    v1, v2 = publish(reg, tmp_path, "gated"), publish(reg, tmp_path, "gated")
    mgr.manual_promote(v1)
    mgr.manual_promote(v2)
    msg = mgr.manual_rollback(by="alice")
    assert reg.pointer("policy", "promoted") == v1 and v1 in msg
    assert reg.manifest("policy", v2).status == "rolled_back"
    mgr.manual_rollback()
    assert reg.pointer("policy", "promoted") is None
    with pytest.raises(RegistryError, match="nothing to roll back"):
        mgr.manual_rollback()
    actions = [d["action"] for d in mgr.decisions()]
    assert actions == ["manual_promote", "manual_promote", "manual_rollback", "manual_rollback"]


@pytest.mark.parametrize("status", ["candidate", "rejected"])
def test_manual_promote_refuses_versions_that_did_not_pass_the_gate(manager, tmp_path, status):
    mgr, counts, reg = manager
    v1 = publish(reg, tmp_path, status)
    with pytest.raises(RegistryError, match=f"is {status}: only versions that passed the gate"):
        mgr.manual_promote(v1)
    assert reg.pointer("policy", "promoted") is None and reg.manifest("policy", v1).status == status


def test_manual_promote_refuses_a_corrupted_adapter(manager, tmp_path):
    mgr, counts, reg = manager
    v1 = publish(reg, tmp_path, "gated")
    (reg.version_dir("policy", v1) / "adapter_config.json").write_text('{"tampered": true}')
    with pytest.raises(RegistryError, match="checksum mismatch for adapter_config.json"):
        mgr.manual_promote(v1)
    assert reg.pointer("policy", "promoted") is None


def test_decisions_log_is_jsonl(manager, tmp_path):
    mgr, counts, reg = manager
    publish(reg, tmp_path, "gated")
    mgr.step()
    lines = mgr.log_path.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["action"] == "start"


def test_the_test_looks_once_per_ten_new_votes(manager, tmp_path):
    """Each look is a chance of a false alarm: looks are tied to new evidence, not to polls."""
    mgr, counts, reg = manager
    v1 = publish(reg, tmp_path, "gated")
    mgr.step()
    counts.by_version = {v1: Arm(10, 20), "base": Arm(10, 20)}
    assert mgr.step().action == "wait"  # first look
    counts.by_version = {v1: Arm(10, 24), "base": Arm(20, 24)}
    d = mgr.step()
    assert d.action == "wait" and "next look at 50" in d.reason  # only 8 new votes: no look
    assert reg.pointer("policy", "canary") == v1
    counts.by_version = {v1: Arm(10, 30), "base": Arm(25, 30)}
    assert mgr.step().action == "rollback"
