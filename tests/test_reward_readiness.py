"""What the scheduler reads about the reward model (looprl.reward.readiness): new feedback since the
newest version, prequential accuracy per update, readiness for PPO."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from safetensors.numpy import save_file

from looprl.ingest.decode import Columns
from looprl.ingest.schema import ThumbsEvent
from looprl.ops.core.config import load_config
from looprl.reward.readiness import new_feedback_count, not_ready_for_ppo, prequential_accuracies, ready_since
from looprl.storage.parts import PartWriter
from looprl.storage.registry import Registry


def _write_thumbs(cfg, users, at):
    cols = Columns("thumbs")
    for i, u in enumerate(users):
        cols.append(ThumbsEvent(response_id=f"r{i}", up=True, user_id=u), f"{u}-{at.timestamp()}-{i}", "topic", 0, i)
    PartWriter(cfg.events_dir).write_batch({"thumbs": cols.table(at)}, at)


def _publish_reward(cfg, tmp_path, watermark=None, **metrics):
    src = tmp_path / "head"
    src.mkdir(exist_ok=True)
    save_file({"w": np.zeros(1, np.float32)}, str(src / "head.safetensors"))
    return Registry(cfg.registry_dir).publish("reward", src, base_checksum="x", metrics=metrics, watermark=watermark)


def _write_history(cfg, rows):
    path = cfg.state_dir / "reward_history.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_new_feedback_counts_events_after_the_newest_version_without_eval_users(tmp_path):
    cfg = load_config(environ={}, workspace=tmp_path)
    assert new_feedback_count(cfg) == 0  # no event log yet
    before = datetime.now(timezone.utc) - timedelta(hours=1)
    _write_thumbs(cfg, ["u1", "u2", "eval-7"], before)
    assert new_feedback_count(cfg) == 2
    _publish_reward(cfg, tmp_path)
    assert new_feedback_count(cfg) == 0  # the version has seen them
    _write_thumbs(cfg, ["u3", "eval-8"], datetime.now(timezone.utc) + timedelta(hours=1))
    assert new_feedback_count(cfg) == 1


def test_prequential_accuracies_from_the_history_else_from_the_manifests(tmp_path):
    cfg = load_config(environ={}, workspace=tmp_path)
    _publish_reward(cfg, tmp_path, prequential_pair_accuracy=0.6)
    _publish_reward(cfg, tmp_path, prequential_thumbs_auc=0.7)
    _publish_reward(cfg, tmp_path)  # no prequential numbers: skipped
    assert prequential_accuracies(cfg) == [("v1", 0.6), ("v2", 0.7)]
    _write_history(cfg, [{"update": 1, "prequential": {"pair_accuracy": 0.55}},
                         {"update": 2, "decision": "rejected", "prequential": {"score": 0.8}},
                         {"update": 3}])
    assert prequential_accuracies(cfg) == [("update-1", 0.55), ("update-2", 0.8)]


def test_ppo_readiness_is_off_by_default_and_needs_both_held_out_and_prequential_evidence(tmp_path):
    cfg = load_config(environ={}, workspace=tmp_path)
    assert not_ready_for_ppo(cfg) is None  # no condition configured, not even a reward model needed
    cfg = load_config(environ={}, workspace=tmp_path, scheduler={"policy_min_reward_pair_accuracy": 0.8,
                                                                 "policy_min_reward_pairs": 20})
    _publish_reward(cfg, tmp_path, holdout_pair_accuracy=0.9, holdout_pairs=30)
    _write_history(cfg, [{"update": 1, "prequential": {"pairs": 25, "pair_accuracy": 0.9}}])
    assert not_ready_for_ppo(cfg) is None
    _write_history(cfg, [{"update": 1, "prequential": {"pairs": 25, "pair_accuracy": 0.9}},
                         {"update": 2, "prequential": {"pairs": 25, "pair_accuracy": 0.5}}])
    assert "prequential pair accuracy 0.700 on 50 pairs over the last 3 updates" in not_ready_for_ppo(cfg)
    assert "0.500 on 25 pairs over the last 1 updates" in not_ready_for_ppo(cfg, window=1)
    _publish_reward(cfg, tmp_path, holdout_pair_accuracy=0.9, holdout_pairs=10)
    assert not_ready_for_ppo(cfg).startswith("reward v2: held-out pair accuracy 0.9 on 10 pairs")


def _skill_rows(updates: int, pairs: int, right: int, pos: int = 0, neg: int = 0, auc: float | None = None):
    return [{"update": u + 1, "prequential": {"pairs": pairs, "pairs_correct": right, "pair_accuracy": right / pairs if pairs else None,
                                              "points_pos": pos, "points_neg": neg, "point_auc": auc}}
            for u in range(updates)]


def test_ppo_readiness_pools_pairs_and_thumbs_with_a_confidence_bound(tmp_path):
    from prometheus_client import REGISTRY

    cfg = load_config(environ={}, workspace=tmp_path, scheduler={"policy_min_reward_skill": 0.6})
    assert not_ready_for_ppo(cfg) == "no reward model yet"
    # Few labels of a learnt preference: 3 held-out pairs (2 right), a few thumbs.
    _publish_reward(cfg, tmp_path, holdout_pairs=3, holdout_pairs_correct=2, holdout_point_auc=0.75,
                    holdout_points_pos=4, holdout_points_neg=3)
    _write_history(cfg, _skill_rows(1, pairs=2, right=2))
    reason = not_ready_for_ppo(cfg)
    assert reason.startswith("reward v1: ranking skill") and "5 pairs (0.800 right)" in reason
    assert "0.750 on 4+/3- (held-out v1)" in reason and "waiting for a lower bound >= 0.6" in reason
    lower = float(reason.split("90% lower bound ")[1].split(" ")[0])
    assert lower < 0.6
    assert REGISTRY.get_sample_value("looprl_reward_skill_lower_bound_ratio") == pytest.approx(lower, abs=1e-3)
    # More labels, pairs alone: 12 pairs at 0.75 are not enough evidence...
    _publish_reward(cfg, tmp_path, holdout_pairs=6, holdout_pairs_correct=5)
    _write_history(cfg, _skill_rows(1, pairs=6, right=4))
    assert "12 pairs (0.750 right); no points" in not_ready_for_ppo(cfg)
    # ... but the same pairs with the thumbs of three updates (AUC 0.7, noisy Bernoulli thumbs) are.
    _write_history(cfg, _skill_rows(1, pairs=6, right=4) + _skill_rows(2, pairs=0, right=0, pos=40, neg=40, auc=0.7))
    assert not_ready_for_ppo(cfg) is None
    assert REGISTRY.get_sample_value("looprl_reward_skill_lower_bound_ratio") > 0.6
    # Met once, the start condition stays met (recorded): a later dip of the bound does not hold PPO.
    assert ready_since(cfg)["lower"] > 0.6
    _write_history(cfg, _skill_rows(3, pairs=0, right=0, pos=400, neg=400, auc=0.5))
    assert not_ready_for_ppo(cfg) is None
    # Before it was ever met, a model at chance on many thumbs is refused however many there are.
    (cfg.state_dir / "scheduler" / "reward_ready.json").unlink()
    assert "lower bound" in not_ready_for_ppo(cfg) and ready_since(cfg) is None
    # The deprecated pair keys are still honoured next to the new one.
    _write_history(cfg, _skill_rows(1, pairs=6, right=4) + _skill_rows(2, pairs=0, right=0, pos=40, neg=40, auc=0.7))
    old = load_config(environ={}, workspace=tmp_path, scheduler={"policy_min_reward_skill": 0.6,
                                                                 "policy_min_reward_pairs": 20})
    assert "held-out pair accuracy None on 6 pairs" in not_ready_for_ppo(old)


def test_a_label_floor_starts_ppo_when_the_bound_lags_and_is_recorded_as_such(tmp_path):
    cfg = load_config(environ={}, workspace=tmp_path, scheduler={"policy_min_reward_skill": 0.6,
                                                                 "policy_start_after_labels": 190})
    # A model at chance on few labels: the bound holds PPO, and the reason names the floor too.
    weak = {"holdout_pairs": 4, "holdout_pairs_correct": 2}
    _publish_reward(cfg, tmp_path, watermark={"consumed_events": 189}, **weak)
    _write_history(cfg, _skill_rows(3, pairs=6, right=3))
    reason = not_ready_for_ppo(cfg)
    assert "waiting for a lower bound >= 0.6, or 190 labels read (189 so far)" in reason
    assert ready_since(cfg) is None
    # One more label read: the floor starts it, whatever the bound says, and the record says why.
    _publish_reward(cfg, tmp_path, watermark={"consumed_events": 190}, **weak)
    assert not_ready_for_ppo(cfg) is None
    rec = ready_since(cfg)
    assert rec["by"] == "labels" and rec["labels_read"] == 190 and rec["version"] == "v2" and rec["lower"] < 0.6
    # Without the floor the same model still waits (it is the bound's condition, not a new one).
    (cfg.state_dir / "scheduler" / "reward_ready.json").unlink()
    strict = load_config(environ={}, workspace=tmp_path, scheduler={"policy_min_reward_skill": 0.6})
    assert not_ready_for_ppo(strict).endswith("waiting for a lower bound >= 0.6")
