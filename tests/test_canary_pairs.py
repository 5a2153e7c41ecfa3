"""Paired canary votes: a user's choice between the two arms' answers to one question (a comparison
while a canary runs) is evidence beside the thumbs. The statistics are checked against sampling,
the counting against a real event log, and the manager decides on both."""

from __future__ import annotations

import random
import time
from datetime import datetime, timedelta, timezone

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from looprl.ingest.decode import Columns
from looprl.ingest.schema import PreferenceEvent, ResponseEvent, ThumbsEvent
from looprl.ops.canary import Arm, CanaryManager, Pairs, combine, decide, event_log_pairs, prob_better, prob_preferred
from looprl.ops.core.config import CanaryConfig, load_config
from looprl.storage.parts import PartWriter
from looprl.storage.registry import Registry

from test_canary import publish

NOW = datetime.now(timezone.utc)


@pytest.mark.parametrize("pairs", [Pairs(0, 0), Pairs(6, 10), Pairs(1, 12), Pairs(40, 70), Pairs(3, 3)])
def test_prob_preferred_matches_sampling(pairs):
    torch.manual_seed(0)
    q = torch.distributions.Beta(torch.tensor(1.0 + pairs.wins), torch.tensor(1.0 + pairs.n - pairs.wins)).sample((200_000,))
    assert prob_preferred(pairs) == pytest.approx((q > 0.5).float().mean().item(), abs=0.01)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 400), st.integers(0, 400))
def test_prob_preferred_is_antisymmetric_and_monotone(a, b):
    wins, n = min(a, b), max(a, b)
    p = prob_preferred(Pairs(wins, n))
    assert 0.0 <= p <= 1.0 and p + prob_preferred(Pairs(n - wins, n)) == pytest.approx(1.0, abs=1e-9)
    if wins < n:
        assert prob_preferred(Pairs(wins + 1, n)) >= p  # strictly, until floats saturate at 1


def test_combining_evidence_multiplies_the_odds():
    assert combine(0.7) == pytest.approx(0.7)
    assert combine(0.7, 0.5) == pytest.approx(0.7)  # no evidence changes nothing
    assert combine(0.75, 0.75) == pytest.approx(0.9)  # odds 3 and 3: 9
    assert combine(0.8, 0.2) == pytest.approx(0.5)
    assert 0.0 < combine(0.0, 1.0) < 1.0 and combine(1.0, 1.0) > 0.999  # clipped: one source is no veto
    with pytest.raises(ValueError, match="wins=4 n=3"):
        Pairs(4, 3)


CFG = CanaryConfig(min_samples=20, promote_probability=0.9, rollback_probability=0.99, max_samples=300)


def test_pairs_decide_what_thumbs_leave_open():
    thumbs = (Arm(12, 25), Arm(11, 25))
    assert decide(*thumbs, CFG).action == "wait"
    better = decide(*thumbs, CFG, Pairs(38, 55))
    assert better.action == "promote"
    assert better.numbers["pair_n"] == 55 and better.numbers["prob_better_pairs"] > 0.99
    assert better.numbers["prob_better_thumbs"] == pytest.approx(prob_better(*thumbs), abs=1e-4)
    worse = decide(*thumbs, CFG, Pairs(12, 55))
    assert worse.action == "rollback" and worse.numbers["prob_better"] < 0.01
    # the sample bounds stay on thumbs: pairs alone never decide before min_samples
    assert decide(Arm(2, 5), Arm(3, 5), CFG, Pairs(50, 55)).action == "wait"
    # pairs and thumbs disagreeing leave the test open
    assert decide(Arm(16, 25), Arm(10, 25), CFG, Pairs(22, 55)).action == "wait"


def test_pairs_sharpen_the_sequential_test():
    """Looking every 10 thumbs (and the pairs that came meanwhile, twice as many), a slightly worse
    candidate is rolled back far more often, and an equal one still rarely (more evidence gives
    repeated looks more chances: benchmarks/canary_power.py measures both rates)."""
    rng = random.Random(1)

    def run(p_cand: float, p_ctrl: float, q: float | None) -> str:
        c = k = Arm(0, 0)
        pairs = Pairs()
        for _ in range(30):
            c = Arm(c.ups + sum(rng.random() < p_cand for _ in range(10)), c.n + 10)
            k = Arm(k.ups + sum(rng.random() < p_ctrl for _ in range(10)), k.n + 10)
            if q is not None:
                pairs = Pairs(pairs.wins + sum(rng.random() < q for _ in range(20)), pairs.n + 20)
            d = decide(c, k, CFG, pairs)
            if d.action != "wait":
                return d.action
        return "wait"

    thumbs_only = [run(0.3, 0.38, None) for _ in range(60)]
    paired = [run(0.3, 0.38, 0.42) for _ in range(60)]
    assert paired.count("rollback") >= thumbs_only.count("rollback") + 15
    assert paired.count("promote") <= thumbs_only.count("promote") - 15
    equal = [run(0.35, 0.35, 0.5) for _ in range(60)]
    assert equal.count("rollback") <= 12


# --------------------------------------------------------------------------- the event log
def write(cfg, events, at: datetime = NOW) -> None:
    """Store ``events`` as ingest does, as one batch made durable at ``at``."""
    cols: dict[str, Columns] = {}
    for i, e in enumerate(events):
        cols.setdefault(e.kind, Columns(e.kind)).append(e, str(e.event_id), "looprl.feedback", 0, i)
    PartWriter(cfg.events_dir).write_batch({k: c.table(at) for k, c in cols.items()}, at)


def served(rid: str, user: str, version: str) -> ResponseEvent:
    return ResponseEvent(response_id=rid, prompt=f"question of {rid}", completion=f"answer {rid}", model="policy",
                         adapter_version=version, user_id=user)


def comparison(user: str, i: int, chosen: str, rejected: str) -> tuple[list, PreferenceEvent]:
    """Two answers served to ``user`` (``chosen``'s and ``rejected``'s versions) and the user's choice."""
    a, b = f"{user}-{i}-a", f"{user}-{i}-b"
    vote = PreferenceEvent(chosen_response_id=a, rejected_response_id=b, user_id=user,
                           ts=NOW + timedelta(seconds=i))
    return [served(a, user, chosen), served(b, user, rejected)], vote


@pytest.fixture
def cfg(tmp_path):
    return load_config(environ={}, workspace=tmp_path / "ws",
                       canary={"max_user_share": 0.25, "min_samples": 10, "max_samples": 200})


def test_only_choices_between_the_two_arms_count_each_voter_capped(cfg):
    events = []
    for u in range(8):  # 6 of 8 users choose the candidate v2 over the control v1
        answers, vote = comparison(f"u{u}", 0, "v2", "v1") if u < 6 else comparison(f"u{u}", 0, "v1", "v2")
        events += [*answers, vote]
    noise = (("v1", "v1"), ("v2", "v2"), ("v3", "v1"), ("v2", "v3"))  # not between the arms
    for i, (chosen, rejected) in enumerate(noise, start=10):
        answers, vote = comparison("u0", i, chosen, rejected)
        events += [*answers, vote]
    for i in range(1, 6):  # one user's many votes: capped at a quarter of the arm's
        answers, vote = comparison("heavy", i, "v1", "v2")
        events += [*answers, vote]
    # a user who changed their mind about one pair: the latest choice counts
    answers, first = comparison("u7", 9, "v2", "v1")
    second = PreferenceEvent(chosen_response_id=first.rejected_response_id, rejected_response_id=first.chosen_response_id,
                             user_id="u7", ts=NOW + timedelta(seconds=30))
    events += [*answers, first, second]
    write(cfg, events)
    got = event_log_pairs(cfg)("v2", "v1", 0.0)
    # 8 users' votes, u7's changed one, and 'heavy' kept to 3 of 12 (a quarter): 6 wins of 12
    assert got == Pairs(6, 12)
    assert event_log_pairs(cfg)("v1", "v2", 0.0) == Pairs(6, 12)
    assert event_log_pairs(cfg)("v2", "v1", time.time() + 60) == Pairs()  # before the canary started: none
    assert event_log_pairs(cfg)("v9", "v1", 0.0) == Pairs()


def test_the_manager_promotes_on_pairs_where_thumbs_are_even(cfg, tmp_path):
    reg = Registry(cfg.registry_dir)
    v1 = publish(reg, tmp_path, "gated")
    mgr = CanaryManager(cfg)
    mgr.step()
    assert reg.pointer("policy", "canary") == v1
    events = []
    for u in range(24):  # even thumbs: each user thumbs one answer of each arm, up on every other
        for version in (v1, "base"):
            rid = f"t-{u}-{version}"
            events += [served(rid, f"u{u}", version), ThumbsEvent(response_id=rid, up=u % 2 == 0, user_id=f"u{u}")]
    thumbs_only = load_config(environ={}, workspace=cfg.workspace, canary={**cfg.canary.model_dump(), "count_pairs": False})
    for u in range(24):  # ... and 20 of 24 prefer the candidate's answer to the base's
        answers, vote = comparison(f"u{u}", 0, v1, "base") if u < 20 else comparison(f"u{u}", 0, "base", v1)
        events += [*answers, vote]
    write(cfg, events, at=datetime.now(timezone.utc) + timedelta(seconds=1))  # after the canary started
    assert CanaryManager(thumbs_only).status()["test"]["action"] == "wait"
    d = mgr.step()
    assert d.action == "promote", d
    assert d.numbers["pair_n"] == 24 and d.numbers["pair_wins"] == 20
    assert d.numbers["candidate_n"] == d.numbers["control_n"] == 24
    assert reg.pointer("policy", "promoted") == v1
    assert mgr.decisions()[-1]["numbers"]["prob_better_pairs"] > 0.99
