"""The canary's deadline, on a real registry with a fake clock: a canary undecided at
``canary.deadline_seconds`` is ended or rolled back through the release contract, PPO stops
waiting for it, and every release decision is exported for the dashboard's deploy annotations."""

from __future__ import annotations

import json
import time

import pytest
from prometheus_client import REGISTRY

from looprl.ops.canary import Arm, CanaryManager
from looprl.ops.core.config import load_config
from looprl.ops.scheduler import canary_being_judged, policy_hold
from looprl.storage import releases
from looprl.storage.registry import Registry
from releases_testing import publish_version

DEADLINE_S = 3600.0


class Clock:
    def __init__(self):
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def sample(name: str, **labels) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


@pytest.fixture
def loop(tmp_path):
    """(manager, counts by version, registry, cfg, clock) for a deadline of DEADLINE_S."""

    def make(on_deadline: str = "end"):
        cfg = load_config(environ={}, workspace=tmp_path / "ws",
                          canary={"min_samples": 20, "max_samples": 200, "deadline_seconds": DEADLINE_S,
                                  "on_deadline": on_deadline})
        counts: dict[str, Arm] = {}
        clock = Clock()
        mgr = CanaryManager(cfg, counts=lambda versions, since: {v: counts[v] for v in versions if v in counts},
                            clock=clock)
        return mgr, counts, Registry(cfg.registry_dir), cfg, clock

    return make


def test_a_canary_without_votes_ends_at_its_deadline_and_ppo_runs_again(loop, tmp_path):
    mgr, counts, reg, cfg, clock = loop("end")
    promoted = publish_version(reg, tmp_path, "gated")
    mgr.manual_promote(promoted, by="test")
    v = publish_version(reg, tmp_path, "gated")
    assert mgr.step() is None and reg.pointer("policy", "canary") == v
    started = sample("looprl_canary_started_timestamp_seconds")
    assert started == pytest.approx(clock.now, abs=5)
    assert sample("looprl_canary_deadline_timestamp_seconds") == pytest.approx(started + DEADLINE_S)

    clock.now += DEADLINE_S - 60  # a minute before: still waiting, PPO still held
    assert mgr.step().action == "wait"
    assert reg.pointer("policy", "canary") == v
    assert canary_being_judged(cfg) == f"canary {v} is being judged" and policy_hold(cfg)() is not None
    going_on = cfg.model_copy(update={"scheduler": cfg.scheduler.model_copy(update={"policy_waits_for_canary": False})})
    assert policy_hold(going_on)() is None  # unless PPO goes on while a canary is judged

    ended_before = sample("looprl_canary_decisions_total", decision="end") or 0.0
    clock.now += 61  # past the deadline, still no vote at all
    d = mgr.step()
    assert d.action == "end" and "deadline" in d.reason and "too few votes" in d.reason
    # the release contract recorded it: candidate rolled back, promoted version untouched
    assert reg.pointer("policy", "canary") is None and reg.pointer("policy", "promoted") == promoted
    m = reg.manifest("policy", v)
    assert m.status == "rolled_back" and m.reason == d.reason
    last = mgr.decisions()[-1]
    assert (last["action"], last["version"], last["control"], last["by"]) == ("end", v, promoted, "canary")
    assert last["at"] == clock.now
    assert last["numbers"]["deadline_seconds"] == DEADLINE_S and last["numbers"]["candidate_n"] == 0
    # PPO no longer waits, and the canary never restarts the ended version
    assert canary_being_judged(cfg) is None and policy_hold(cfg)() is None
    assert mgr.step() is None and reg.pointer("policy", "canary") is None
    # metrics: counted as an end (not a rollback), no canary any more, the decision's time exported
    assert sample("looprl_canary_decisions_total", decision="end") == ended_before + 1
    assert sample("looprl_canary_deadline_timestamp_seconds") == 0
    assert sample("looprl_canary_active_version") == 0
    assert sample("looprl_canary_last_decision_timestamp_seconds", decision="end") == clock.now


def test_on_deadline_rollback_counts_as_a_failed_canary(loop, tmp_path):
    mgr, counts, reg, cfg, clock = loop("rollback")
    v = publish_version(reg, tmp_path, "gated")
    mgr.step()
    counts.update({v: Arm(5, 12), "base": Arm(6, 11)})  # some votes, fewer than min_samples
    clock.now += DEADLINE_S + 1
    d = mgr.step()
    assert d.action == "rollback" and "too few votes (12 candidate and 11 control votes" in d.reason
    assert "canary.on_deadline" in d.reason
    assert reg.manifest("policy", v).status == "rolled_back" and reg.pointer("policy", "canary") is None
    last = mgr.decisions()[-1]
    assert last["action"] == "rollback" and last["numbers"]["on_deadline"] == "rollback"
    assert sample("looprl_canary_last_decision_timestamp_seconds", decision="rollback") == clock.now


def test_a_decision_the_test_reaches_at_the_deadline_stands(loop, tmp_path):
    mgr, counts, reg, cfg, clock = loop("end")
    v = publish_version(reg, tmp_path, "gated")
    mgr.step()
    counts.update({v: Arm(20, 25), "base": Arm(6, 25)})  # a clear improvement, first seen late
    clock.now += DEADLINE_S + 1
    assert mgr.step().action == "promote"
    assert reg.pointer("policy", "promoted") == v and mgr.decisions()[-1]["action"] == "promote"


def test_an_inconclusive_canary_with_enough_votes_ends_too(loop, tmp_path):
    mgr, counts, reg, cfg, clock = loop("end")
    v = publish_version(reg, tmp_path, "gated")
    mgr.step()
    counts.update({v: Arm(12, 25), "base": Arm(12, 25)})
    assert mgr.step().action == "wait"
    clock.now += DEADLINE_S + 1
    d = mgr.step()  # no new votes since the last look: the deadline is checked all the same
    assert d.action == "end" and "still inconclusive (25 candidate and 25 control votes)" in d.reason


def test_decisions_by_anyone_are_exported_from_the_log(loop, tmp_path):
    """Operators and the controller decide in other processes: the manager reads their lines from
    the decisions log, and a line still being written waits for the next read."""
    mgr, counts, reg, cfg, clock = loop("end")
    v1 = publish_version(reg, tmp_path, "gated")
    rec = releases.promote(reg, cfg.state_dir, v1, "manual promotion by bob", by="bob", action="manual_promote",
                           at=1_700_000_000.0)
    mgr.step()
    assert sample("looprl_canary_last_decision_timestamp_seconds", decision="manual_promote") == rec.at
    path = releases.decisions_path(cfg.state_dir)
    line = json.dumps({"at": 1_700_000_100.0, "action": "unhealthy_rollback", "version": v1, "control": "base",
                       "reason": "test", "numbers": {}, "by": "controller"})
    with open(path, "a") as f:
        f.write(line[:20])  # half a line
    mgr.export_decisions()
    assert sample("looprl_canary_last_decision_timestamp_seconds", decision="unhealthy_rollback") is None
    with open(path, "a") as f:
        f.write(line[20:] + "\n" + '{"action": "Not A Kind!", "at": 1}\n')
    mgr.export_decisions()
    assert sample("looprl_canary_last_decision_timestamp_seconds", decision="unhealthy_rollback") == 1_700_000_100.0
    assert sample("looprl_canary_last_decision_timestamp_seconds", decision="Not A Kind!") is None


def test_the_deadline_is_a_config_key_with_its_choices():
    from looprl.ops.core.config import ConfigError

    cfg = load_config(environ={"LOOPRL_CANARY__DEADLINE_SECONDS": "7200", "LOOPRL_CANARY__ON_DEADLINE": "rollback"})
    assert (cfg.canary.deadline_seconds, cfg.canary.on_deadline) == (7200.0, "rollback")
    with pytest.raises(ConfigError, match="canary.on_deadline"):
        load_config(environ={"LOOPRL_CANARY__ON_DEADLINE": "promote"})
    with pytest.raises(ConfigError, match="canary.deadline_seconds"):
        load_config(environ={"LOOPRL_CANARY__DEADLINE_SECONDS": "0"})
