"""What the scheduler asks about the reward model: how much new feedback it has not seen, how its
prequential accuracy went over the updates, and whether it is good enough for PPO to train
against. Reads the event log, the registry and the updater's history; no torch."""

from __future__ import annotations

from typing import Any

from looprl.ops.core.config import LooprlConfig
from looprl.reward.history import read_history, reward_history_path
from looprl.storage.events import EventLog
from looprl.storage.registry import Registry

_ACCURACY_KEYS = ("pair_accuracy", "score", "thumbs_auc")


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


def not_ready_for_ppo(cfg: LooprlConfig, window: int = 3) -> str | None:
    """Why PPO should not train against the newest reward model yet, or None when it may.

    PPO against a reward model that has not learnt the users yet optimises noise (and drifts the
    policy away from the base for nothing). Both pieces of evidence must reach
    ``scheduler.policy_min_reward_pair_accuracy`` on at least ``scheduler.policy_min_reward_pairs``:

    * the newest published version ranks its held-out preference pairs well (manifest
      ``holdout_pair_accuracy`` / ``holdout_pairs``);
    * the updater's last ``window`` prequential results (new feedback judged *before* training on
      it) agree, so one lucky small held-out set is not enough."""
    want, min_pairs = cfg.scheduler.policy_min_reward_pair_accuracy, cfg.scheduler.policy_min_reward_pairs
    if want <= 0 and min_pairs <= 0:
        return None
    m = Registry(cfg.registry_dir).latest("reward")
    if m is None:
        return "no reward model yet"
    acc, pairs = m.metrics.get("holdout_pair_accuracy"), m.metrics.get("holdout_pairs") or 0
    if not isinstance(acc, (int, float)) or pairs < min_pairs or acc < want:
        return f"reward {m.version}: held-out pair accuracy {acc} on {pairs} pairs; waiting for >= {want} on >= {min_pairs}"
    pacc, ppairs = _pooled_prequential(cfg, window)
    if pacc is None or ppairs < min_pairs or pacc < want:
        shown = f"{pacc:.3f}" if pacc is not None else None
        return (f"reward updater: prequential pair accuracy {shown} on {ppairs} pairs over the last {window} "
                f"updates; waiting for >= {want} on >= {min_pairs}")
    return None
