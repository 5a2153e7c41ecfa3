"""The producer SDK: events reach Kafka; failures are surfaced (never silently dropped)."""

from __future__ import annotations

import time

import pytest
from prometheus_client import REGISTRY
from pydantic import ValidationError

from looprl.ingest.broker import free_port
from looprl.ingest.client import DeliveryError, FeedbackClient, ResponseLogger
from looprl.ingest.schema import ResponseEvent, ThumbsEvent, parse_event

from test_ingest_consumer import read_topic

CLIENTS = ["confluent", "kafka-python"]


@pytest.mark.parametrize("client", CLIENTS)
def test_feedback_reaches_the_topic(kafka_bootstrap, kafka_topics, client):
    topic = kafka_topics["topic_feedback"]
    fb = FeedbackClient(kafka_bootstrap, topic=topic, client=client)
    ids = [fb.thumbs("r1", up=True, user_id="u1"), fb.rating("r1", 4), fb.correction("r1", "better"),
           fb.preference(chosen_response_id="r1", rejected_response_id="r2"),
           fb.preference(prompt="p", chosen_text="a", rejected_text="b")]
    t0 = time.monotonic()
    fb.close()
    assert time.monotonic() - t0 < 10 and fb.pending == 0
    msgs = read_topic(kafka_bootstrap, topic, len(ids))
    got = {str(parse_event(m.value()).event_id): m for m in msgs}
    assert set(got) == set(ids)
    assert all(m.key() == eid.encode() for eid, m in got.items())  # keyed by event id
    assert parse_event(got[ids[0]].value()) == ThumbsEvent(event_id=ids[0], response_id="r1", up=True, user_id="u1",
                                                           ts=parse_event(got[ids[0]].value()).ts)


@pytest.mark.parametrize("client", CLIENTS)
def test_unreachable_broker_flush_raises_listing_every_event(client):
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    seen: list[tuple[str, str]] = []
    before = REGISTRY.get_sample_value("looprl_ingest_sdk_failed_total", {"topic_role": "feedback"}) or 0.0
    t0 = time.monotonic()
    fb = FeedbackClient(dead, topic="t", client=client, delivery_timeout_s=1.5,
                        on_error=lambda ev, err: seen.append((str(ev.event_id), str(err))))
    ids = [fb.thumbs(f"r{i}", up=bool(i % 2)) for i in range(3)]
    assert time.monotonic() - t0 < 3.0, "sends must not block on an unreachable broker"
    with pytest.raises(DeliveryError) as e:
        fb.flush(timeout=10)
    assert sorted(e.value.event_ids) == sorted(ids)
    assert all(isinstance(ev, ThumbsEvent) for ev in e.value.events)  # handed back for a resend
    assert all(i in str(e.value) for i in ids) and "t" == e.value.topic
    assert sorted(i for i, _ in seen) == sorted(ids)
    after = REGISTRY.get_sample_value("looprl_ingest_sdk_failed_total", {"topic_role": "feedback"})
    assert after - before == 3
    fb.flush()  # the failures were handed over once; nothing is pending any more
    fb.close()


def test_response_logger_never_raises_on_log_but_flush_reports(kafka_bootstrap):
    dead = f"127.0.0.1:{free_port()}"
    rl = ResponseLogger(dead, delivery_timeout_s=1.0)
    ev = ResponseEvent(response_id="r", prompt="p", completion="c", model="m")
    assert rl.log(ev) == str(ev.event_id)
    with pytest.raises(DeliveryError) as e:
        rl.close(timeout=10)
    assert e.value.event_ids == [str(ev.event_id)]
    with ResponseLogger(kafka_bootstrap) as rl, pytest.raises(TypeError):
        rl.log(ThumbsEvent(response_id="r", up=True))
    assert rl.pending == 0  # nothing was sent


def test_bad_input_is_refused_before_sending(kafka_bootstrap, kafka_topics):
    fb = FeedbackClient(kafka_bootstrap, topic=kafka_topics["topic_feedback"])
    with pytest.raises(ValidationError, match="rating"):
        fb.rating("r1", 7)
    with pytest.raises(ValidationError, match="preference needs"):
        fb.preference(chosen_response_id="a")
    assert fb.pending == 0
    fb.close()
