"""The incremental reward updater on feedback drawn from a known hidden preference."""

from __future__ import annotations

import json
import threading
import urllib.request
from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest
import torch
from prometheus_client import REGISTRY

from looprl.ops.core.chat import Chat
from looprl.ops.core.config import load_config
from looprl.ops.sim.feedback import INGEST_DELAY, SimulatedLog, heldout_pairs, simulate_feedback
from looprl.reward import updater as U
from looprl.reward.data import FeedbackSource, is_holdout
from looprl.reward.model import KIND, load_reward_model
from looprl.reward.state import CONSUMED_LOG, StateStore, UpdaterState, stamp
from looprl.reward.train import EvalResult, auc
from looprl.storage.registry import Registry

torch.set_num_threads(1)
# Tests that count a slice exactly: simulate_feedback's 8 users would each exceed the default
# reward.max_user_share of a small slice (tests/test_forged_feedback.py tests the cap).
NO_CAP = {"max_user_share": 1.0}


@pytest.fixture
def setup(tmp_path, tiny_base):
    def make(**reward):
        cfg = load_config(environ={}, workspace=tmp_path / "ws", model={"base_path": str(tiny_base)},
                          reward={"min_new_events": 10, "poll_seconds": 0.2, **reward})
        return cfg, SimulatedLog(tmp_path / "events")

    return make


def consumed_lines(cfg) -> list[str]:
    path = cfg.state_dir / "reward" / "consumed.log"
    return [line.split("\t")[1] for line in path.read_text().splitlines()] if path.is_file() else []


def metric(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_auc_helper():
    assert auc([0.1, 0.2, 0.9, 0.8], [0, 0, 1, 1]) == 1.0
    assert auc([0.9, 0.8, 0.1, 0.2], [0, 0, 1, 1]) == 0.0
    assert auc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5  # ties count one half
    assert auc([0.3, 0.4], [1, 1]) is None


def test_learns_the_hidden_preference_incrementally(setup):
    cfg, views = setup()
    published_before = metric("looprl_reward_updates_total", result="published")
    results = []
    with U.RewardUpdater(cfg, connect=views.connect) as up:
        for i in range(8):
            views.append(simulate_feedback(100, seed=i))
            results.append(up.update())
        assert up.update() is None  # nothing new: no update, no version
    assert [r.update for r in results] == list(range(1, 9))
    first = results[0].prequential["pair_accuracy"]
    late = [r.prequential["pair_accuracy"] for r in results[-2:]]
    # Chance is 0.5 (the untrained head ranks pairs at random: measured 0.4-0.6). The hidden
    # preference is a clean rule (more cheerful words wins) that the model learns within ~4 updates
    # of 100 events; in development runs late prequential accuracy was 0.86-1.0, so 0.75 is a
    # margin of >3 standard errors (~45 pairs per slice) above chance and below typical values.
    assert 0.25 <= first <= 0.75
    assert sum(late) / len(late) >= 0.75, [r.prequential for r in results]
    assert results[0].decision == "published" and results[0].version == "v1"
    # The published model ranks fresh pairs (held-out prompt templates) correctly.
    rm = load_reward_model(cfg)
    pairs = heldout_pairs(200, seed=99)
    good = rm.score([p for p, _, _ in pairs], [c for _, c, _ in pairs])
    bad = rm.score([p for p, _, _ in pairs], [r for _, _, r in pairs])
    acc = (good > bad).float().mean().item()
    assert acc >= 0.75, acc  # measured 0.80 here; 0.67-0.89 over reward.seed 0-3 (0.58-0.78 with "last_match")
    # Every event consumed exactly once; the history and the manifests record every decision.
    ids = consumed_lines(cfg)
    assert len(ids) == len(set(ids)) == sum(r.new_events for r in results)
    hist = [json.loads(x) for x in (cfg.state_dir / "reward_history.jsonl").read_text().splitlines()]
    assert [h["update"] for h in hist] == list(range(1, 9))
    assert all(h["decision"] in ("published", "rejected") and h["reason"] for h in hist)
    published = [r for r in results if r.decision == "published"]
    manifests = Registry(cfg.registry_dir).list(KIND)
    assert [m.version for m in manifests] == [r.version for r in published]
    assert all(m.metrics["holdout_score"] is not None and m.status == "published" for m in manifests[1:])
    assert manifests[-1].watermark["consumed_events"] == sum(r.new_events for r in results if r.update <= manifests[-1].extra["update"])
    assert metric("looprl_reward_updates_total", result="published") - published_before == len(published)
    assert metric("looprl_reward_published_version_number") == int(manifests[-1].version[1:])
    # The records carry the counts the confidence bounds need, and the skill gauge is measured.
    assert {"pairs_correct", "points_pos", "points_neg", "point_auc"} <= set(hist[-1]["prequential"])
    assert manifests[-1].metrics["holdout_pairs_correct"] <= manifests[-1].metrics["holdout_pairs"]
    assert 0.5 < metric("looprl_reward_skill_lower_bound_ratio") < 1
    assert rm.n_heads == cfg.reward.ensemble_heads == 4


def _record_trained(monkeypatch) -> list[str]:
    """The event ids every update trains on, in order (the updater's train is wrapped, not replaced)."""
    trained: list[str] = []
    real_train = U.train

    def spy(model, examples, **kw):
        trained.extend(e.event_id for e in examples)
        return real_train(model, examples, **kw)

    monkeypatch.setattr(U, "train", spy)
    return trained


def test_exactly_once_across_restarts_and_holdout_never_trained(setup, monkeypatch):
    cfg, views = setup(holdout_fraction=0.3, epochs_per_update=1, **NO_CAP)
    trained = _record_trained(monkeypatch)
    views.append(simulate_feedback(40, seed=1))
    with U.RewardUpdater(cfg, connect=views.connect) as up:
        r1 = up.update()
    views.append(simulate_feedback(30, seed=2))
    with U.RewardUpdater(cfg, connect=views.connect) as up:  # a restarted process
        assert up.state.update == 1
        r2 = up.update()
        assert up.update() is None
    assert (r1.update, r2.update) == (1, 2)
    assert r1.new_events + r2.new_events == 70
    ids = consumed_lines(cfg)
    assert len(ids) == len(set(ids)) == 70
    new_trained = Counter(trained)
    # Held-out events are consumed but never trained on (not even through replay).
    assert not [e for e in new_trained if is_holdout(e, 0.3)]
    assert r1.holdout_new + r2.holdout_new == sum(is_holdout(e, 0.3) for e in ids) > 0
    # Replay draws from history only: in update 2 every replayed id was consumed in update 1.
    assert r2.replay > 0 and r1.replay == 0


def test_the_working_model_keeps_its_adapters_across_restarts(setup):
    cfg, views = setup(epochs_per_update=1, ensemble_heads=2, ensemble_adapters=2, **NO_CAP)
    views.append(simulate_feedback(30, seed=3))
    with U.RewardUpdater(cfg, connect=views.connect) as up:
        r1 = up.update()
        assert up.model.n_adapters == 2
        state = up.model.trainable_state()
    assert r1.decision == "published" and load_reward_model(cfg).n_adapters == 2
    # Restarted with a configuration that now says three: the trained working model is kept as
    # it is (three would load two trained adapters and a fresh one), and trains on.
    cfg3, _ = setup(epochs_per_update=1, ensemble_heads=2, ensemble_adapters=3, **NO_CAP)
    views.append(simulate_feedback(30, seed=4))
    with U.RewardUpdater(cfg3, connect=views.connect) as up:
        assert up.model.n_adapters == 2
        assert all(torch.equal(v, up.model.trainable_state()[k]) for k, v in state.items())
        r2 = up.update()
        assert r2.update == 2 and up.model.n_adapters == 2


def test_min_new_events_and_unresolved_feedback(setup):
    cfg, views = setup(min_new_events=20, holdout_fraction=0.0, epochs_per_update=1, max_wait_seconds=0, **NO_CAP)
    batch = simulate_feedback(30, seed=5, mix={"thumbs": 1.0})
    unresolved, resolved = batch.feedback[0], batch.feedback[1:]
    responses = batch.responses
    # The thumbs arrives before the response it is about.
    views.append([unresolved, *resolved[:10], *(responses[e.response_id] for e in resolved[:10])])
    with U.RewardUpdater(cfg, connect=views.connect) as up:
        assert up.backlog() == 10  # the unresolved event is not trainable yet
        assert up.update() is None  # 10 < min_new_events
        r = up.update(force=True)
        assert r.new_events == 10 and str(unresolved.event_id) not in consumed_lines(cfg)
        # The response arrives: the feedback event resolves and is consumed by the next update.
        views.append([responses[unresolved.response_id], *resolved[10:],
                      *(responses[e.response_id] for e in resolved[10:])])
        r = up.update()
        assert r.new_events == 20 and str(unresolved.event_id) in consumed_lines(cfg)


def _eval(wrong: int, n: int = 40, thumbs_pos: list[float] | None = None, ids: list[str] | None = None) -> EvalResult:
    """An evaluation on held-out pairs ``ids`` (default p0..p<n-1>), the first ``wrong`` of them
    ranked wrong, and optionally on points with these positives' placement values."""
    ids = ids or [f"p{i}" for i in range(n)]
    per = {e: (0.0 if i < wrong else 1.0) for i, e in enumerate(ids)}
    res = EvalResult(pairs=len(ids), pair_accuracy=sum(per.values()) / len(ids), pairs_correct=sum(per.values()),
                     per_example=per)
    if thumbs_pos is not None:
        res.per_point = {**{f"t+{i}": (True, v) for i, v in enumerate(thumbs_pos)},
                         **{f"t-{i}": (False, 1 - v) for i, v in enumerate(thumbs_pos)}}
    return res


def test_publish_decision_and_rejection(setup, monkeypatch):
    cfg, views = setup(publish_margin=0.02, epochs_per_update=1, **NO_CAP)
    up = U.RewardUpdater(cfg, connect=views.connect)
    assert up._decide(_eval(12), None)[0] is True
    # An insignificant drop on the same events (2 of 40 pairs flipped) is published: small
    # increments move held-out numbers by noise.
    ok, reason = up._decide(_eval(2), _eval(0))
    assert ok is True and "not confidently worse: held-out skill change -0.0500" in reason, reason
    assert "on 40 pairs" in reason
    # A significant one (15 of 40 flipped) is refused, the numbers named.
    ok, reason = up._decide(_eval(15), _eval(0))
    assert ok is False and "confidently worse: held-out skill change -0.3750" in reason, reason
    assert "< -margin 0.02" in reason
    # Points count too: the same small pair drop plus thumbs ranked far worse is refused.
    ok, reason = up._decide(_eval(2, thumbs_pos=[0.3] * 30), _eval(0, thumbs_pos=[0.8] * 30))
    assert ok is False and "30+/30- points" in reason, reason
    # No shared held-out event: nothing to be confidently worse on.
    assert up._decide(_eval(20, ids=["a"]), _eval(0, ids=["b"])) == (True, "no held-out events to compare on")

    views.append(simulate_feedback(30, seed=1))
    with up:
        assert up.update().version == "v1"
        # Force the candidate to rank every held-out pair wrong where v1 ranks it right.
        real = U.evaluate
        def fake(m, ex, **kw):  # prequential (the 30 new events) stays real; held-out is forced
            if len(ex) == 30:
                return real(m, ex, **kw)
            ids = [f"p{i}" for i in range(20)]
            return _eval(20, ids=ids) if m is up.model else _eval(0, ids=ids)

        monkeypatch.setattr(U, "evaluate", fake)
        views.append(simulate_feedback(30, seed=2))
        r = up.update()
    assert r.decision == "rejected" and r.version is None and "confidently worse" in r.reason, r
    assert Registry(cfg.registry_dir).pointer(KIND) == "v1" and len(Registry(cfg.registry_dir).versions(KIND)) == 1
    last = json.loads((cfg.state_dir / "reward_history.jsonl").read_text().splitlines()[-1])
    assert last["decision"] == "rejected" and last["candidate"]["score"] == 0.0
    # The rejected update's events are consumed all the same (the working model learnt them).
    assert len(consumed_lines(cfg)) == 60


def test_a_small_slice_updates_once_its_oldest_event_has_waited(setup):
    cfg, views = setup(min_new_events=20, max_wait_seconds=60, holdout_fraction=0.0, epochs_per_update=1, **NO_CAP)
    batch = simulate_feedback(6, seed=4, mix={"thumbs": 1.0})
    views.append(batch)
    oldest = min(e.ts for e in batch.feedback) + INGEST_DELAY
    now = [oldest + timedelta(seconds=59)]
    with U.RewardUpdater(cfg, connect=views.connect, clock=lambda: now[0]) as up:
        assert up.update() is None  # 6 < 20 and nobody has waited a minute yet
        now[0] = oldest + timedelta(seconds=60)
        r = up.update()
        assert r is not None and r.new_events == 6 and r.trigger == "waited"
        assert up.update() is None  # nothing waiting
    off = cfg.model_copy(update={"reward": cfg.reward.model_copy(update={"max_wait_seconds": 0.0})})
    views.append(simulate_feedback(6, seed=5, mix={"thumbs": 1.0}, start=oldest + timedelta(hours=1)))
    with U.RewardUpdater(off, connect=views.connect, clock=lambda: oldest + timedelta(days=30)) as up:
        assert up.update() is None  # 0: off, however long they wait


def test_second_updater_is_refused(setup):
    cfg, views = setup()
    with U.RewardUpdater(cfg, connect=views.connect):
        with pytest.raises(U.UpdaterBusy, match="another reward updater"):
            U.RewardUpdater(cfg, connect=views.connect).open()


def test_a_failed_open_releases_the_lock(tmp_path):
    cfg = load_config(environ={}, workspace=tmp_path / "ws")  # no `looprl init` yet
    with pytest.raises(FileNotFoundError, match="run `looprl init`"):
        U.RewardUpdater(cfg).open()
    with pytest.raises(FileNotFoundError):  # not UpdaterBusy: the failed open let go of its lock
        U.RewardUpdater(cfg).open()


def test_serve_follows_the_log_and_exports_metrics(setup):
    cfg, views = setup(epochs_per_update=1)
    views.append(simulate_feedback(30, seed=1))
    stop = threading.Event()
    done: list[int] = []
    t = threading.Thread(target=lambda: done.append(U.serve(cfg, max_updates=2, metrics_port=0, stop=stop,
                                                            connect=views.connect)), daemon=True)
    t.start()
    try:
        # The first update happens on its own; the second once more feedback arrives.
        for _ in range(600):
            if (cfg.state_dir / "reward_history.jsonl").is_file():
                break
            t.join(0.1)
        views.append(simulate_feedback(30, seed=2))
        t.join(120)
    finally:
        stop.set()
        t.join(10)
    assert done == [2]
    hist = (cfg.state_dir / "reward_history.jsonl").read_text().splitlines()
    assert len(hist) == 2
    assert metric("looprl_reward_backlog_events") == 0
    assert metric("looprl_reward_update_duration_seconds_count") >= 2


def test_metrics_endpoint(setup):
    from looprl.ops.core.metrics import serve_metrics

    cfg, views = setup(epochs_per_update=1)
    views.append(simulate_feedback(20, seed=1))
    with U.RewardUpdater(cfg, connect=views.connect) as up:
        up.update()
    port = serve_metrics(0)
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for name in ("looprl_reward_updates_total", "looprl_reward_examples_trained_total",
                 "looprl_reward_prequential_accuracy_ratio", "looprl_reward_train_loss_nats",
                 "looprl_reward_published_version_number", "looprl_reward_update_duration_seconds",
                 "looprl_reward_backlog_events"):
        assert name in body


def test_feedback_source_maps_event_kinds(setup):
    _, views = setup()
    batch = simulate_feedback(80, seed=7)
    views.append(batch)
    ex = FeedbackSource(views.connect()).new_examples(set())
    by_id = {e.event_id: e for e in ex}
    assert set(by_id) == set(batch.event_ids)
    assert {ev.kind for ev in batch.feedback} == {"thumbs", "rating", "correction", "preference"}
    for ev in batch.feedback:
        e = by_id[str(ev.event_id)]
        if ev.kind == "thumbs":
            assert e.label == (1.0 if ev.up else 0.0) and not e.is_pair
        elif ev.kind == "rating":
            assert e.label == (ev.rating - 1) / 4
        elif ev.kind == "correction":
            assert e.is_pair and e.chosen == ev.corrected and e.rejected == batch.responses[ev.response_id].completion
        else:
            assert (e.prompt, e.chosen, e.rejected) == (Chat.user(ev.prompt), ev.chosen_text, ev.rejected_text)
    # Ordered by ingestion time, and already-consumed ids are excluded.
    assert [e.ingested_at for e in ex] == sorted(e.ingested_at for e in ex)
    assert len(FeedbackSource(views.connect()).new_examples(set(list(by_id)[:30]))) == len(ex) - 30


def test_cli_update_and_status(setup, monkeypatch, capsys, tmp_path):
    from looprl.ops.cli import main

    cfg, views = setup(**NO_CAP)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LOOPRL_MODEL__BASE_PATH", str(cfg.model.base_path))
    monkeypatch.setenv("LOOPRL_REWARD__EPOCHS_PER_UPDATE", "1")
    monkeypatch.setenv("LOOPRL_REWARD__MAX_USER_SHARE", "1.0")
    monkeypatch.setattr(U, "connect_event_log", lambda events_dir: views.connect())
    ws = ["--workspace", str(cfg.workspace)]
    assert main(ws + ["reward", "update", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out) == {"status": "no new events"}
    views.append(simulate_feedback(40, seed=3))
    assert main(ws + ["reward", "update", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["update"] == 1 and out["new_events"] == 40 and out["version"] == "v1"
    assert main(ws + ["reward", "status"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["latest"] == "v1" and st["state"]["update"] == 1 and st["recent_updates"][0]["decision"] == "published"


def test_queries_match_the_storage_views(tmp_path):
    """The updater's SQL runs against the real event-log views (columns of the storage contract)."""
    events = pytest.importorskip("looprl.storage.events")
    log = events.EventLog(tmp_path / "events")
    con = log.connect()
    try:
        src = FeedbackSource(con)
        assert src.new_examples(set()) == [] and src.count_new({"x"}) == 0
    finally:
        con.close()


def test_history_reader_skips_a_torn_line_and_takes_the_last_n(tmp_path):
    from looprl.reward.history import read_history, reward_history_path

    cfg = load_config(environ={}, workspace=tmp_path / "ws")
    assert read_history(cfg) == []  # no updater has run yet
    path = reward_history_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"update": i, "prequential": {"pair_accuracy": i / 10}} for i in range(1, 5)]
    # the last write was cut by SIGKILL mid-line
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"update": 5, "prequ')
    assert read_history(cfg) == rows
    assert [r["update"] for r in read_history(cfg, last=3)] == [3, 4]


def test_consumed_ids_are_bounded_by_a_floor_and_every_event_is_still_consumed_once(setup, monkeypatch):
    """Ids are remembered only for a window behind the newest consumed event; earlier events are
    consumed by the floor. No event is read as new twice (across a restart too), replay and the
    held-out set still draw on the forgotten history, and held-out events are never trained."""
    cfg, views = setup(holdout_fraction=0.3, epochs_per_update=1, min_new_events=5, max_user_share=1.0,
                       consumed_window_seconds=60.0)
    trained = _record_trained(monkeypatch)
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    batches = [simulate_feedback(30, seed=i, start=t0 + timedelta(hours=i)) for i in range(3)]  # hours apart
    results = []
    with U.RewardUpdater(cfg, connect=views.connect) as up:
        for b in batches[:2]:
            views.append(b)
            results.append(up.update())
            assert set(up.consumed) == set(b.event_ids)  # only this window's ids are remembered
            assert set(consumed_lines(cfg)) == set(b.event_ids)  # and logged
    views.append(batches[2])
    with U.RewardUpdater(cfg, connect=views.connect) as up:  # a restarted process
        assert up.state.consumed_floor == max(e.ts for e in batches[1].feedback) + INGEST_DELAY - timedelta(seconds=60)
        results.append(up.update())
        assert up.update() is None  # forgotten ids are not read as new
        assert up.backlog() == 0
    assert [r.new_events for r in results] == [30, 30, 30]
    assert results[-1].watermark["consumed_events"] == 90
    # Replay and the held-out set still cover the history whose ids were forgotten.
    first = set(batches[0].event_ids)
    assert results[-1].holdout_size == sum(is_holdout(e, 0.3) for b in batches for e in b.event_ids)
    replayed_from_first = [e for e in trained[-(results[-1].replay):] if e in first] if results[-1].replay else []
    assert results[-1].replay > 0 and replayed_from_first
    assert not [e for e in trained if is_holdout(e, 0.3)]
    # An event ingested before the floor that arrives late is consumed by the floor: never trained.
    late = simulate_feedback(5, seed=9, start=t0)
    views.append(late)
    with U.RewardUpdater(cfg, connect=views.connect) as up:
        assert up.backlog() == 0 and up.update(force=True) is None


def test_state_store_forgets_ids_before_the_floor(tmp_path):
    store = StateStore(tmp_path)
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    store.append_consumed(1, [("old", t0), ("edge", t0 + timedelta(seconds=10))])
    store.append_consumed(2, [("new", t0 + timedelta(seconds=20))])
    store.append_consumed(3, [("uncommitted", t0 + timedelta(seconds=30))])
    path = store.dir / CONSUMED_LOG
    with open(path, "a") as f:
        f.write("1\tlegacy\n")  # written before lines carried a stamp: kept, its time is unknown
    state = UpdaterState(update=2, consumed_floor=t0 + timedelta(seconds=10))
    got = store.load_consumed(state)
    assert got == {"edge": stamp(t0 + timedelta(seconds=10)), "new": stamp(t0 + timedelta(seconds=20)), "legacy": ""}
    assert [line.split("\t")[1] for line in path.read_text().splitlines()] == ["edge", "new", "legacy"]
    assert stamp(t0) < stamp(t0 + timedelta(microseconds=1)) < stamp(t0 + timedelta(seconds=1))
