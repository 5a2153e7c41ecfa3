"""The release contract: version texts, adapter names, and the policy lifecycle's transitions
(allowed ones move status and pointers and are logged; refused ones say why and change nothing)."""

import pytest

from looprl.ops.core.version import BASE, Version, version_number, version_sort_key
from looprl.storage import releases
from looprl.storage.registry import ChecksumError, Registry, RegistryError
from looprl.storage.releases import KIND, LIFECYCLE, TransitionError

from releases_testing import publish_version


# --------------------------------------------------------------------------- version texts
def test_version_parse_and_format():
    assert Version.parse("v3") == Version(3) and str(Version(3)) == "v3"
    assert Version.parse("v12").number == 12 and Version.parse("v12") > Version.parse("v9")
    assert Version.parse("base") is BASE and BASE.is_base and str(BASE) == "base" == releases.BASE
    assert Version.parse(Version(4)) == Version(4)
    assert [version_number(t) for t in ("v7", "base", None, "policy", "v0")] == [7, 0, 0, 0, 0]
    assert Version.parse_or_none("latest") is None and Version.parse_or_none(None) is None


@pytest.mark.parametrize("text", ["v0", "v01", "3", "V3", "v", "latest", "", "v-1", "v3 ", "policy-v3", None, 3])
def test_version_refuses_anything_else_by_name(text):
    with pytest.raises(ValueError, match=f"invalid version {text!r}: expected 'v<N>'"):
        Version.parse(text)


def test_negative_version_numbers_are_refused():
    with pytest.raises(ValueError, match="got -1"):
        Version(-1)


def test_display_order_is_base_then_numbers_then_unversioned():
    texts = ["v10", "other", "v2", "base", "v1"]
    assert sorted(texts, key=version_sort_key) == ["base", "v1", "v2", "v10", "other"]


def test_lora_names_round_trip():
    assert releases.lora_name("v3") == "policy-v3"
    assert releases.version_of_lora(releases.lora_name("v42")) == "v42"
    for name in ("policy-base", "policy-v03", "reward-v3", "policy", "v3", "", None):
        assert releases.version_of_lora(name) is None, name
    with pytest.raises(ValueError, match="base model has no adapter name"):
        releases.lora_name("base")
    with pytest.raises(ValueError, match="invalid version 'latest'"):
        releases.lora_name("latest")


def test_registry_versions_are_parsed_by_version():
    with pytest.raises(RegistryError, match="invalid version 'base'"):
        Registry("unused").version_dir(KIND, "base")


# --------------------------------------------------------------------------- the lifecycle table
def test_lifecycle_table_states_who_may_move_where():
    assert releases.sources("gated") == ("candidate", "gated", "rejected")
    assert releases.sources("canary") == ("gated",)
    assert releases.sources("promoted") == ("gated", "canary", "promoted", "rolled_back")
    assert releases.sources("rolled_back") == ("canary", "promoted")
    assert "candidate" not in {t for targets in LIFECYCLE.values() for t in targets}  # no way back
    releases.check_transition("v1", "candidate", "gated")
    with pytest.raises(ValueError, match="'candidate' is not a status of the policy lifecycle"):
        releases.check_transition("v1", "gated", "candidate")


# --------------------------------------------------------------------------- transitions on a registry
@pytest.fixture
def reg(tmp_path):
    return Registry(tmp_path / "registry")


publish = publish_version


def test_a_version_goes_from_candidate_to_promoted(reg, tmp_path):
    state = tmp_path / "state"
    v1 = publish(reg, tmp_path)
    releases.record_gate(reg, v1, "gated", "win rate 0.7", {"win_rate": 0.7})
    start = releases.start_canary(reg, state, v1, traffic_share=0.25, at=100.0)
    assert (start.action, start.version, start.control, start.at) == ("start", v1, "base", 100.0)
    assert releases.canary_version(reg) == v1 and releases.promoted_version(reg) is None
    assert reg.manifest(KIND, v1).history[-1].numbers == {"control": "base", "traffic_share": 0.25}
    rec = releases.promote(reg, state, v1, "P(better)=0.97", by="canary", action="promote", numbers={"n": 80})
    assert (releases.promoted_version(reg), releases.canary_version(reg)) == (v1, None)
    assert rec.numbers == {"previous": "base", "n": 80} and rec.control == "base"
    m = reg.manifest(KIND, v1)
    assert [h.status for h in m.history] == ["candidate", "gated", "canary", "promoted"]
    assert [d["action"] for d in releases.read_decisions(state)] == ["start", "promote"]


@pytest.mark.parametrize("status,hint", [("candidate", True), ("rejected", True), ("rolled_back", False),
                                         ("promoted", False)])
def test_only_a_gated_version_enters_canary(reg, tmp_path, status, hint):
    v1 = publish(reg, tmp_path, status)
    with pytest.raises(TransitionError) as e:
        releases.start_canary(reg, tmp_path / "state", v1, traffic_share=0.1)
    msg = str(e.value)
    assert msg.startswith(f"policy/{v1} is {status}: only a gated version enters canary (gated)")
    assert ("run `looprl policy gate v1` first" in msg) == hint
    assert releases.canary_version(reg) is None and reg.manifest(KIND, v1).status == status
    assert releases.read_decisions(tmp_path / "state") == []


def test_one_canary_at_a_time(reg, tmp_path):
    v1, v2 = publish(reg, tmp_path, "gated"), publish(reg, tmp_path, "gated")
    releases.start_canary(reg, tmp_path / "state", v1, traffic_share=0.1)
    with pytest.raises(TransitionError, match=f"policy/{v2} cannot enter canary: policy/{v1} is on canary"):
        releases.start_canary(reg, tmp_path / "state", v2, traffic_share=0.1)
    assert releases.canary_version(reg) == v1 and reg.manifest(KIND, v2).status == "gated"
    with pytest.raises(TransitionError, match=f"policy/{v1} is canary: only a gated version enters canary"):
        releases.start_canary(reg, tmp_path / "state", v1, traffic_share=0.1)


@pytest.mark.parametrize("status", ["candidate", "rejected"])
def test_promotion_needs_the_gate(reg, tmp_path, status):
    v1 = publish(reg, tmp_path, status)
    with pytest.raises(TransitionError) as e:
        releases.promote(reg, tmp_path / "state", v1, "by hand", by="op", action="manual_promote")
    assert str(e.value) == (f"policy/v1 is {status}: only versions that passed the gate can be promoted "
                            "(gated, canary, promoted, rolled_back); run `looprl policy gate v1` first")
    assert releases.promoted_version(reg) is None and reg.manifest(KIND, v1).status == status


def test_promotion_by_hand_of_a_rolled_back_or_superseded_version(reg, tmp_path):
    state = tmp_path / "state"
    v1, v2 = publish(reg, tmp_path, "rolled_back"), publish(reg, tmp_path, "gated")
    releases.promote(reg, state, v1, "by hand", by="op", action="manual_promote")
    releases.promote(reg, state, v2, "by hand", by="op", action="manual_promote")
    rec = releases.promote(reg, state, v1, "by hand", by="op", action="manual_promote")  # v1 is promoted, superseded
    assert releases.promoted_version(reg) == v1 and rec.numbers == {"previous": v2}


def test_a_corrupted_version_is_never_promoted(reg, tmp_path):
    v1 = publish(reg, tmp_path, "gated")
    (reg.version_dir(KIND, v1) / "adapter_config.json").write_text('{"tampered": true}')
    with pytest.raises(ChecksumError, match="checksum mismatch for adapter_config.json"):
        releases.promote(reg, tmp_path / "state", v1, "x", by="op", action="manual_promote")
    assert releases.promoted_version(reg) is None and reg.manifest(KIND, v1).status == "gated"


@pytest.mark.parametrize("status", ["canary", "promoted", "rolled_back"])
def test_the_gate_does_not_judge_a_version_that_reached_users(reg, tmp_path, status):
    v1 = publish(reg, tmp_path, status)
    for decision in ("gated", "rejected"):
        with pytest.raises(TransitionError, match=rf"policy/v1 is {status}: only candidates are gated "
                                                  r"\(candidate, gated, rejected\)$"):
            releases.record_gate(reg, v1, decision, "again")
    with pytest.raises(TransitionError, match="only candidates are gated"):
        releases.require(reg, v1, "gated")
    assert reg.manifest(KIND, v1).status == status


def test_the_gate_may_judge_again_until_the_version_reaches_users(reg, tmp_path):
    v1 = publish(reg, tmp_path)
    releases.record_gate(reg, v1, "rejected", "win rate 0.4")
    releases.record_gate(reg, v1, "gated", "win rate 0.6")
    assert [h.status for h in reg.manifest(KIND, v1).history] == ["candidate", "rejected", "gated"]
    with pytest.raises(ValueError, match="a gate decision is 'gated' or 'rejected', got 'promoted'"):
        releases.record_gate(reg, v1, "promoted", "skip the canary")
    with pytest.raises(RegistryError, match="policy/v9 does not exist"):
        releases.require(reg, "v9", "gated")


def test_canary_roll_back_keeps_the_promoted_version(reg, tmp_path):
    state = tmp_path / "state"
    v1, v2 = publish(reg, tmp_path, "gated"), publish(reg, tmp_path, "gated")
    releases.promote(reg, state, v1, "x", by="op", action="manual_promote")
    releases.start_canary(reg, state, v2, traffic_share=0.1)
    rec = releases.roll_back_canary(reg, state, v2, "P(worse)=0.99", by="canary", action="rollback",
                                    numbers={"n": 60})
    assert (rec.control, rec.numbers) == (v1, {"control": v1, "n": 60})
    assert (releases.promoted_version(reg), releases.canary_version(reg)) == (v1, None)
    assert reg.manifest(KIND, v2).status == "rolled_back"
    with pytest.raises(TransitionError, match=f"policy/{v2} is rolled_back: only the canary or the promoted "
                                              r"version is rolled back \(canary, promoted\)"):
        releases.roll_back_canary(reg, state, v2, "again", by="op", action="manual_rollback")


def test_a_trainer_line_runs_on_through_gated_versions_until_users_refuse_one(reg, tmp_path):
    state = tmp_path / "state"
    line = lambda: releases.continue_point(reg, "newest_gated")  # noqa: E731
    assert line() is None and releases.continue_point(reg, "promoted") is None  # nothing yet: the base
    v1 = publish(reg, tmp_path, "gated")  # trained from the base
    assert line() == v1 and releases.continue_point(reg, "promoted") is None
    publish(reg, tmp_path, "rejected", parent=v1)  # the gate refused it: the line stays at v1
    assert line() == v1
    v3 = publish(reg, tmp_path, "gated", parent=v1)
    releases.start_canary(reg, state, v1, traffic_share=0.5)  # users judge v1 while the line runs on
    assert line() == v3
    releases.promote(reg, state, v1, "P(better)=0.95", by="canary", action="promote")
    assert line() == v3 and releases.continue_point(reg, "promoted") == v1
    v4 = publish(reg, tmp_path, "gated", parent=v3)
    assert releases.lineage(reg, v4) == [v4, v3, v1]
    releases.start_canary(reg, state, v3, traffic_share=0.5)
    assert line() == v4
    releases.roll_back_canary(reg, state, v3, "P(worse)=0.97", by="canary", action="rollback")
    assert line() == v1  # the users refused v3: v4 descends from it, so the line restarts at v1
    publish(reg, tmp_path, "gated")  # from the base: no line to the promoted v1
    assert line() == v1
    v6 = publish(reg, tmp_path, "gated", parent=v1)
    assert line() == v6
    with pytest.raises(ValueError, match="expected 'promoted' or 'newest_gated'"):
        releases.continue_point(reg, "newest")


def test_a_gated_version_is_not_rolled_back(reg, tmp_path):
    v1 = publish(reg, tmp_path, "gated")
    with pytest.raises(TransitionError, match="policy/v1 is gated: only the canary or the promoted version"):
        releases.roll_back_canary(reg, tmp_path / "state", v1, "x", by="op", action="manual_rollback")
    assert reg.manifest(KIND, v1).status == "gated"


def test_promoted_roll_back_restores_the_previous_promoted_version_then_the_base(reg, tmp_path):
    state = tmp_path / "state"
    v1, v2 = publish(reg, tmp_path, "gated"), publish(reg, tmp_path, "gated")
    for v in (v1, v2):
        releases.promote(reg, state, v, "x", by="op", action="manual_promote")
    rec = releases.roll_back_promoted(reg, state, "unhealthy", by="controller", action="unhealthy_rollback")
    assert (rec.version, rec.control, releases.promoted_version(reg)) == (v2, v1, v1)
    rec = releases.roll_back_promoted(reg, state, "by hand", by="op", action="manual_rollback")
    assert (rec.version, rec.control, rec.numbers) == (v1, "base", {"restored": "base"})
    assert releases.promoted_version(reg) is None
    with pytest.raises(TransitionError, match="nothing to roll back: the base model already serves all traffic"):
        releases.roll_back_promoted(reg, state, "again", by="op", action="manual_rollback")
    assert [d["action"] for d in releases.read_decisions(state)][-2:] == ["unhealthy_rollback", "manual_rollback"]


def test_a_stale_canary_pointer_is_dropped(reg, tmp_path):
    v1 = publish(reg, tmp_path, "gated")
    releases.start_canary(reg, tmp_path / "state", v1, traffic_share=0.1)
    assert releases.drop_stale_canary(reg) is None and releases.canary_version(reg) == v1
    reg.set_status(KIND, v1, "rolled_back", "decided by hand")
    assert releases.drop_stale_canary(reg) == v1 and releases.canary_version(reg) is None


def test_a_status_outside_the_lifecycle_is_never_written(reg, tmp_path):
    v1 = publish(reg, tmp_path)
    with pytest.raises(ValueError, match="status"):
        reg.set_status(KIND, v1, "shipped", "typo")
    assert reg.manifest(KIND, v1).status == "candidate"
