"""Forged training data (issue 30, finding 2). The attack: one fake response tagged
``adapter_version: v9`` plus 60 thumbs-up made the canary count 60/60 for v9. Each test plays a
part of it and shows it refused, and shows the honest feedback around it still counted."""

from __future__ import annotations

import json
import random
from datetime import datetime, timedelta, timezone

import pytest
from fastapi.testclient import TestClient

from kafka_testing import RecordingProducer
from looprl.ingest.collector import create_app
from looprl.ingest.consumer import IngestConsumer, IngestError
from looprl.ingest.decode import Columns
from looprl.ingest.schema import (
    CorrectionEvent, PreferenceEvent, RatingEvent, ResponseEvent, ThumbsEvent, encode_event, parse_event,
)
from looprl.ingest.transport import Record
from looprl.ops.canary import Arm, event_log_counts
from looprl.ops.core.config import ConfigError, load_config
from looprl.ops.demo import DEMO_TUNING
from looprl.reward.data import FeedbackSource
from looprl.serving.routing import bucket
from looprl.storage.events import EventLog, cap_by_voter, voter_cap
from looprl.storage.parts import PartWriter


NOW = datetime.now(timezone.utc)


class FakeConsumer:
    def __init__(self):
        self.committed: list[dict] = []

    def commit(self, offsets):
        self.committed.append(offsets)

    def close(self):
        pass


@pytest.fixture
def cfg(tmp_path):
    return load_config(environ={}, workspace=tmp_path / "ws", ingest={"orphan_timeout_seconds": 60},
                       canary={"max_user_share": 0.1}, reward={"max_user_share": 0.1})


def consumer(cfg, dlq=None) -> IngestConsumer:
    cfg.events_dir.mkdir(parents=True, exist_ok=True)
    return IngestConsumer(cfg, "127.0.0.1:1", consumer=FakeConsumer(), dlq=dlq or RecordingProducer())


def records(topic: str, events: list, first_offset: int = 0) -> list[Record]:
    return [Record(topic, 0, first_offset + i, encode_event(e), str(e.event_id).encode()) for i, e in enumerate(events)]


def write(cfg, events, at: datetime = NOW) -> None:
    """Store ``events`` as ingest does, as one batch made durable at ``at``."""
    cols: dict[str, Columns] = {}
    for i, e in enumerate(events):
        cols.setdefault(e.kind, Columns(e.kind)).append(e, str(e.event_id), "looprl.feedback", 0, i)
    PartWriter(cfg.events_dir).write_batch({k: c.table(at) for k, c in cols.items()}, at)


def served(rid: str, user: str | None, version: str = "v9", completion: str = "a fine answer") -> ResponseEvent:
    return ResponseEvent(response_id=rid, prompt=f"prompt {rid}", completion=completion, model="policy",
                         adapter_version=version, user_id=user)


def counts(cfg, versions=("v9", "base")) -> dict[str, Arm]:
    return event_log_counts(cfg)(list(versions), 0.0)


# --------------------------------------------------------------------------- answers: serving only
def test_the_attack_through_kafka_forged_response_is_dead_lettered_and_counts_nothing(cfg):
    dlq = RecordingProducer()
    ic = consumer(cfg, dlq)
    forged = served("fake", None)
    votes = [ThumbsEvent(response_id="fake", up=True, user_id=f"sock-{i}") for i in range(60)]
    res = ic.process(records(cfg.kafka.topic_feedback, [forged, *votes]))
    assert res.dead == {"wrong_topic": 1} and res.stored == {"thumbs": 60}
    [(topic, value, _key, headers)] = dlq.sent
    assert topic == cfg.kafka.topic_dlq and value == encode_event(forged)
    assert headers["looprl-reason"] == "wrong_topic" and "kind='response'" in headers["looprl-detail"]
    assert cfg.kafka.topic_responses in headers["looprl-detail"]
    # the 60 votes are about an answer nobody served: unresolved, they count for no version
    assert counts(cfg) == {}
    assert FeedbackSource(EventLog(cfg.events_dir).connect()).new_examples(set()) == []


def test_each_topic_carries_its_own_kinds(cfg):
    dlq = RecordingProducer()
    ic = consumer(cfg, dlq)
    answer, vote = served("r1", "u1"), ThumbsEvent(response_id="r1", up=True, user_id="u1")
    misplaced_vote = ThumbsEvent(response_id="r1", up=False, user_id="u2")
    res = ic.process(records(cfg.kafka.topic_responses, [answer, misplaced_vote])
                     + records(cfg.kafka.topic_feedback, [vote], first_offset=2))
    assert res.stored == {"response": 1, "thumbs": 1} and res.dead == {"wrong_topic": 1}
    assert "kind='thumbs'" in dlq.sent[0][3]["looprl-detail"]
    assert counts(cfg, ["v9"]) == {"v9": Arm(0, 0)}  # one honest voter is not enough at a 0.1 share
    rows = EventLog(cfg.events_dir).query("SELECT response_id, up, voter FROM feedback_votes").to_pylist()
    assert rows == [{"response_id": "r1", "up": True, "voter": "u1"}]


def test_topics_must_differ(tmp_path):
    with pytest.raises(ConfigError, match="kafka.topic_responses"):
        load_config(environ={}, workspace=tmp_path, kafka={"topic_responses": "looprl.feedback"})
    with pytest.raises(ConfigError, match="kafka.topic_dlq"):
        load_config(environ={}, workspace=tmp_path, kafka={"topic_dlq": "looprl.responses"})


def test_the_collector_takes_feedback_only(cfg):
    rec = RecordingProducer()
    c = TestClient(create_app(cfg, rec))
    forged = {"kind": "response", "response_id": "fake", "prompt": "p", "completion": "c", "model": "policy",
              "adapter_version": "v9"}
    r = c.post("/v1/feedback", json=[{"kind": "thumbs", "response_id": "fake", "up": True}, forged])
    assert r.status_code == 400
    [err] = r.json()["errors"]
    assert (err["index"], err["reason"]) == (1, "kind_not_accepted") and err["detail"].startswith("kind:")
    r = c.post("/v1/feedback", json={"kind": "response", "response_id": "x"})  # refused whatever its fields
    assert r.json()["errors"][0]["reason"] == "kind_not_accepted"

    text_pair = {"kind": "preference", "prompt": "p", "chosen_text": "forged", "rejected_text": "b"}
    r = c.post("/v1/feedback", json=text_pair)
    assert r.status_code == 400 and r.json()["errors"][0]["reason"] == "texts_not_accepted"
    assert r.json()["errors"][0]["detail"].startswith("prompt, chosen_text, rejected_text:")
    ids_and_text = {"kind": "preference", "chosen_response_id": "a", "rejected_response_id": "b",
                    "chosen_text": "forged"}
    r = c.post("/v1/feedback", json=ids_and_text)
    assert r.status_code == 400 and r.json()["errors"][0]["detail"].startswith("chosen_text:")
    assert rec.sent == []

    # every feedback kind still goes through, to the feedback topic
    good = [{"kind": "thumbs", "response_id": "a", "up": True, "user_id": "u1"},
            {"kind": "rating", "response_id": "a", "rating": 4},
            {"kind": "correction", "response_id": "a", "corrected": "better"},
            {"kind": "preference", "chosen_response_id": "a", "rejected_response_id": "b", "user_id": "u1"}]
    r = c.post("/v1/feedback", json=good)
    assert r.status_code == 202 and r.json()["accepted"] == 4
    assert [t for t, *_ in rec.sent] == [cfg.kafka.topic_feedback] * 4
    metrics = c.get("/metrics").text
    assert 'looprl_ingest_collector_rejected_total{reason="kind_not_accepted"}' in metrics


def test_a_pair_naming_served_responses_takes_their_texts_and_text_pairs_still_train(cfg):
    write(cfg, [served("r1", "u1", completion="sunny!"), served("r2", "u1", completion="meh")])
    forged = PreferenceEvent(chosen_response_id="r2", rejected_response_id="r1", chosen_text="forged praise",
                             prompt="forged prompt", user_id="u1")
    annotation = PreferenceEvent(prompt="p", chosen_text="good", rejected_text="bad")  # a trusted Kafka producer
    write(cfg, [forged, annotation])
    pj = {r["event_id"]: r for r in EventLog(cfg.events_dir).query("SELECT * FROM preferences_joined").to_pylist()}
    assert (pj[str(forged.event_id)]["prompt"], pj[str(forged.event_id)]["chosen"]) == ("prompt r2", "meh")
    assert (pj[str(annotation.event_id)]["chosen"], pj[str(annotation.event_id)]["rejected"]) == ("good", "bad")
    ex = FeedbackSource(EventLog(cfg.events_dir).connect()).new_examples(set())
    assert {(e.chosen, e.rejected) for e in ex} == {("meh", "sunny!"), ("good", "bad")}


# --------------------------------------------------------------------------- one vote per (response, user)
def test_one_vote_per_response_and_user_the_latest_wins(cfg):
    users = [f"u{i}" for i in range(12)]
    write(cfg, [served(f"r{i}", u) for i, u in enumerate(users)] + [served("r-anon", None)])
    t = NOW - timedelta(minutes=5)
    votes = [ThumbsEvent(response_id=f"r{i}", up=True, user_id=u, ts=t) for i, u in enumerate(users)]
    # user ids invented for one answer: they count as the user it was served to (u0), once
    flood = [ThumbsEvent(response_id="r0", up=True, user_id=f"sock-{i}", ts=t + timedelta(seconds=i))
             for i in range(59)]
    changed_mind = ThumbsEvent(response_id="r1", up=False, user_id="u1", ts=t + timedelta(minutes=1))
    # no user_id: the user it was served to (r2 -> u2, whose earlier vote this replaces)
    unnamed = ThumbsEvent(response_id="r2", up=False, ts=t + timedelta(minutes=1))
    anonymous = [ThumbsEvent(response_id="r-anon", up=True, ts=t) for _ in range(30)]  # one voter per answer
    write(cfg, [*votes, *flood, changed_mind, unnamed, *anonymous])
    assert counts(cfg) == {"v9": Arm(ups=11, n=13)}  # 12 users, one each, plus one anonymous vote

    # a later vote that arrived first (ingested earlier) still wins by its own time
    late_first = RatingEvent(response_id="r3", rating=5, user_id="u3", ts=t + timedelta(minutes=2))
    write(cfg, [late_first], at=NOW - timedelta(minutes=1))
    write(cfg, [RatingEvent(response_id="r3", rating=1, user_id="u3", ts=t)])
    ex = FeedbackSource(EventLog(cfg.events_dir).connect()).new_examples(set())
    thumbs = {e.prompt.key(): e.label for e in ex if e.kind == "thumbs"}
    assert len(thumbs) == 13 and thumbs["prompt r1"] == 0.0 and thumbs["prompt r2"] == 0.0
    assert [e.label for e in ex if e.kind == "rating"] == [1.0]


def test_a_changed_preference_replaces_the_first(cfg):
    write(cfg, [served("a", "u1", completion="first"), served("b", "u1", completion="second")])
    t = NOW - timedelta(minutes=1)
    write(cfg, [PreferenceEvent(chosen_response_id="a", rejected_response_id="b", user_id="u1", ts=t),
                PreferenceEvent(chosen_response_id="b", rejected_response_id="a", ts=t + timedelta(seconds=5)),
                PreferenceEvent(chosen_response_id="a", rejected_response_id="b", user_id="sock",
                                ts=t + timedelta(seconds=3))])
    ex = FeedbackSource(EventLog(cfg.events_dir).connect()).new_examples(set())
    # all three are u1's (the answers were served to u1): the latest, a changed mind, counts
    assert [(e.chosen, e.rejected) for e in ex] == [("second", "first")]

# --------------------------------------------------------------------------- one user's share
def test_voter_cap():
    assert voter_cap([], 0.1) == 0
    assert voter_cap([50], 0.5) == 0  # a lone voter never holds at most half
    assert voter_cap([1] * 10, 0.1) == 1 and voter_cap([1] * 9, 0.1) == 0
    assert voter_cap([60] + [1] * 9, 0.1) == 1
    assert voter_cap([60] + [1] * 9, 0.5) == 9
    assert voter_cap([7, 3], 1.0) == 7
    rng = random.Random(0)
    for _ in range(300):
        cs, share = [rng.randint(1, 40) for _ in range(rng.randint(1, 15))], rng.choice([0.1, 0.25, 0.3, 0.5, 0.9])
        m = voter_cap(cs, share)
        kept = [min(c, m) for c in cs]
        assert max(kept) <= share * sum(kept) + 1e-9  # nobody above the share of what is kept
        if m < max(cs):  # and one more each would break it
            more = [min(c, m + 1) for c in cs]
            assert max(more) > share * sum(more)


def test_cap_by_voter_keeps_each_voters_first_items():
    items = [("flood", i) for i in range(5)] + [(f"u{i}", 0) for i in range(4)] + [("flood", 5)]
    assert cap_by_voter(items, lambda x: x[0], 0.25) == [("flood", 0), *[(f"u{i}", 0) for i in range(4)]]


def test_the_canary_caps_each_users_share_of_an_arm(cfg):
    flood = [served(f"f{i}", "mallory") for i in range(60)]
    honest = [served(f"h{i}", f"u{i}") for i in range(9)]
    write(cfg, flood + honest)
    write(cfg, [ThumbsEvent(response_id=r.response_id, up=True, user_id="mallory") for r in flood])
    assert counts(cfg) == {"v9": Arm(0, 0)}  # one voter alone decides nothing
    write(cfg, [ThumbsEvent(response_id=r.response_id, up=False, user_id=r.user_id) for r in honest])
    assert counts(cfg) == {"v9": Arm(ups=1, n=10)}  # mallory counts once, like each of the others
    wide = cfg.model_copy(update={"canary": cfg.canary.model_copy(update={"max_user_share": 0.5})})
    assert counts(wide) == {"v9": Arm(ups=9, n=18)}


def test_reward_slices_cap_a_users_share_and_defer_the_rest(cfg):
    write(cfg, [served(f"f{i}", "mallory") for i in range(30)])
    write(cfg, [ThumbsEvent(response_id=f"f{i}", up=True, user_id="mallory") for i in range(30)])
    con = EventLog(cfg.events_dir).connect()
    src = FeedbackSource(con, max_user_share=0.1)
    assert src.new_examples(set()) == [] and src.count_new(set()) == 30  # waiting, not dropped
    later = NOW + timedelta(seconds=1)
    write(cfg, [served(f"h{u}-{j}", f"u{u}") for u in range(10) for j in range(3)], at=later)
    write(cfg, [ThumbsEvent(response_id=f"h{u}-{j}", up=False, user_id=f"u{u}") for u in range(10) for j in range(3)],
          at=later)
    first = src.new_examples(set())
    assert len(first) == 33 and sum(e.label == 1.0 for e in first) == 3  # 3 of mallory's 30
    consumed = {e.event_id for e in first}
    assert src.count_new(consumed) == 27 and src.new_examples(consumed) == []
    assert len(FeedbackSource(con).new_examples(consumed)) == 27  # no cap: they were never lost
    with pytest.raises(ValueError, match="max_user_share"):
        FeedbackSource(con, max_user_share=0)


def test_the_demo_users_stay_under_the_caps():
    """The demo's 8 simulated users (``demo.users``), split by the sticky canary hash at the demo's
    50 % share, leave every one of their votes counted."""
    users = [f"user-{i}" for i in range(load_config(environ={}).demo.users)]
    share = DEMO_TUNING["canary.traffic_share"]
    alias = load_config(environ={}).serving.alias
    arms = [[u for u in users if (bucket(alias, u) < share) == on_canary] for on_canary in (True, False)]
    assert [len(a) for a in arms] == [4, 4]
    # uneven clicks within an arm (one user with twice another's votes) are still all counted
    assert voter_cap([10, 8, 6, 5], DEMO_TUNING["canary.max_user_share"]) == 10
    assert voter_cap([9, 7, 6, 6, 6, 5, 5, 4], DEMO_TUNING["reward.max_user_share"]) == 9


# --------------------------------------------------------------------------- orphan feedback
def test_orphan_feedback_waits_then_goes_to_the_dlq_once(cfg):
    # The sweeps get this clock: NOW is taken at import, minutes earlier in a full run.
    now = datetime.now(timezone.utc)
    old, recent = now - timedelta(seconds=120), now - timedelta(seconds=10)
    orphan = ThumbsEvent(response_id="gone", up=True, user_id="u1")
    half_orphan = PreferenceEvent(chosen_response_id="r1", rejected_response_id="gone2", user_id="u1")
    fine = [served("r1", "u1"), ThumbsEvent(response_id="r1", up=True, user_id="u1"),
            PreferenceEvent(prompt="p", chosen_text="a", rejected_text="b"),
            CorrectionEvent(response_id="r1", corrected="better")]
    write(cfg, [orphan, half_orphan, *fine], at=old)
    waiting = RatingEvent(response_id="late", rating=2)
    write(cfg, [waiting], at=recent)

    dlq = RecordingProducer()
    ic = consumer(cfg, dlq)
    assert ic.sweep_orphans(now=now) == 2
    got = {parse_event(value).event_id: (key, h) for _topic, value, key, h in dlq.sent}
    assert set(got) == {orphan.event_id, half_orphan.event_id}
    key, h = got[orphan.event_id]
    assert key == str(orphan.event_id).encode() and h["looprl-reason"] == "orphan_feedback"
    assert h["looprl-detail"].startswith("response_id=gone not in the log 60 s")
    assert h["looprl-source-topic"] == "looprl.feedback"
    assert got[half_orphan.event_id][1]["looprl-detail"].startswith("rejected_response_id=gone2 ")
    assert parse_event(dlq.sent[0][1]) in (orphan, half_orphan)  # the event itself, as stored

    assert ic.sweep_orphans(now=now) == 0  # once: the watermark moved past them
    assert ic.sweep_orphans(now=now + timedelta(seconds=120)) == 1  # the rating's wait is over now
    assert parse_event(dlq.sent[-1][1]).event_id == waiting.event_id

    # nothing lost: still in the log, and counted once its answer turns up after all
    log = EventLog(cfg.events_dir)
    assert log.query("SELECT count(*) AS n FROM feedback").column("n")[0].as_py() == 6
    write(cfg, [served("gone", "u1")])
    rows = log.query("SELECT prompt FROM feedback_votes WHERE response_id = 'gone'").to_pylist()
    assert rows == [{"prompt": "prompt gone"}]


def test_an_unacknowledged_orphan_sweep_is_retried(cfg):
    write(cfg, [ThumbsEvent(response_id="gone", up=True)], at=NOW - timedelta(seconds=120))
    with pytest.raises(IngestError):
        consumer(cfg, RecordingProducer(down=True)).sweep_orphans()
    dlq = RecordingProducer()
    assert consumer(cfg, dlq).sweep_orphans() == 1 and len(dlq.sent) == 1
    assert json.loads((cfg.state_dir / "ingest" / "orphan_sweep.json").read_text())["swept_until"]
