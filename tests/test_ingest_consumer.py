"""The ingest consumer against the real embedded broker: validation, dead-lettering, dedupe,
Parquet, offsets committed only after the batch is durable, resume after restart."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timezone

import pytest
from prometheus_client import REGISTRY

from fixtures_kafka import ingest_config
from looprl.ingest.consumer import IngestConsumer
from looprl.ingest.schema import (
    CorrectionEvent, PreferenceEvent, RatingEvent, ResponseEvent, ThumbsEvent, encode_event,
)
from looprl.storage.events import EventLog


def produce(bootstrap: str, topic: str, values: list[bytes | None], keys: list[bytes | None] | None = None) -> None:
    from looprl.ingest.transport import make_producer

    p = make_producer(bootstrap, "confluent", linger_ms=1)
    errors: list[Exception] = []
    for i, v in enumerate(values):
        p.send(topic, v, key=keys[i] if keys else None, on_delivery=lambda e: e is not None and errors.append(e))
    assert p.flush(30) == 0 and not errors, errors
    p.close()


def read_topic(bootstrap: str, topic: str, n: int, timeout: float = 20.0) -> list:
    """The first ``n`` messages of ``topic`` (all partitions) as confluent Message objects."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    from looprl.ingest.transport import topic_partitions

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "test-reader", "enable.auto.commit": False})
    try:
        parts = topic_partitions(bootstrap, [topic]).get(topic, 0)
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(parts)])
        out, deadline = [], time.monotonic() + timeout
        while len(out) < n and time.monotonic() < deadline:
            out += [m for m in c.consume(100, 0.2) if m.error() is None]
        return out
    finally:
        c.close()


def ingest_until_idle(cfg, bootstrap: str, idle: float = 1.5, **kw) -> tuple[IngestConsumer, object]:
    ic = IngestConsumer(cfg, bootstrap, **kw).start(broker_timeout=20)
    stop = threading.Event()
    guard = threading.Timer(60, stop.set)  # never hang a test
    guard.start()
    try:
        totals = ic.run(stop, idle_exit_s=idle)
    finally:
        guard.cancel()
        ic.close()
    return ic, totals


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_valid_events_stored_once_invalid_ones_dead_lettered(tmp_path, kafka_bootstrap, kafka_topics):
    cfg = ingest_config(tmp_path, kafka_bootstrap, kafka_topics, max_event_bytes=2048)
    responses = [ResponseEvent(response_id=f"r{i}", prompt=f"prompt {i}", completion=f"answer {i}", model="policy",
                               adapter_version="v1") for i in range(20)]
    feedback = ([ThumbsEvent(response_id=f"r{i}", up=i % 2 == 0, user_id=f"u{i}") for i in range(20)]
                + [RatingEvent(response_id="r1", rating=4), CorrectionEvent(response_id="r2", corrected="better"),
                   PreferenceEvent(chosen_response_id="r3", rejected_response_id="r4")])
    resent = [encode_event(e) for e in feedback[:5]]  # a producer retry: same event ids again
    bad = {
        b"{oops": "bad_json",
        b'{"kind": "hug", "response_id": "r1"}': "unknown_kind",
        b'{"kind": "thumbs", "response_id": "r1", "up": "sure"}': "invalid_fields",
        b'{"kind": "thumbs", "response_id": "r1", "up": true, "schema_version": 99}': "unsupported_schema_version",
        json.dumps({"kind": "correction", "response_id": "r1", "corrected": "x" * 4000}).encode(): "too_large",
        b"[]": "not_an_object",
    }
    before = {k: sample("looprl_ingest_events_total", kind=k) for k in ("response", "thumbs", "rating")}
    before_dead = sample("looprl_ingest_dead_letters_total", reason="bad_json")
    before_dups = sample("looprl_ingest_duplicates_total")
    produce(kafka_bootstrap, cfg.kafka.topic_responses, [encode_event(e) for e in responses])
    values = [encode_event(e) for e in feedback[:10]] + list(bad) + [None] + [encode_event(e) for e in feedback[10:]]
    produce(kafka_bootstrap, cfg.kafka.topic_feedback, values + resent)
    t_start = datetime.now(timezone.utc)

    ic, totals = ingest_until_idle(cfg, kafka_bootstrap)
    assert totals.records == len(responses) + len(values) + len(resent)
    assert totals.stored == len(responses) + len(feedback)
    assert totals.duplicates == len(resent) and totals.dead == len(bad) + 1

    log = EventLog(cfg.events_dir)
    ids = log.query("SELECT event_id FROM feedback").column("event_id").to_pylist()
    assert sorted(ids) == sorted(str(e.event_id) for e in feedback)  # each exactly once
    rows = log.query("SELECT * FROM feedback_joined WHERE kind = 'thumbs' ORDER BY response_id").to_pylist()
    assert all(r["prompt"].startswith("prompt ") and r["adapter_version"] == "v1" for r in rows)
    assert all(r["ingested_at"] >= t_start for r in rows)
    assert log.query("SELECT count(*) AS n FROM preferences_joined WHERE chosen = 'answer 3'").column("n")[0].as_py() == 1

    # the dead-letter topic has the original bytes, the reason and where they came from
    dlq = read_topic(kafka_bootstrap, cfg.kafka.topic_dlq, len(bad) + 1)
    assert len(dlq) == len(bad) + 1
    got = {}
    for msg in dlq:
        h = {k: v.decode() for k, v in msg.headers()}
        assert h["looprl-source-topic"] == cfg.kafka.topic_feedback and int(h["looprl-source-offset"]) >= 0
        assert h["looprl-detail"]
        got[msg.value()] = h["looprl-reason"]
    assert got == {**bad, None: "bad_json"}

    assert sample("looprl_ingest_events_total", kind="response") - before["response"] == 20
    assert sample("looprl_ingest_events_total", kind="thumbs") - before["thumbs"] == 20
    assert sample("looprl_ingest_events_total", kind="rating") - before["rating"] == 1
    assert sample("looprl_ingest_dead_letters_total", reason="bad_json") - before_dead == 2
    assert sample("looprl_ingest_duplicates_total") - before_dups == len(resent)
    assert sample("looprl_ingest_last_batch_timestamp_seconds") >= t_start.timestamp()

    # restart: the committed offsets resume exactly, nothing is read twice
    _ic, again = ingest_until_idle(cfg, kafka_bootstrap, idle=1.0)
    assert again.records == 0
    produce(kafka_bootstrap, cfg.kafka.topic_feedback, [encode_event(ThumbsEvent(response_id="r5", up=True))])
    _ic, third = ingest_until_idle(cfg, kafka_bootstrap, idle=1.0)
    assert (third.records, third.stored) == (1, 1)


def test_replay_after_a_crash_before_commit_is_deduplicated(tmp_path, kafka_bootstrap, kafka_topics):
    """Durable write, then the process dies before committing: the replay stores nothing twice."""
    cfg = ingest_config(tmp_path, kafka_bootstrap, kafka_topics, batch_max_events=15)
    events = [ThumbsEvent(response_id=f"r{i}", up=True) for i in range(40)]
    produce(kafka_bootstrap, cfg.kafka.topic_feedback, [encode_event(e) for e in events])

    class NoCommit(IngestConsumer):
        def start(self, broker_timeout: float = 60.0):
            super().start(broker_timeout)
            self._consumer.commit = lambda offsets: None  # "killed" between rename and commit
            return self

    crashed = NoCommit(cfg, kafka_bootstrap).start()
    first = crashed.run(idle_exit_s=1.0, max_records=40)
    crashed.close()
    assert first.stored == 40 and len(EventLog(cfg.events_dir).files("thumbs")) >= 3

    _ic, replay = ingest_until_idle(cfg, kafka_bootstrap, idle=1.0)
    assert replay.records == 40 and replay.duplicates == 40 and replay.stored == 0
    n = EventLog(cfg.events_dir).query("SELECT count(*) AS n, count(DISTINCT event_id) AS d FROM feedback").to_pylist()
    assert n == [{"n": 40, "d": 40}]


@pytest.mark.parametrize("client", ["kafka-python"])
def test_the_other_client_library_ingests_the_same(tmp_path, kafka_bootstrap, kafka_topics, client):
    """``kafka.client = kafka-python``: same behaviour through the same seam (DLQ included)."""
    cfg = ingest_config(tmp_path, kafka_bootstrap, kafka_topics)
    cfg.kafka.client = client
    events = [ResponseEvent(response_id=f"r{i}", prompt="p", completion="c", model="m") for i in range(10)]
    produce(kafka_bootstrap, cfg.kafka.topic_responses, [encode_event(e) for e in events] + [b"nope"])
    _ic, totals = ingest_until_idle(cfg, kafka_bootstrap)
    assert (totals.records, totals.stored, totals.dead) == (11, 10, 1)
    [dead] = read_topic(kafka_bootstrap, cfg.kafka.topic_dlq, 1)
    assert dead.value() == b"nope" and dict(dead.headers())["looprl-reason"] == b"bad_json"
