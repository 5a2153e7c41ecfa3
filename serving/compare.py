"""Targeted comparisons: ask "which is better?" where the reward model is least sure.

A chat request with ``looprl_compare: "auto"`` (default ``serving.compare``; n = 1) may be
answered with two candidates of the same prompt, adapter and sampling parameters (the second
sampled with the next seed, as choice 1 of an n = 2 request). The newest published reward model
scores both in one batch; its ensemble members (``RewardModel.score_members``: (K, 2) scores)
each say which candidate they prefer. ``p`` = the share of members preferring the first (a tie
counts half). The comparison is asked when ``1 - serving.compare_max_confidence <= p <=
serving.compare_max_confidence`` (the members disagree) and the per-hour budget
(``serving.compare_per_hour``, a token bucket) has room; otherwise the second candidate is
discarded. A reward model without ``score_members`` gives no uncertainty: no comparison.

The reward model is loaded in a background thread, started by the first request that asks, and
reloaded when the registry's ``reward/latest`` pointer moves (checked every
``serving.compare_reload_seconds``); until one is loaded, nothing is compared and no second
candidate is generated. Every decision is counted in ``looprl_serving_comparisons_total{outcome}``.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from looprl.ops.core.log import get_logger
from looprl.serving import metrics as m

log = get_logger(__name__)

# Comparisons the budget holds at once: a minute's worth, at least one. Over any hour, at most
# per_hour + this many are asked.
BURST_SECONDS = 60.0


class Budget:
    """A token bucket: ``per_hour`` comparisons an hour on average, at most ``burst`` at once
    (default: a minute's worth, at least 1). ``clock``: seconds, monotonic (injectable for tests)."""

    def __init__(self, per_hour: float, burst: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.rate = per_hour / 3600.0
        self.capacity = burst if burst is not None else max(1.0, per_hour * BURST_SECONDS / 3600.0)
        if per_hour <= 0:
            self.capacity = 0.0
        self.clock = clock
        self.tokens = self.capacity
        self.at = clock()
        self._lock = threading.Lock()

    def _refill(self) -> None:
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + max(0.0, now - self.at) * self.rate)
        self.at = now

    def available(self) -> bool:
        with self._lock:
            self._refill()
            return self.tokens >= 1.0

    def take(self) -> bool:
        with self._lock:
            self._refill()
            if self.tokens < 1.0:
                return False
            self.tokens -= 1.0
            return True


@dataclass(frozen=True)
class Decision:
    ask: bool
    # asked | confident | over_budget | no_reward_model | no_ensemble | identical | failed
    outcome: str
    p_first_better: float | None = None  # share of ensemble members preferring the first candidate
    reward_version: str | None = None


def first_better_share(members: Any) -> float:
    """Share of ensemble members whose score of candidate 0 beats candidate 1 (ties: half).
    ``members``: (K, 2) scores."""
    import torch

    s = torch.as_tensor(members, dtype=torch.float32)
    if s.dim() != 2 or s.shape[1] != 2 or s.shape[0] < 1:
        raise ValueError(f"score_members must give (K, 2) scores, got shape {tuple(s.shape)}")
    d = s[:, 0] - s[:, 1]
    return float(((d > 0).float() + 0.5 * (d == 0).float()).mean())


class Comparer:
    """Decides whether to ask a comparison (``decide``). ``latest()``: the reward version to serve
    (None: none published); ``load(version)``: that reward model. ``scorer``: a ready model instead
    (no loader thread). Thread-safe; scoring is serialised (one reward model, a small CPU share)."""

    def __init__(self, *, max_confidence: float = 0.75, per_hour: float = 60.0,
                 latest: Callable[[], str | None] | None = None, load: Callable[[str], Any] | None = None,
                 reload_seconds: float = 10.0, clock: Callable[[], float] = time.monotonic,
                 scorer: Any = None, scorer_version: str | None = None):
        if not 0.5 <= max_confidence <= 1.0:
            raise ValueError(f"max_confidence must be in [0.5, 1], got {max_confidence}")
        if scorer is None and (latest is None or load is None):
            raise ValueError("Comparer needs a scorer, or latest() and load()")
        self.max_confidence = max_confidence
        self.budget = Budget(per_hour, clock=clock)
        self._latest, self._load = latest, load
        self.reload_seconds = reload_seconds
        self._model, self._version = scorer, scorer_version
        self._score_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    # ------------------------------------------------------------------ the reward model
    def start(self) -> None:
        """Start the loader thread (once; nothing to do with a given scorer)."""
        if self._load is None or self._thread is not None:
            return
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="looprl-compare-loader", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._stop.wait(self.reload_seconds)

    def refresh(self) -> None:
        """Load the reward version ``latest()`` names if it is not the one loaded."""
        try:
            version = self._latest()
        except Exception as e:
            log.warning("compare: cannot read the reward pointer", error=str(e)[:300])
            return
        if version is None or version == self._version:
            return
        try:
            model = self._load(version)
        except Exception as e:  # keep the previous model (or none): comparisons wait
            log.warning("compare: reward model not loaded", version=version, error=f"{type(e).__name__}: {e}"[:300])
            return
        with self._score_lock:
            self._model, self._version = model, version
        log.info("compare: reward model loaded", version=version, ensemble=hasattr(model, "score_members"))

    @property
    def version(self) -> str | None:
        return self._version

    # ------------------------------------------------------------------ decisions
    def worth_generating(self) -> str | None:
        """Before generating a second candidate: None if a comparison may be asked, else the
        outcome that rules it out (counted). Starts the loader on first use."""
        self.start()
        outcome = None
        if self._model is None:
            outcome = "no_reward_model"
        elif not hasattr(self._model, "score_members"):
            outcome = "no_ensemble"
        elif not self.budget.available():
            outcome = "over_budget"
        if outcome is not None:
            m.COMPARISONS.labels(outcome=outcome).inc()
        return outcome

    def decide(self, prompt: Any, first: str, second: str) -> Decision:
        """Whether to ask the user to compare ``first`` and ``second`` (answers to ``prompt``).
        Counted in ``looprl_serving_comparisons_total``; takes a budget token when it asks."""
        decision = self._decide(prompt, first, second)
        m.COMPARISONS.labels(outcome=decision.outcome).inc()
        return decision

    def _decide(self, prompt: Any, first: str, second: str) -> Decision:
        with self._score_lock:
            model, version = self._model, self._version
            if model is None:
                return Decision(False, "no_reward_model")
            if not hasattr(model, "score_members"):
                return Decision(False, "no_ensemble", reward_version=version)
            if first == second:
                return Decision(False, "identical", reward_version=version)
            try:
                p = first_better_share(model.score_members([prompt, prompt], [first, second]))
            except Exception as e:  # a broken scorer never fails the answer
                log.warning("compare: scoring failed", error=f"{type(e).__name__}: {e}"[:300])
                return Decision(False, "failed", reward_version=version)
        if not 1.0 - self.max_confidence <= p <= self.max_confidence:
            return Decision(False, "confident", p, version)
        if not self.budget.take():
            return Decision(False, "over_budget", p, version)
        return Decision(True, "asked", p, version)


def comparer_from_config(cfg: Any, clock: Callable[[], float] = time.monotonic) -> Comparer:
    """The ``Comparer`` of ``serving.compare_*``, on the registry's newest reward model (or
    ``reward.checkpoint_path``, loaded once)."""
    from looprl.reward.model import load_reward_model
    from looprl.storage.registry import Registry

    registry = Registry(cfg.registry_dir)
    fixed = cfg.reward.checkpoint_path is not None

    def latest() -> str | None:
        return "checkpoint" if fixed else registry.pointer("reward", "latest")

    def load(version: str) -> Any:
        return load_reward_model(cfg, None if fixed else version)

    s = cfg.serving
    return Comparer(max_confidence=s.compare_max_confidence, per_hour=s.compare_per_hour, latest=latest,
                    load=load, reload_seconds=s.compare_reload_seconds, clock=clock)
