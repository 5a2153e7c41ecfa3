"""The incremental reward-model updater (`looprl reward update` / `looprl reward serve`).

One update:

1. read the *new* slice: resolved feedback events not consumed yet (``reward.data``), once there
   are ``min_new_events`` of them or the oldest has waited ``max_wait_seconds``;
2. **test, then train**: score the slice with the working model before it learns from it and
   record prequential pair accuracy / AUC (an honest online estimate of generalisation);
3. train on the slice's non-held-out events plus a replay sample of already-trained history
   (``replay_ratio`` x the slice), so the model does not forget old feedback;
4. compare the candidate with the currently published version on the held-out events
   (``holdout_fraction`` of all events, by event-id hash, never trained on), event by event;
5. commit the working model and the consumed event ids together (``reward.state``), then publish
   the candidate as ``registry/reward/vN`` unless it is confidently worse than the current one
   (``reward.skill.paired_difference``: its upper bound at ``publish_confidence`` below
   ``-publish_margin``), so small increments, whose held-out differences are noise, publish.

The working model always keeps what it learnt (a rejected candidate is not published, but its
events are consumed: continual learning never re-trains an event from the new-slice path).
Decisions and numbers go to the manifest (metrics/status) and to ``state/reward_history.jsonl``.
"""

from __future__ import annotations

import json
import random
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

import torch
from filelock import FileLock
from prometheus_client import Counter, Gauge, Histogram
from pydantic import BaseModel

from looprl.ops.core.config import LooprlConfig
from looprl.ops.core.locks import LockHeld, try_lock
from looprl.ops.core.log import get_logger
from looprl.ops.core.metrics import serve_metrics
from looprl.ops.core.retry import backoff_seconds
from looprl.ops.core.signals import stop_on_signals
from looprl.ops.core.version import version_number
from looprl.policy.families import family_of_dir
from looprl.policy.model import base_checksum, check_memory
from looprl.reward.data import Example, FeedbackSource, connect_event_log, is_holdout
from looprl.reward.history import read_history, reward_history_path
from looprl.reward.model import CONFIG_FILE, KIND, WEIGHTS_FILE, RewardModel, RewardModelError, load_from_dir, load_weights_file
from looprl.reward.readiness import reward_skill
from looprl.reward.skill import paired_difference
from looprl.reward.state import StateStore, UpdaterState
from looprl.reward.train import EvalResult, evaluate, train
from looprl.storage.registry import Registry

log = get_logger(__name__)

UPDATES = Counter("looprl_reward_updates_total", "Reward updates run, by result", ["result"])
EXAMPLES = Counter("looprl_reward_examples_trained_total", "Examples trained on (new and replay)", ["source"])
PREQ_ACC = Gauge("looprl_reward_prequential_accuracy_ratio", "Pair accuracy on the new slice before training on it")
PREQ_AUC = Gauge("looprl_reward_prequential_auc_ratio", "Thumbs AUC on the new slice before training on it")
HOLDOUT = Gauge("looprl_reward_holdout_score_ratio", "Held-out score of the last candidate")
LOSS = Gauge("looprl_reward_train_loss_nats", "Mean training loss of the last update's final epoch")
PUBLISHED = Gauge("looprl_reward_published_version_number", "Number N of the newest published reward vN")
DURATION = Histogram("looprl_reward_update_duration_seconds", "Wall time of one update",
                     buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600))
BACKLOG = Gauge("looprl_reward_backlog_events", "Resolved feedback events not consumed yet (behind the watermark)")
# Unknown until an update measures them: NaN, not 0, so neither an alert (accuracy low) nor a panel
# reads "0" from a process (or a pushed job) that has not measured anything.
for _gauge in (PREQ_ACC, PREQ_AUC, HOLDOUT, LOSS):
    _gauge.set(float("nan"))


class UpdateResult(BaseModel):
    update: int
    new_events: int
    trained_new: int
    replay: int
    holdout_new: int
    holdout_size: int
    prequential: dict[str, Any]
    candidate: dict[str, Any]
    current: dict[str, Any] | None
    current_version: str | None
    loss: float | None
    decision: str  # "published" | "rejected"
    trigger: str = "batch"  # "batch" (min_new_events), "waited" (max_wait_seconds) or "forced"
    reason: str
    version: str | None
    seconds: float
    watermark: dict[str, Any]


class UpdaterBusy(RuntimeError):
    """Another reward updater holds the state lock."""


class RewardUpdater:
    """Owns the reward updater state for one workspace; one instance per process (file-locked)."""

    def __init__(self, cfg: LooprlConfig, connect: Callable[[], Any] | None = None,
                 clock: Callable[[], datetime] | None = None):
        self.cfg = cfg
        self._connect = connect or (lambda: connect_event_log(cfg.events_dir))
        self._clock = clock or (lambda: datetime.now(timezone.utc))  # tests inject time
        self.store = StateStore(cfg.state_dir)
        self.registry = Registry(cfg.registry_dir)
        self.history_path = reward_history_path(cfg)
        self.state: UpdaterState | None = None
        self.consumed: dict[str, str] = {}  # ids consumed from the state's floor on -> ingestion stamp
        self.model: RewardModel | None = None
        self._published: tuple[str, RewardModel] | None = None
        self._lock: FileLock | None = None

    # ---- lifecycle ----
    def open(self) -> "RewardUpdater":
        if self.state is not None:
            return self
        try:
            self._lock = try_lock(self.store.dir / ".lock")
        except LockHeld:
            raise UpdaterBusy(f"another reward updater is running on {self.store.dir} (lock held)") from None
        try:
            return self._load()
        except BaseException:  # e.g. no base model yet: let go of the lock, or a retry in this process is "busy"
            self.close()
            raise

    def _load(self) -> "RewardUpdater":
        self.state, self.consumed = self.store.load()
        self.base = base_checksum(self.cfg.base_path)
        self.base_family = family_of_dir(self.cfg.base_path)
        check_memory(self.cfg, "reward")  # before loading: refuse a configuration that cannot fit
        work = self.store.work_dir(self.state)
        # the working model keeps the features and adapters it was trained with (reward.features and
        # reward.ensemble_adapters apply to a new one)
        features, adapters = self._check_work_base(work) if work is not None else (None, None)
        self.model = RewardModel.fresh(self.cfg, features=features, adapters=adapters)
        if work is not None:
            self.model.load_trainable_state(load_weights_file(work / WEIGHTS_FILE), source=str(work / WEIGHTS_FILE))
            # a working model saved with another number of heads (e.g. one, before ensembles)
            self.model.resize_heads(self.cfg.reward.ensemble_heads)
        self.model.eval()
        log.info("reward updater state loaded", update=self.state.update, consumed=len(self.consumed),
                 published=self.state.published, pending_publish=self.state.pending_publish)
        if self.state.pending_publish:  # the last run committed but died before publishing
            version = self._finish_publish()
            pm = self.state.pending_metrics or {}
            self.store.append_history(self.history_path, {
                "at": datetime.now(timezone.utc).isoformat(), "update": self.state.update, "decision": "published",
                "version": version, "reason": pm.get("reason", ""), "recovered": True,
                "metrics": pm.get("metrics", {}), "watermark": self.state.watermark})
            log.info("reward publish finished after restart", update=self.state.update, version=version)
        return self

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        self.state = None

    def __enter__(self) -> "RewardUpdater":
        return self.open()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _check_work_base(self, work: Path) -> tuple[str, int]:
        """Refuse a working model of another base; return its features (saved before they were
        named: "last") and its number of adapters (saved before ensemble adapters: 1)."""
        conf = json.loads((work / CONFIG_FILE).read_text())
        if conf.get("base_checksum") != self.base:
            raise RewardModelError(
                f"{work}: the reward updater's working model was trained on base {str(conf.get('base_checksum'))[:12]}, "
                f"but the configured base is {self.base[:12]}; move {self.store.dir} away to start over")
        features = conf.get("features", "last")
        if features != self.cfg.reward.features:
            log.warning("the reward updater's working model keeps its features; reward.features applies to a "
                        f"new one (move {self.store.dir} away to start over)", features=features,
                        configured=self.cfg.reward.features)
        adapters = int(conf.get("ensemble_adapters", 1))
        if adapters != self.cfg.reward.ensemble_adapters:
            log.warning("the reward updater's working model keeps its adapters; reward.ensemble_adapters applies "
                        f"to a new one (move {self.store.dir} away to start over)", adapters=adapters,
                        configured=self.cfg.reward.ensemble_adapters)
        return features, adapters

    # ---- the update ----
    def backlog(self) -> int:
        self.open()
        con = self._connect()
        try:
            n = FeedbackSource(con, score_names=self.cfg.reward.score_names).count_new(
                self.consumed, since=self.state.consumed_floor)
        finally:
            con.close()
        BACKLOG.set(n)
        return n

    def _trigger(self, new: list[Example], force: bool) -> str | None:
        """Why to update on ``new`` now, or None to wait for more."""
        rc = self.cfg.reward
        if not new:
            return None
        if len(new) >= rc.min_new_events:
            return "batch"
        if force:
            return "forced"
        if rc.max_wait_seconds > 0:
            oldest = min((e.ingested_at for e in new if e.ingested_at is not None), default=None)
            if oldest is not None and (self._clock() - oldest).total_seconds() >= rc.max_wait_seconds:
                return "waited"
        return None

    def update(self, progress: bool = False, force: bool = False) -> UpdateResult | None:
        """One incremental update; None when fewer than ``min_new_events`` new events and none has
        waited ``max_wait_seconds`` (unless force)."""
        self.open()
        rc = self.cfg.reward
        t0 = time.perf_counter()
        con = self._connect()
        try:
            src = FeedbackSource(con, max_user_share=rc.max_user_share, score_names=rc.score_names)
            new = src.new_examples(self.consumed, since=self.state.consumed_floor)
            BACKLOG.set(len(new))
            trigger = self._trigger(new, force)
            if trigger is None:
                UPDATES.labels(result="skipped").inc()
                log.info("reward update skipped", new_events=len(new), min_new_events=rc.min_new_events)
                return None
            n = self.state.update + 1
            holdout_new = [e for e in new if is_holdout(e.event_id, rc.holdout_fraction)]
            train_new = [e for e in new if not is_holdout(e.event_id, rc.holdout_fraction)]

            # Test, then train: the slice is unseen by the working model at this point.
            preq = evaluate(self.model, new)

            consumed = self._consumed_ids(src)
            history = sorted(e for e in consumed if not is_holdout(e, rc.holdout_fraction))
            k = min(len(history), round(rc.replay_ratio * len(train_new)))
            rng = random.Random(f"{rc.seed}:replay:{n}")
            replay = src.examples_by_id(rng.sample(history, k)) if k else []

            stats = train(self.model, train_new + replay, lr=rc.learning_rate, batch_size=rc.batch_size,
                          epochs=rc.epochs_per_update, seed=rc.seed + n, progress=progress,
                          desc=f"reward update {n}", correction_weight=rc.correction_weight,
                          thumbs_weight=rc.thumbs_weight, bootstrap_seed=rc.seed)
            EXAMPLES.labels(source="new").inc(len(train_new))
            EXAMPLES.labels(source="replay").inc(len(replay))

            holdout_ids = [e for e in consumed if is_holdout(e, rc.holdout_fraction)]
            holdout = src.examples_by_id(holdout_ids) + holdout_new
        finally:
            con.close()

        cand = evaluate(self.model, holdout)
        current_version = self.registry.pointer(KIND, "latest")
        current: EvalResult | None = None
        if current_version is not None:
            current = evaluate(self._published_model(current_version), holdout)
        publish, reason = self._decide(cand, current)

        newest = max(new, key=lambda e: (e.ingested_at or datetime.min.replace(tzinfo=timezone.utc), e.event_id))
        watermark = {"update": n, "consumed_events": self.state.watermark.get("consumed_events", 0) + len(new),
                     "ingested_at": newest.ingested_at.isoformat() if newest.ingested_at else None,
                     "event_id": newest.event_id}
        metrics = {**preq.as_dict("prequential_"), **cand.as_dict("holdout_"),
                   **(current.as_dict("current_holdout_") if current else {}),
                   "loss": stats.loss, "trained_new": len(train_new), "replay": len(replay),
                   "holdout_new": len(holdout_new), "update": n}

        # Commit the working model and the consumed ids together (see reward.state).
        work = self.store.stage_work(n, lambda d: self.model.save(d, {"update": n}))
        self.store.append_consumed(n, [(e.event_id, e.ingested_at) for e in new])
        self.state = self.state.model_copy(update={
            "update": n, "work": work, "watermark": watermark, "pending_publish": publish,
            "pending_metrics": {"metrics": metrics, "reason": reason, "parent": current_version},
            "consumed_floor": self._next_floor(new)})
        self.store.commit(self.state)
        self.consumed = self.store.load_consumed(self.state)  # forgets the ids before the new floor

        version = self._finish_publish() if publish else None
        seconds = time.perf_counter() - t0
        result = UpdateResult(
            update=n, new_events=len(new), trained_new=len(train_new), replay=len(replay),
            holdout_new=len(holdout_new), holdout_size=len(holdout), prequential=preq.as_dict(),
            candidate=cand.as_dict(), current=current.as_dict() if current else None,
            current_version=current_version, loss=None if stats.loss != stats.loss else stats.loss,
            decision="published" if publish else "rejected", trigger=trigger, reason=reason, version=version,
            seconds=round(seconds, 3), watermark=watermark)
        self.store.append_history(self.history_path, {"at": datetime.now(timezone.utc).isoformat(),
                                                       **result.model_dump(mode="json")})
        UPDATES.labels(result=result.decision).inc()
        DURATION.observe(seconds)
        if preq.pair_accuracy is not None:
            PREQ_ACC.set(preq.pair_accuracy)
        if preq.thumbs_auc is not None:
            PREQ_AUC.set(preq.thumbs_auc)
        if cand.score is not None:
            HOLDOUT.set(cand.score)
        if result.loss is not None:
            LOSS.set(result.loss)
        BACKLOG.set(0)
        try:
            reward_skill(self.cfg)  # the skill gauge follows the newest version and history
        except Exception as e:  # a metric must not fail a committed update
            log.warning("reward skill not measured", error=repr(e))
        log.info("reward update done", trigger=trigger, update=n, new_events=len(new), replay=len(replay), decision=result.decision,
                 version=version, reason=reason, prequential_pair_accuracy=preq.pair_accuracy,
                 prequential_thumbs_auc=preq.thumbs_auc, holdout=cand.score, seconds=round(seconds, 2))
        return result

    def _consumed_ids(self, src: FeedbackSource) -> set[str]:
        """Every consumed event id, for replay and held-out evaluation: those remembered, and
        those of the resolved events before the floor (read from the log, for this update only)."""
        floor = self.state.consumed_floor
        return set(self.consumed) | (set(src.ids_before(floor)) if floor is not None else set())

    def _next_floor(self, new: list[Example]) -> datetime:
        """The floor after consuming ``new``: a window behind the newest event consumed, never
        moving back (events before the old floor are not read again)."""
        newest = max(e.ingested_at for e in new)
        floor = newest - timedelta(seconds=self.cfg.reward.consumed_window_seconds)
        old = self.state.consumed_floor
        return floor if old is None else max(old, floor)

    def _decide(self, cand: EvalResult, current: EvalResult | None) -> tuple[bool, str]:
        """Publish unless the candidate is confidently worse than the current version on the same
        held-out events: the upper confidence bound of its skill change (paired per-event
        differences of pairs and points) below ``-publish_margin``. A small increment moves the
        held-out numbers by noise; refusing it for that would hold back most small updates."""
        rc = self.cfg.reward
        margin = rc.publish_margin
        c = cand.score
        if current is None:  # nothing to be worse than; consumers are waiting for a first version
            return True, "first version" + (f" (held-out score {c:.4f})" if c is not None else " (no held-out events yet)")
        d = paired_difference(cand.per_example, current.per_example, cand.per_point, current.per_point,
                              rc.publish_confidence)
        if d is None:
            return True, "no held-out events to compare on"
        scores = f"held-out score {c:.4f} vs current {current.score:.4f}" if c is not None and current.score is not None else ""
        if d.upper < -margin:
            return False, f"confidently worse: {d.describe()} < -margin {margin}; {scores}"
        return True, f"not confidently worse: {d.describe()} >= -margin {margin}; {scores}"

    def _finish_publish(self) -> str | None:
        """Publish the committed working model (idempotent: a crash between commit and publish
        is finished on restart; a version already published for this update is reused)."""
        st = self.state
        for m in reversed(self.registry.list(KIND)):
            if m.extra.get("update") == st.update and m.extra.get("updater_dir") == str(self.store.dir):
                version = m.version
                break
        else:
            pm = st.pending_metrics or {}
            m = self.registry.publish(
                KIND, self.store.dir / st.work, base_checksum=self.base, base_family=self.base_family,
                parent=pm.get("parent"),
                watermark=st.watermark, metrics=pm.get("metrics", {}), status="published",
                reason=pm.get("reason", ""), extra={"update": st.update, "updater_dir": str(self.store.dir)})
            version = m.version
        self.state = st.model_copy(update={"pending_publish": False, "published": version})
        self.store.commit(self.state)
        PUBLISHED.set(version_number(version))
        return version

    def _published_model(self, version: str) -> RewardModel:
        if self._published is None or self._published[0] != version:
            manifest, vdir = self.registry.open(KIND, version, base_checksum=self.base)
            self._published = (version, load_from_dir(self.cfg, vdir, manifest.version, expected_base=self.base))
        return self._published[1]


def serve(cfg: LooprlConfig, max_updates: int | None = None, metrics_port: int | None = None,
          stop: threading.Event | None = None, connect: Callable[[], Any] | None = None) -> int:
    """Follow the event log: poll every ``reward.poll_seconds``, update when enough new events.

    Stops on SIGTERM/SIGINT (after the update in progress), ``stop`` or ``max_updates``.
    Returns the number of updates run."""
    torch.set_num_threads(1)
    port = serve_metrics(cfg.reward.metrics_port if metrics_port is None else metrics_port, host=cfg.metrics_host,
                         key="reward.metrics_port")
    log.info("reward updater serving", metrics_port=port, poll_seconds=cfg.reward.poll_seconds)
    done, failures = 0, 0
    with stop_on_signals(stop) as stop, RewardUpdater(cfg, connect=connect) as up:
        while not stop.is_set() and (max_updates is None or done < max_updates):
            try:
                if up.update() is not None:
                    done += 1
                failures = 0
            except (RewardModelError, UpdaterBusy):
                raise
            except Exception as e:  # a missing log dir or a transient read error must not kill the service
                failures += 1
                UPDATES.labels(result="failed").inc()
                log.error("reward update failed", error=repr(e), failures=failures)
            poll = cfg.reward.poll_seconds
            stop.wait(backoff_seconds(failures + 1, poll, cap=max(poll, 300.0)))
    return done


def status(cfg: LooprlConfig) -> dict[str, Any]:
    """Published versions, the updater's watermark and its last decisions (read-only, no lock)."""
    reg = Registry(cfg.registry_dir)
    state_path = cfg.state_dir / "reward" / "state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else None
    history = read_history(cfg, last=5)
    return {
        "latest": reg.pointer(KIND, "latest"),
        "versions": [{"version": m.version, "status": m.status, "created_at": m.created_at.isoformat(),
                      "holdout_score": m.metrics.get("holdout_score"), "reason": m.reason} for m in reg.list(KIND)],
        "state": state,
        "recent_updates": [{k: h.get(k) for k in ("update", "decision", "version", "new_events", "trigger", "reason",
                                                  "prequential", "seconds")} for h in history],
    }
