"""Deciders race: the canary counts votes for a while, an operator may roll back or promote by
hand meanwhile, the controller may roll back an unhealthy adapter. Each release move is a
compare-and-set under the registry's policy lock, so the earlier decision stands and the stale one
is refused without writing anything; pointer writers never lose an update."""

from __future__ import annotations

import json
import multiprocessing
import threading
from pathlib import Path

import pytest

from looprl.ops.canary import Arm, CanaryManager
from looprl.ops.cli import main
from looprl.ops.core.config import load_config
from looprl.serving.controller import AdapterController, Desired, Observed
from looprl.storage import releases
from looprl.storage.registry import Registry
from looprl.storage.releases import CANARY, KIND, PROMOTED, Expected, StaleDecision, TransitionError

from releases_testing import publish_version

BETTER = (Arm(24, 30), Arm(6, 30))  # (candidate, control): the canary would promote
WORSE = (Arm(3, 30), Arm(20, 30))  # the canary would roll back


def publish(reg: Registry, tmp_path: Path, status: str = "gated") -> str:
    return publish_version(reg, tmp_path, status)


def snapshot(reg: Registry, state: Path) -> dict:
    """Everything a release move writes: statuses with history, pointers, the decisions log."""
    return {"manifests": [m.model_dump_json() for m in reg.list(KIND)],
            "pointers": (releases.promoted_version(reg), releases.canary_version(reg)),
            "decisions": releases.read_decisions(state)}


class Counts:
    """Feedback counts per version; ``during`` runs while the canary counts (the slow query)."""

    def __init__(self, arms: tuple[Arm, Arm]):
        self.arms = arms
        self.during = None
        self.calls = 0

    def __call__(self, versions: list[str], since: float) -> dict[str, Arm]:
        self.calls += 1
        if self.during is not None:
            act, self.during = self.during, None
            act()
        return dict(zip(versions, self.arms))


@pytest.fixture
def cfg(tmp_path):
    return load_config(environ={}, workspace=tmp_path / "ws",
                       canary={"min_samples": 20, "max_samples": 200, "traffic_share": 0.3})


def canary_of(cfg, arms=BETTER) -> tuple[CanaryManager, Counts, Registry]:
    counts = Counts(arms)
    return CanaryManager(cfg, counts=counts), counts, Registry(cfg.registry_dir)


def operator(cfg) -> CanaryManager:
    """A second process's view: `looprl canary promote/rollback` builds its own manager."""
    return CanaryManager(cfg, counts=Counts(BETTER))


# --------------------------------------------------------------------------- the canary vs people
@pytest.mark.parametrize("arms", [BETTER, WORSE], ids=["would-promote", "would-roll-back"])
def test_a_rollback_by_hand_during_the_count_stands(cfg, tmp_path, arms):
    mgr, counts, reg = canary_of(cfg, arms)
    v1 = publish(reg, tmp_path)
    operator(cfg).manual_promote(v1, by="alice")
    v2 = publish(reg, tmp_path)
    mgr.step()
    assert releases.canary_version(reg) == v2
    counts.during = lambda: operator(cfg).manual_rollback(by="bob")
    d = mgr.step()
    assert d.action == "refused"
    assert f"policy/{v2} is now rolled_back (manual rollback by bob), was canary" in d.reason
    assert "pointer canary now names nothing, was v2" in d.reason and "Nothing was written" in d.reason
    # bob's rollback stands: v2 never serves, v1 keeps all traffic, and nobody records otherwise
    assert (releases.promoted_version(reg), releases.canary_version(reg)) == (v1, None)
    m = reg.manifest(KIND, v2)
    assert m.status == "rolled_back" and m.history[-1].reason == "manual rollback by bob"
    assert [h.status for h in m.history].count("rolled_back") == 1
    assert [(r["action"], r["version"]) for r in mgr.decisions()] == [
        ("manual_promote", v1), ("start", v2), ("manual_rollback", v2)]
    for _ in range(3):  # later polls leave it so
        assert mgr.step() is None
    assert (releases.promoted_version(reg), releases.canary_version(reg)) == (v1, None)
    assert reg.manifest(KIND, v2).status == "rolled_back"


def test_a_promotion_by_hand_during_the_count_ends_the_canary(cfg, tmp_path):
    mgr, counts, reg = canary_of(cfg, BETTER)
    v1 = publish(reg, tmp_path)
    mgr.step()
    assert releases.canary_version(reg) == v1
    v2 = publish(reg, tmp_path)  # gated while v1 is on canary
    result = []
    counts.during = lambda: result.append(operator(cfg).manual_promote(v2, by="alice"))
    d = mgr.step()
    assert d.action == "refused" and f"policy/{v1} is now rolled_back (canary ended: {v2} promoted" in d.reason
    assert result == [f"{v2} serves all traffic; canary {v1} ended"]
    assert (releases.promoted_version(reg), releases.canary_version(reg)) == (v2, None)
    ended = reg.manifest(KIND, v1)
    assert ended.status == "rolled_back"
    assert ended.reason == f"canary ended: {v2} promoted (manual promotion by alice)"
    decisions = mgr.decisions()
    assert [(r["action"], r["version"], r["by"]) for r in decisions] == [
        ("start", v1, "scheduler"), ("end", v1, "alice"), ("manual_promote", v2, "alice")]
    assert decisions[-1]["numbers"] == {"previous": "base", "ended_canary": v1}
    # the ended canary never auto-promotes, however good its votes look
    for _ in range(3):
        assert mgr.step() is None
    assert (releases.promoted_version(reg), releases.canary_version(reg)) == (v2, None)
    assert "promote" not in [r["action"] for r in mgr.decisions()]


def test_a_promotion_by_hand_between_polls_ends_the_canary(cfg, tmp_path):
    mgr, counts, reg = canary_of(cfg, BETTER)
    v1, v2 = publish(reg, tmp_path, "rolled_back"), publish(reg, tmp_path)
    mgr.step()
    assert releases.canary_version(reg) == v2
    operator(cfg).manual_promote(v1, by="alice")  # an older version, by hand
    assert mgr.step() is None and mgr.step() is None
    assert (releases.promoted_version(reg), releases.canary_version(reg)) == (v1, None)
    assert reg.manifest(KIND, v2).status == "rolled_back"
    assert [r["action"] for r in mgr.decisions()] == ["start", "end", "manual_promote"]


def test_promoting_the_canary_by_hand_ends_it_as_promoted(cfg, tmp_path):
    mgr, counts, reg = canary_of(cfg, WORSE)
    v1 = publish(reg, tmp_path)
    mgr.step()
    counts.during = lambda: operator(cfg).manual_promote(v1, by="alice")
    d = mgr.step()  # the canary would roll it back; the person promoted it first
    assert d.action == "refused" and f"policy/{v1} is now promoted (manual promotion by alice), was canary" in d.reason
    assert (releases.promoted_version(reg), releases.canary_version(reg)) == (v1, None)
    assert reg.manifest(KIND, v1).status == "promoted"
    assert [r["action"] for r in mgr.decisions()] == ["start", "manual_promote"]


def test_a_canary_whose_control_was_replaced_is_ended_not_judged(cfg, tmp_path):
    """A registry where promoted moved without ending the canary (written by hand, or by an older
    looprl): the test would compare against a version that no longer serves."""
    mgr, counts, reg = canary_of(cfg, BETTER)
    v1, v2 = publish(reg, tmp_path), publish(reg, tmp_path, "rolled_back")
    mgr.step()
    reg.set_pointer(KIND, PROMOTED, v2)
    d = mgr.step()
    assert d.action == "rollback" and "its control base no longer serves all traffic (v2 does)" in d.reason
    assert (releases.promoted_version(reg), releases.canary_version(reg)) == (v2, None)
    assert reg.manifest(KIND, v1).status == "rolled_back" and counts.calls == 0
    assert mgr.decisions()[-1]["action"] == "end"


def test_a_canary_start_raced_by_a_promotion_is_refused(cfg, tmp_path):
    mgr, counts, reg = canary_of(cfg)
    v1, v2 = publish(reg, tmp_path), publish(reg, tmp_path)
    seen = Expected("gated", {CANARY: None, PROMOTED: None})  # what the scheduler read before v2 was promoted
    operator(cfg).manual_promote(v2, by="alice")
    before = snapshot(reg, cfg.state_dir)
    with pytest.raises(StaleDecision, match="pointer promoted now names v2, was base"):
        mgr.start(v1, expected=seen)
    assert snapshot(reg, cfg.state_dir) == before


# --------------------------------------------------------------------------- the other deciders
def test_a_manual_rollback_is_refused_if_a_canary_started_meanwhile(reg_state, tmp_path):
    reg, state = reg_state
    v1, v2 = publish(reg, tmp_path), publish(reg, tmp_path)
    releases.promote(reg, state, v1, "x", by="op", action="manual_promote")
    seen = Expected("promoted", {PROMOTED: v1, CANARY: None})  # what the operator saw
    releases.start_canary(reg, state, v2, traffic_share=0.1)
    before = snapshot(reg, state)
    with pytest.raises(StaleDecision, match="rollback of the promoted version refused, .*: pointer canary now "
                                            "names v2, was nothing"):
        releases.roll_back_promoted(reg, state, "by hand", by="op", action="manual_rollback", expected=seen)
    assert snapshot(reg, state) == before


def test_an_unhealthy_rollback_of_a_canary_promoted_meanwhile_is_refused(reg_state, tmp_path):
    """The controller read v1 on canary; the canary promoted it before the rollback committed:
    rolling back "the canary" would mark the promoted version rolled_back while it serves."""
    reg, state = reg_state
    v1 = publish(reg, tmp_path)
    releases.start_canary(reg, state, v1, traffic_share=0.1)
    releases.promote(reg, state, v1, "P(better)=0.97", by="canary", action="promote")
    before = snapshot(reg, state)
    with pytest.raises(StaleDecision, match="pointer canary now names nothing, was v1"):
        releases.roll_back_canary(reg, state, v1, "unhealthy", by="controller", action="unhealthy_rollback",
                                  expected=Expected(pointers={CANARY: v1}))
    with pytest.raises(TransitionError, match="policy/v1 is promoted, not on canary: roll back the promoted"):
        releases.roll_back_canary(reg, state, v1, "unhealthy", by="controller", action="unhealthy_rollback")
    assert snapshot(reg, state) == before


def test_the_controllers_unhealthy_rollback_yields_to_a_newer_decision(cfg, tmp_path):
    """The controller's pass read v1 on canary; the canary promoted v1 before the rollback: the
    pass changes nothing, and the next pass rolls back what serves now (the promoted v1)."""
    reg = Registry(cfg.registry_dir)
    v1 = publish(reg, tmp_path)
    releases.start_canary(reg, cfg.state_dir, v1, traffic_share=0.3)
    ctl = AdapterController(cfg, endpoints=[])
    stale = ctl.desired()
    releases.promote(reg, cfg.state_dir, v1, "P(better)=0.97", by="canary", action="promote")
    observed = {"e1": Observed("e1", unhealthy={releases.lora_name(v1): "forward_error"})}
    before = snapshot(reg, cfg.state_dir)
    assert stale == Desired(None, v1, 0.3) and ctl._roll_back_unhealthy(stale, observed)
    assert snapshot(reg, cfg.state_dir) == before
    assert ctl._roll_back_unhealthy(ctl.desired(), observed)
    assert (releases.promoted_version(reg), reg.manifest(KIND, v1).status) == (None, "rolled_back")
    assert releases.read_decisions(cfg.state_dir)[-1]["action"] == "unhealthy_rollback"


def test_rolling_back_the_promoted_version_ends_the_canary(reg_state, tmp_path):
    reg, state = reg_state
    v1, v2, v3 = publish(reg, tmp_path), publish(reg, tmp_path), publish(reg, tmp_path)
    for v in (v1, v2):
        releases.promote(reg, state, v, "x", by="op", action="manual_promote")
    releases.start_canary(reg, state, v3, traffic_share=0.1)
    rec = releases.roll_back_promoted(reg, state, "unhealthy on e1", by="controller", action="unhealthy_rollback",
                                      expected=Expected(pointers={PROMOTED: v2}))
    assert rec.numbers == {"restored": v1, "ended_canary": v3}
    assert (releases.promoted_version(reg), releases.canary_version(reg)) == (v1, None)
    assert reg.manifest(KIND, v3).reason == f"canary ended: its control {v2} was rolled back (unhealthy on e1)"
    assert [r["action"] for r in releases.read_decisions(state)][-2:] == ["end", "unhealthy_rollback"]


def test_a_refused_promotion_does_not_end_the_canary(reg_state, tmp_path):
    reg, state = reg_state
    v1, v2 = publish(reg, tmp_path, "rejected"), publish(reg, tmp_path)
    releases.start_canary(reg, state, v2, traffic_share=0.1)
    before = snapshot(reg, state)
    with pytest.raises(TransitionError, match="only versions that passed the gate"):
        releases.promote(reg, state, v1, "by hand", by="op", action="manual_promote")
    assert snapshot(reg, state) == before


# --------------------------------------------------------------------------- concurrent writers
@pytest.fixture
def reg_state(tmp_path):
    return Registry(tmp_path / "registry"), tmp_path / "state"


def test_concurrent_canary_starts_leave_one_canary(reg_state, tmp_path):
    reg, state = reg_state
    versions = [publish(reg, tmp_path) for _ in range(6)]
    gate = threading.Barrier(len(versions))
    won, refused = [], []

    def start(v: str) -> None:
        r = Registry(reg.root)  # each thread as its own process would: its own lock handle
        gate.wait()
        try:
            releases.start_canary(r, state, v, traffic_share=0.1)
            won.append(v)
        except TransitionError as e:
            refused.append(str(e))

    threads = [threading.Thread(target=start, args=(v,)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(won) == 1 and len(refused) == len(versions) - 1
    assert releases.canary_version(reg) == won[0]
    assert [m.version for m in reg.list(KIND) if m.status == "canary"] == won
    assert [(r["action"], r["version"]) for r in releases.read_decisions(state)] == [("start", won[0])]


def test_concurrent_rollbacks_of_the_same_version_roll_back_once(reg_state, tmp_path):
    """Two operators see v3 serving and both roll it back: v3 goes, v2 stays (not also rolled back)."""
    reg, state = reg_state
    v1, v2, v3 = (publish(reg, tmp_path) for _ in range(3))
    for v in (v1, v2, v3):
        releases.promote(reg, state, v, "x", by="op", action="manual_promote")
    seen = Expected("promoted", {PROMOTED: v3, CANARY: None})
    gate = threading.Barrier(4)
    outcomes = []

    def roll_back(who: int) -> None:
        gate.wait()
        try:
            releases.roll_back_promoted(Registry(reg.root), state, f"by op{who}", by=f"op{who}",
                                        action="manual_rollback", expected=seen)
            outcomes.append("done")
        except StaleDecision:
            outcomes.append("refused")

    threads = [threading.Thread(target=roll_back, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(outcomes) == ["done", "refused", "refused", "refused"]
    assert releases.promoted_version(reg) == v2 and reg.manifest(KIND, v2).status == "promoted"
    assert [r["action"] for r in releases.read_decisions(state)].count("manual_rollback") == 1


def _promote_in_turn(root: str, state: str, last: int, wins) -> None:
    """Read the promoted version, promote the next one if nobody did meanwhile; until ``last``."""
    reg = Registry(root)
    while True:
        seen = releases.promoted_version(reg)
        nxt = releases.version_number(seen) + 1
        if nxt > last:
            return
        try:
            releases.promote(reg, state, f"v{nxt}", "next", by="worker", action="manual_promote",
                             expected=Expected(pointers={PROMOTED: seen}))
        except StaleDecision:
            continue
        with wins.get_lock():
            wins.value += 1


def test_concurrent_pointer_writers_in_processes_never_lose_an_update(reg_state, tmp_path):
    """Read-compare-write on the promoted pointer from several processes: every promotion applies
    to the version its writer read, so each version is promoted exactly once, in order."""
    reg, state = reg_state
    last = 12
    for _ in range(last):
        publish(reg, tmp_path)
    ctx = multiprocessing.get_context("fork")
    wins = ctx.Value("i", 0)
    procs = [ctx.Process(target=_promote_in_turn, args=(str(reg.root), str(state), last, wins)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert wins.value == last and releases.promoted_version(reg) == f"v{last}"
    chain = [(r["numbers"]["previous"], r["version"]) for r in releases.read_decisions(state)]
    assert chain == [("base", "v1")] + [(f"v{i}", f"v{i + 1}") for i in range(1, last)]
    for m in reg.list(KIND):
        assert [h.status for h in m.history].count("promoted") == 1, m.version


def test_the_kind_lock_nests_in_a_thread_and_excludes_other_threads(reg_state, tmp_path):
    reg, _ = reg_state
    v1 = publish(reg, tmp_path)
    entered = threading.Event()

    def writer() -> None:
        Registry(reg.root).set_pointer(KIND, CANARY, v1)
        entered.set()

    with reg.locked(KIND):
        with reg.locked(KIND):  # nested: no self-deadlock
            reg.set_pointer(KIND, PROMOTED, v1)
        t = threading.Thread(target=writer)
        t.start()
        assert not entered.wait(0.5)  # the other writer waits for the lock
        assert releases.canary_version(reg) is None
    t.join(timeout=30)
    assert entered.is_set() and releases.canary_version(reg) == v1


# --------------------------------------------------------------------------- the command line
def test_promote_and_rollback_by_hand_need_no_token(cfg, tmp_path, monkeypatch, capsys):
    """Releases are filesystem-permission operations (ops/README.md): no token to compare with."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LOOPRL_CONFIG", raising=False)
    monkeypatch.delenv("LOOPRL_SERVING__ADMIN_TOKEN", raising=False)
    mgr, counts, reg = canary_of(cfg)
    v1 = publish(reg, tmp_path)
    mgr.step()
    v2 = publish(reg, tmp_path)
    ws = str(cfg.workspace)
    assert main(["--workspace", ws, "canary", "promote", v2, "--by", "alice"]) == 0
    assert json.loads(capsys.readouterr().out) == {"promoted": v2, "result": f"{v2} serves all traffic; "
                                                                              f"canary {v1} ended"}
    assert main(["--workspace", ws, "canary", "rollback", "--by", "bob"]) == 0
    assert json.loads(capsys.readouterr().out) == {"rolled_back": f"{v2} rolled back; the base model serves "
                                                                  "all traffic"}
    assert [(r["action"], r["by"]) for r in releases.read_decisions(cfg.state_dir)][1:] == [
        ("end", "alice"), ("manual_promote", "alice"), ("manual_rollback", "bob")]
