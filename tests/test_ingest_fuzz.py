"""Property-based fuzzing of malformed events, into the Kafka topic (through the real consumer)
and into the HTTP collector. Every malformed event is dead-lettered or rejected with the reason
the reference parser gives; the process keeps running; the valid events around them are stored."""

from __future__ import annotations

import json
import threading
import uuid
from collections import Counter

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fixtures_kafka import ingest_config
from looprl.ingest.collector import create_app
from looprl.ingest.consumer import IngestConsumer
from looprl.ingest.schema import InvalidEvent, ThumbsEvent, TsWindow, encode_event, parse_event, validate_event
from looprl.ops.core.config import IngestConfig
from looprl.ingest.transport import make_producer
from looprl.storage.events import EventLog

MAX_EVENT_BYTES = 2048
MAX_TEXT = 300
# the consumer's and the collector's default ts window (fuzzed ts values are mostly far outside it)
TS_WINDOW = TsWindow(IngestConfig().ts_max_past_s, IngestConfig().ts_max_future_s)

_scalars = st.none() | st.booleans() | st.integers(-10, 2**66) | st.floats(allow_nan=False) | st.text(max_size=30)
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                           max_size=3), max_leaves=8)
_field_values = st.one_of(_scalars, st.just("x" * (MAX_TEXT + 5)), st.just(str(uuid.uuid4())),
                          st.just("2030-02-30T25:00:00"), st.just("9999-12-31T23:59:59-23:59"),
                          st.lists(_scalars, max_size=2))
_base = st.sampled_from([
    {"kind": "thumbs", "response_id": "r1", "up": True},
    {"kind": "rating", "response_id": "r1", "rating": 4},
    {"kind": "correction", "response_id": "r1", "corrected": "ok"},
    {"kind": "preference", "chosen_response_id": "a", "rejected_response_id": "b"},
    {"kind": "response", "response_id": "r1", "prompt": "p", "completion": "c", "model": "m"},
])


@st.composite
def mutated(draw) -> dict:
    """A valid event with one to three fields dropped, replaced or added."""
    obj = dict(draw(_base))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["drop", "set", "add"]))
        keys = sorted(obj)
        if op == "drop" and keys:
            obj.pop(draw(st.sampled_from(keys)))
        elif op == "set" and keys:
            obj[draw(st.sampled_from(keys))] = draw(_field_values)
        else:
            obj[draw(st.sampled_from(["schema_version", "event_id", "ts", "user_id", "messages", "extra"]))] = \
                draw(_field_values)
    return obj


payloads = st.one_of(
    st.binary(max_size=80),
    _json.map(lambda v: json.dumps(v).encode()),
    mutated().map(lambda o: json.dumps(o).encode()),
    st.just(b'{"kind": "thumbs", "response_id": "r", "up": true, "pad": "' + b"p" * MAX_EVENT_BYTES + b'"}'),
    st.just(b"\xc3\x28{}"),
)


def expected(raw: bytes) -> tuple[str, object]:
    """What the reference parser says of a record on the feedback topic: ("ok", event) or
    ("dead", reason); a valid response there is in the wrong place."""
    try:
        event = parse_event(raw, max_bytes=MAX_EVENT_BYTES, max_text_chars=MAX_TEXT, ts_window=TS_WINDOW)
    except InvalidEvent as e:
        return "dead", e.reason
    return ("dead", "wrong_topic") if event.kind == "response" else ("ok", event)


@pytest.fixture(scope="module")
def topic_consumer(tmp_path_factory, kafka_bootstrap):
    run = uuid.uuid4().hex[:8]
    topics = {"topic_feedback": f"fuzz.fb.{run}", "topic_responses": f"fuzz.rs.{run}", "topic_dlq": f"fuzz.dlq.{run}",
              "group_id": f"fuzz-{run}"}
    cfg = ingest_config(tmp_path_factory.mktemp("fuzz"), kafka_bootstrap, topics, max_event_bytes=MAX_EVENT_BYTES,
                        max_text_chars=MAX_TEXT, batch_max_seconds=0.05)
    ic = IngestConsumer(cfg, kafka_bootstrap).start(broker_timeout=20)
    producer = make_producer(kafka_bootstrap, "confluent", linger_ms=1)
    yield cfg, ic, producer
    producer.close()
    ic.close()


def _consume(ic: IngestConsumer, n: int, timeout: float = 30.0) -> list:
    """Process batches until ``n`` records were handled."""
    import time

    results, seen = [], 0
    stop = threading.Event()
    deadline = time.monotonic() + timeout
    while seen < n and time.monotonic() < deadline:
        batch = ic.poll_batch(stop)
        if batch:
            r = ic.process(batch)
            results.append(r)
            seen += r.records
    assert seen == n, f"consumer handled {seen} of {n} records"
    return results


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(bad=st.lists(payloads, min_size=1, max_size=6), n_valid=st.integers(1, 3))
def test_malformed_events_on_the_topic_are_dead_lettered(topic_consumer, bad, n_valid):
    cfg, ic, producer = topic_consumer
    valid = [ThumbsEvent(response_id=f"r{i}", up=True) for i in range(n_valid)]
    # valid events before, between and after the malformed ones
    values = [encode_event(valid[0]), *bad, *(encode_event(v) for v in valid[1:])]
    errors: list = []
    for v in values:
        producer.send(cfg.kafka.topic_feedback, v, on_delivery=lambda e: e is not None and errors.append(e))
    assert producer.flush(20) == 0 and not errors

    results = _consume(ic, len(values))
    want = [expected(v) for v in values]
    want_dead = Counter(r for status, r in want if status == "dead")
    got_dead = Counter()
    for r in results:
        got_dead.update(r.dead)
    assert got_dead == want_dead
    # every valid event (the planted ones and any fuzzed payload that happens to be valid) is stored,
    # or recognised as already stored (a fuzzed payload may repeat a fixed event_id)
    n_ok = sum(status == "ok" for status, _ in want)
    assert sum(sum(r.stored.values()) + r.duplicates for r in results) == n_ok
    stored = set(EventLog(cfg.events_dir).query("SELECT event_id FROM feedback").column("event_id").to_pylist())
    assert {str(v.event_id) for v in valid} <= stored


@pytest.fixture(scope="module")
def collector(tmp_path_factory, kafka_bootstrap):
    run = uuid.uuid4().hex[:8]
    topics = {"topic_feedback": f"fuzzc.fb.{run}", "topic_responses": f"fuzzc.rs.{run}", "topic_dlq": f"fuzzc.dlq.{run}",
              "group_id": f"fuzzc-{run}"}
    cfg = ingest_config(tmp_path_factory.mktemp("fuzzc"), kafka_bootstrap, topics, max_event_bytes=MAX_EVENT_BYTES,
                        max_text_chars=MAX_TEXT, collector_max_body_bytes=8192, collector_token="fuzz-token")
    producer = make_producer(kafka_bootstrap, "confluent", linger_ms=1)
    accepted: list[str] = []
    with TestClient(create_app(cfg, producer)) as client:
        yield cfg, client, accepted
    producer.close()


def _collector_expectation(body: bytes) -> tuple[int, list]:
    try:
        obj = json.loads(body)
    except ValueError:
        return 400, []
    items = obj if isinstance(obj, list) else obj["events"] if isinstance(obj, dict) and set(obj) == {"events"} \
        else [obj]
    if not isinstance(items, list) or not items:
        return 400, []
    reasons = []
    for o in items:
        try:
            if isinstance(o, dict) and o.get("kind") == "response":  # answers come from serving only
                raise InvalidEvent("kind_not_accepted", "kind")
            e = validate_event(o, max_text_chars=MAX_TEXT, ts_window=TS_WINDOW)
            texts = ("prompt", "chosen_text", "rejected_text")
            if e.kind == "preference" and any(getattr(e, f) is not None for f in texts):
                raise InvalidEvent("texts_not_accepted", "texts")
            if len(encode_event(e)) > MAX_EVENT_BYTES:
                reasons.append("too_large")
        except InvalidEvent as err:
            reasons.append(err.reason)
    return (400, reasons) if reasons else (202, [])


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(body=st.one_of(
    payloads,
    st.lists(mutated(), min_size=1, max_size=4).map(lambda xs: json.dumps(xs).encode()),
    st.lists(mutated(), min_size=1, max_size=4).map(lambda xs: json.dumps({"events": xs}).encode()),
), valid=st.booleans())
def test_malformed_events_at_the_collector_are_rejected_with_a_reason(collector, body, valid):
    cfg, client, accepted = collector
    headers = {"Authorization": f"Bearer {cfg.ingest.collector_token.get_secret_value()}"}
    if valid:  # a valid request around the fuzzed one is always accepted
        r = client.post("/v1/feedback", json={"kind": "thumbs", "response_id": "r", "up": True}, headers=headers)
        assert r.status_code == 202
        accepted += r.json()["event_ids"]
    code, reasons = _collector_expectation(body)
    r = client.post("/v1/feedback", content=body, headers=headers)
    if len(body) > cfg.ingest.collector_max_body_bytes:
        assert r.status_code == 413
        return
    assert r.status_code == code, r.text
    if code == 400:
        errors = r.json()["errors"]
        assert errors and all(e["reason"] and e["detail"] for e in errors)
        if reasons:
            assert [e["reason"] for e in errors] == reasons
    else:
        accepted += r.json()["event_ids"]
    assert client.get("/health").status_code == 200  # still alive


def test_everything_the_collector_accepted_is_stored(collector, kafka_bootstrap):
    """Runs after the fuzz test above: the accepted events, and only they, reach the log."""
    cfg, _client, accepted = collector
    assert accepted
    ic = IngestConsumer(cfg, kafka_bootstrap).start(broker_timeout=20)
    try:
        totals = ic.run(idle_exit_s=1.5)
    finally:
        ic.close()
    assert totals.dead == 0
    log = EventLog(cfg.events_dir)
    stored = log.query("SELECT event_id FROM feedback UNION ALL SELECT event_id FROM responses").column("event_id")
    assert sorted(stored.to_pylist()) == sorted(set(accepted))
