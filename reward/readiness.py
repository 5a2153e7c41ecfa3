"""What the scheduler asks about the reward model: how much new feedback it has not seen, how its
prequential accuracy went over the updates, and whether it is good enough for PPO to train
against. Reads the event log, the registry and the updater's history; no torch."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from prometheus_client import Gauge

from looprl.ops.core.config import LooprlConfig
from looprl.reward.history import read_history, reward_history_path
from looprl.reward.skill import Evidence, Skill, ranking_skill
from looprl.storage.events import EventLog
from looprl.storage.registry import Registry, atomic_write_text

_ACCURACY_KEYS = ("pair_accuracy", "score", "thumbs_auc")

SKILL_LOWER = Gauge("looprl_reward_skill_lower_bound_ratio",
                    "Lower confidence bound of the reward model's ranking skill (pairs and points pooled; 0.5 = chance)")
SKILL_LOWER.set(float("nan"))  # unknown until measured, not 0


def new_feedback_count(cfg: LooprlConfig) -> int:
    """Feedback events ingested after the newest reward version was published (evaluation users'
    events excluded: they measure the loop and are never trained on)."""
    if not cfg.events_dir.exists():
        return 0
    latest = Registry(cfg.registry_dir).latest("reward")
    since = latest.created_at.timestamp() if latest else 0.0
    prefix = cfg.demo.eval_user_prefix.replace("'", "''")
    eval_filter = f" AND (user_id IS NULL OR NOT starts_with(user_id, '{prefix}'))" if prefix else ""
    t = EventLog(cfg.events_dir).query(
        f"SELECT count(*) AS n FROM feedback WHERE epoch(ingested_at) > {since}{eval_filter}")
    return int(t.column("n")[0].as_py())


def _accuracy(d: dict[str, Any], prefix: str = "") -> float | None:
    for k in _ACCURACY_KEYS:
        v = d.get(prefix + k)
        if isinstance(v, (int, float)):
            return float(v)
    return None


def prequential_accuracies(cfg: LooprlConfig) -> list[tuple[str, float]]:
    """Prequential (test-then-train) accuracy of every reward update, oldest first, keyed by update:
    from the updater's history (rejected updates included), else from the published versions'
    manifests."""
    if reward_history_path(cfg).is_file():
        out = []
        for row in read_history(cfg):
            acc = _accuracy(row.get("prequential") or {})
            if acc is not None:
                out.append((f"update-{row.get('update')}", acc))
        return out
    return [(m.version, acc) for m in Registry(cfg.registry_dir).list("reward")
            if (acc := _accuracy(m.metrics, "prequential_")) is not None]


def _pooled_prequential(cfg: LooprlConfig, window: int) -> tuple[float | None, int]:
    """Pair accuracy over the last ``window`` updates' prequential pairs, weighted by pairs."""
    right = total = 0.0
    for row in read_history(cfg, last=window):
        pre = row.get("prequential") or {}
        n, acc = pre.get("pairs") or 0, pre.get("pair_accuracy")
        if n and isinstance(acc, (int, float)):
            right, total = right + acc * n, total + n
    return (right / total if total else None), int(total)


def _recent_updates(cfg: LooprlConfig, window: int | None) -> list[dict[str, Any]]:
    """The last ``window`` history rows; None: the newest rows that together hold at least
    ``scheduler.policy_reward_window_labels`` prequential labels (at least 3 rows, at most 50)."""
    if window is not None:
        return read_history(cfg, last=window)
    rows = read_history(cfg, last=50)
    want, labels, out = cfg.scheduler.policy_reward_window_labels, 0, []
    for row in reversed(rows):
        if labels >= want and len(out) >= 3:
            break
        pre = row.get("prequential") or {}
        labels += int(pre.get("pairs") or 0) + int(pre.get("points") or 0)
        out.append(row)
    return out[::-1]


def reward_skill(cfg: LooprlConfig, window: int | None = None, manifest: Any = None) -> Skill | None:
    """The ranking skill (``reward.skill``) of the newest published reward version, with its lower
    bound at ``scheduler.policy_reward_confidence``, from all labels: that version's held-out
    events (manifest ``holdout_*``) and the updater's recent prequential results (new feedback
    judged before training on it, history rows: the last ``window``, or by default the newest
    holding ``scheduler.policy_reward_window_labels`` labels). The two are treated as independent
    (they share at most the held-out events of the last update). None without a version. Sets
    ``looprl_reward_skill_lower_bound_ratio``."""
    m = manifest if manifest is not None else Registry(cfg.registry_dir).latest("reward")
    if m is None:
        return None
    evidence = [Evidence.from_metrics(f"held-out {m.version}", m.metrics, "holdout_")]
    evidence += [Evidence.from_metrics(f"update {row.get('update')}", row.get("prequential") or {})
                 for row in _recent_updates(cfg, window)]
    skill = ranking_skill(evidence, cfg.scheduler.policy_reward_confidence)
    SKILL_LOWER.set(skill.lower if skill.lower is not None else float("nan"))
    return skill


def _ready_path(cfg: LooprlConfig):
    return cfg.state_dir / "scheduler" / "reward_ready.json"


def ready_since(cfg: LooprlConfig) -> dict[str, Any] | None:
    """The record of the first reward version that passed the skill condition (None: none yet)."""
    try:
        return json.loads(_ready_path(cfg).read_text())
    except (OSError, ValueError):
        return None


def not_ready_for_ppo(cfg: LooprlConfig, window: int | None = None) -> str | None:
    """Why PPO should not train against the newest reward model yet, or None when it may.

    PPO against a reward model that has not learnt the users yet optimises noise (and drifts the
    policy away from the base for nothing). The condition: the lower confidence bound of the
    ranking skill from all labels (``reward_skill``: held-out and the last ``window`` prequential
    results, pairs and thumbs/points AUC) reaches ``scheduler.policy_min_reward_skill``. It is a
    start condition: once a version has met it (recorded in ``<state>/scheduler/reward_ready.json``),
    PPO keeps training against the newer versions, which the updater publishes only when they are
    not confidently worse than the one before on the same held-out events; the bound of a few
    dozen sparse labels wanders around the threshold, and holding PPO each time it dips would stop
    a loop that already learns. ``scheduler.policy_start_after_labels`` starts it too, once the newest
    version has read that many feedback events: the bound reads the users' coin flips on a few
    dozen sparse labels, and in replays a model that has read about 190 ranks well above chance
    whatever its bound says (ops/README.md).

    Deprecated, still honoured when set: ``scheduler.policy_min_reward_pair_accuracy`` on at least
    ``scheduler.policy_min_reward_pairs``, for the held-out pairs of the newest version and for
    the pooled prequential pairs of the last ``window`` updates, each on its own."""
    s = cfg.scheduler
    want, min_pairs, min_skill = s.policy_min_reward_pair_accuracy, s.policy_min_reward_pairs, s.policy_min_reward_skill
    if want <= 0 and min_pairs <= 0 and min_skill <= 0:
        return None
    m = Registry(cfg.registry_dir).latest("reward")
    if m is None:
        return "no reward model yet"
    if min_skill > 0:
        skill = reward_skill(cfg, window, manifest=m)
        floor, read = s.policy_start_after_labels, int(m.watermark.get("consumed_events") or 0)
        by_bound = skill.lower is not None and skill.lower >= min_skill
        by_labels = 0 < floor <= read
        if ready_since(cfg) is None:
            if not (by_bound or by_labels):
                or_labels = f", or {floor} labels read ({read} so far)" if floor else ""
                return (f"reward {m.version}: {skill.describe()} over its held-out events and recent updates; "
                        f"waiting for a lower bound >= {min_skill}{or_labels}")
            atomic_write_text(_ready_path(cfg), json.dumps({
                "version": m.version, "at": datetime.now(timezone.utc).isoformat(), "estimate": skill.estimate,
                "lower": skill.lower, "min_skill": min_skill, "labels_read": read,
                "by": "skill" if by_bound else "labels"}))
    if want <= 0 and min_pairs <= 0:
        return None
    acc, pairs = m.metrics.get("holdout_pair_accuracy"), m.metrics.get("holdout_pairs") or 0
    if not isinstance(acc, (int, float)) or pairs < min_pairs or acc < want:
        return f"reward {m.version}: held-out pair accuracy {acc} on {pairs} pairs; waiting for >= {want} on >= {min_pairs}"
    window = window or 3  # the deprecated pair condition keeps its fixed window of updates
    pacc, ppairs = _pooled_prequential(cfg, window)
    if pacc is None or ppairs < min_pairs or pacc < want:
        shown = f"{pacc:.3f}" if pacc is not None else None
        return (f"reward updater: prequential pair accuracy {shown} on {ppairs} pairs over the last {window} "
                f"updates; waiting for >= {want} on >= {min_pairs}")
    return None
