"""Poison pills (issue 30, finding 3): a record the dead-letter topic cannot take must never hold
back the commit of the valid records around it. A 3 MiB record (Tansu accepts it) is over the DLQ
producer's 2 MiB limit; before the fix the consumer raised ``IngestError`` on it, never committed
the batch and crash-looped, so the valid events after it were never stored."""

from __future__ import annotations

import hashlib

import pytest
from prometheus_client import REGISTRY

from fixtures_kafka import ingest_config
from looprl.ingest.consumer import IngestError
from looprl.ingest.schema import ThumbsEvent, encode_event
from looprl.ingest.transport import DeliveryFailed, ensure_topics, make_producer
from looprl.storage.events import EventLog

from test_ingest_consumer import ingest_until_idle, read_topic

MiB = 1024 * 1024


def produce_large(bootstrap: str, topic: str, values: list[bytes]) -> None:
    """Produce ``values`` in order to one partition, allowing records up to 4 MiB."""
    p = make_producer(bootstrap, "confluent", linger_ms=1, max_request_bytes=4 * MiB)
    errors: list = []
    for v in values:
        p.send(topic, v, key=b"same-partition", on_delivery=lambda e: e is not None and errors.append(e))
    assert p.flush(30) == 0 and not errors, errors
    p.close()


def poison(size: int) -> bytes:
    """A thumbs event padded to ``size`` bytes: valid JSON, refused as too_large."""
    head = b'{"kind": "thumbs", "response_id": "r1", "up": true, "pad": "'
    return head + b"p" * (size - len(head) - 2) + b'"}'


def stored_ids(cfg) -> list[str]:
    return EventLog(cfg.events_dir).query("SELECT event_id FROM feedback").column("event_id").to_pylist()


def skipped_total(reason: str) -> float:
    return REGISTRY.get_sample_value("looprl_ingest_dlq_skipped_total", {"reason": reason}) or 0.0


class RefusingDLQ:
    """The DLQ producer in front of a real broker whose DLQ topic takes records of at most
    ``max_bytes`` (Kafka's ``max.message.bytes``, headers and key included), or that is down
    (every send times out). Records it lets through reach the real topic."""

    def __init__(self, inner, max_bytes: int | None = None, down: bool = False):
        self.inner, self.max_bytes, self.down = inner, max_bytes, down
        self.refused = 0

    def send(self, topic, value, key=None, headers=None, on_delivery=None):
        size = len(value or b"") + len(key or b"") + sum(len(k) + len(v) for k, v in headers or [])
        if self.down:
            on_delivery(DeliveryFailed("Local: Message timed out"))
        elif self.max_bytes is not None and size > self.max_bytes:
            self.refused += 1
            on_delivery(DeliveryFailed("Broker: Message size too large", permanent=True))
        else:
            self.inner.send(topic, value, key=key, headers=headers, on_delivery=on_delivery)

    def flush(self, timeout):
        return self.inner.flush(timeout)

    def close(self, timeout=5.0):
        self.inner.close(timeout)


def test_the_client_says_which_refusals_are_permanent(kafka_bootstrap, kafka_topics):
    """The seam tells a record refused for its size (never deliverable) from an outage."""
    topic = kafka_topics["topic_dlq"]
    ensure_topics(kafka_bootstrap, {topic: 1})  # kafka-python checks the size once it has the metadata
    results: list = []
    p = make_producer(kafka_bootstrap, "confluent", delivery_timeout_ms=5000)  # limit 2 MiB
    p.send(topic, b"x" * (3 * MiB), on_delivery=results.append)
    assert p.flush(10) == 0
    p.close()
    down = make_producer("127.0.0.1:1", "confluent", delivery_timeout_ms=500)
    down.send(topic, b"small", on_delivery=results.append)
    down.flush(5)
    down.close(timeout=1)
    kp = make_producer(kafka_bootstrap, "kafka-python", delivery_timeout_ms=5000)
    kp.send(topic, b"x" * (3 * MiB), on_delivery=results.append)
    assert kp.flush(20) == 0
    kp.close()
    assert [type(r).__name__ for r in results] == ["DeliveryFailed"] * 3
    assert [r.permanent for r in results] == [True, False, True]


def test_a_record_too_large_for_the_dlq_is_cut_and_its_neighbours_are_stored(tmp_path, kafka_bootstrap,
                                                                             kafka_topics):
    cfg = ingest_config(tmp_path, kafka_bootstrap, kafka_topics)
    valid = [ThumbsEvent(response_id=f"r{i}", up=True) for i in range(6)]
    big = poison(3 * MiB)
    produce_large(kafka_bootstrap, cfg.kafka.topic_feedback,
                  [*(encode_event(e) for e in valid[:3]), big, *(encode_event(e) for e in valid[3:])])

    _ic, totals = ingest_until_idle(cfg, kafka_bootstrap)
    assert (totals.records, totals.stored, totals.dead, totals.skipped) == (7, 6, 1, 0)
    assert sorted(stored_ids(cfg)) == sorted(str(e.event_id) for e in valid)
    [msg] = read_topic(kafka_bootstrap, cfg.kafka.topic_dlq, 1)
    h = dict(msg.headers())
    limit = cfg.ingest.dlq_max_bytes
    assert msg.value() == big[:limit] and h["looprl-reason"] == b"too_large"
    assert int(h["looprl-original-bytes"]) == len(big)
    assert h["looprl-original-sha256"].decode() == hashlib.sha256(big).hexdigest()
    # the batch was committed: a restart reads nothing again (no crash loop)
    _ic, again = ingest_until_idle(cfg, kafka_bootstrap, idle=1.0)
    assert again.records == 0


def test_a_dlq_refusing_a_record_gets_a_stub_and_one_refusing_even_that_is_skipped(tmp_path, kafka_bootstrap,
                                                                                  kafka_topics):
    cfg = ingest_config(tmp_path, kafka_bootstrap, kafka_topics, max_event_bytes=2048)
    valid = [ThumbsEvent(response_id=f"r{i}", up=True) for i in range(4)]
    bad = poison(64 * 1024)  # too_large for ingest, under dlq_max_bytes: sent whole, refused by the broker
    produce_large(kafka_bootstrap, cfg.kafka.topic_feedback,
                  [encode_event(valid[0]), bad, encode_event(valid[1])])

    # the DLQ topic takes at most 4 KiB per record: the full copy is refused, a stub goes through
    dlq = RefusingDLQ(make_producer(kafka_bootstrap, "confluent", client_id="test-dlq"), max_bytes=4096)
    _ic, totals = ingest_until_idle(cfg, kafka_bootstrap, dlq=dlq)
    assert dlq.refused == 1 and (totals.stored, totals.dead, totals.skipped) == (2, 1, 0)
    [stub] = read_topic(kafka_bootstrap, cfg.kafka.topic_dlq, 1)
    h = dict(stub.headers())
    assert stub.value() is None and h["looprl-reason"] == b"too_large"
    assert int(h["looprl-original-bytes"]) == len(bad) and b"too large" in h["looprl-dlq-error"]
    assert h["looprl-source-topic"].decode() == cfg.kafka.topic_feedback

    # a DLQ that refuses even the stub: the record is skipped (metric, error log), the batch committed
    produce_large(kafka_bootstrap, cfg.kafka.topic_feedback,
                  [encode_event(valid[2]), bad, encode_event(valid[3])])
    before = skipped_total("too_large")
    dlq = RefusingDLQ(make_producer(kafka_bootstrap, "confluent", client_id="test-dlq"), max_bytes=16)
    _ic, totals = ingest_until_idle(cfg, kafka_bootstrap, dlq=dlq)
    assert dlq.refused == 2 and (totals.records, totals.stored, totals.dead, totals.skipped) == (3, 2, 0, 1)
    assert skipped_total("too_large") - before == 1
    assert sorted(stored_ids(cfg)) == sorted(str(e.event_id) for e in valid)
    _ic, again = ingest_until_idle(cfg, kafka_bootstrap, idle=1.0)
    assert again.records == 0


def test_a_dlq_outage_is_never_committed_past(tmp_path, kafka_bootstrap, kafka_topics):
    """Not every DLQ failure is the record's fault: an outage leaves the batch uncommitted (its
    valid events are durable already), and the replay dead-letters it, storing nothing twice."""
    cfg = ingest_config(tmp_path, kafka_bootstrap, kafka_topics)
    valid = [ThumbsEvent(response_id=f"r{i}", up=True) for i in range(3)]
    produce_large(kafka_bootstrap, cfg.kafka.topic_feedback, [encode_event(valid[0]), b"{oops",
                                                              *(encode_event(e) for e in valid[1:])])
    down = RefusingDLQ(make_producer(kafka_bootstrap, "confluent", client_id="test-dlq"), down=True)
    with pytest.raises(IngestError, match="not committing"):
        ingest_until_idle(cfg, kafka_bootstrap, dlq=down)
    assert sorted(stored_ids(cfg)) == sorted(str(e.event_id) for e in valid)

    _ic, replay = ingest_until_idle(cfg, kafka_bootstrap)
    assert (replay.records, replay.duplicates, replay.dead, replay.stored) == (4, 3, 1, 0)
    [msg] = read_topic(kafka_bootstrap, cfg.kafka.topic_dlq, 1)
    assert msg.value() == b"{oops" and dict(msg.headers())["looprl-reason"] == b"bad_json"
