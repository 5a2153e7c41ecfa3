"""What the scheduler reads about the reward model (looprl.reward.readiness): new feedback since the
newest version, prequential accuracy per update, readiness for PPO."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import numpy as np
from safetensors.numpy import save_file

from looprl.ingest.decode import Columns
from looprl.ingest.schema import ThumbsEvent
from looprl.ops.core.config import load_config
from looprl.reward.readiness import new_feedback_count, not_ready_for_ppo, prequential_accuracies
from looprl.storage.parts import PartWriter
from looprl.storage.registry import Registry


def _write_thumbs(cfg, users, at):
    cols = Columns("thumbs")
    for i, u in enumerate(users):
        cols.append(ThumbsEvent(response_id=f"r{i}", up=True, user_id=u), f"{u}-{at.timestamp()}-{i}", "topic", 0, i)
    PartWriter(cfg.events_dir).write_batch({"thumbs": cols.table(at)}, at)


def _publish_reward(cfg, tmp_path, **metrics):
    src = tmp_path / "head"
    src.mkdir(exist_ok=True)
    save_file({"w": np.zeros(1, np.float32)}, str(src / "head.safetensors"))
    return Registry(cfg.registry_dir).publish("reward", src, base_checksum="x", metrics=metrics)


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
