"""Served answers reach the responses topic through the real ``ResponseLogger`` (skipped until the
ingest stage's client and ``kafka_bootstrap`` fixture exist)."""

from __future__ import annotations

import time

import httpx
import pytest

from looprl.ingest.schema import ResponseEvent, parse_event

from fixtures_serving import make_workspace, start_server

pytest.importorskip("looprl.ingest.client", reason="looprl.ingest.client not available yet")


@pytest.fixture
def bootstrap(request) -> str:
    try:
        return request.getfixturevalue("kafka_bootstrap")
    except pytest.FixtureLookupError:
        pytest.skip("kafka_bootstrap fixture not available yet")


def test_every_served_answer_is_on_the_responses_topic(bootstrap, serving_base, serving_adapters, tmp_path):
    from kafka import KafkaConsumer, TopicPartition

    from looprl.ingest.client import ResponseLogger

    ws = make_workspace(tmp_path, serving_adapters)
    topic = "looprl.responses"
    logger = ResponseLogger(bootstrap, topic=topic)
    srv = start_server(ws, serving_base, serving_adapters, logger=logger)
    try:
        ids = set()
        for prompt in ("first question", "second question"):
            r = httpx.post(f"{srv.url}/v1/completions", json={"model": "base", "prompt": prompt, "max_tokens": 4,
                                                              "user": "kafka-user"}, timeout=60)
            assert r.status_code == 200
            ids.add(r.json()["id"])
        logger.flush()
    finally:
        srv.thread.stop()
        logger.close()

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
                             consumer_timeout_ms=2000)
    try:
        deadline = time.monotonic() + 30
        parts = None
        while not parts and time.monotonic() < deadline:
            parts = consumer.partitions_for_topic(topic)
            time.sleep(0.2)
        assert parts, f"topic {topic} does not exist"
        consumer.assign([TopicPartition(topic, p) for p in parts])
        found: dict[str, ResponseEvent] = {}
        while ids - set(found) and time.monotonic() < deadline:
            for msg in consumer:
                ev = parse_event(msg.value)
                if isinstance(ev, ResponseEvent) and ev.response_id in ids:
                    found[ev.response_id] = ev
    finally:
        consumer.close()
    assert set(found) == ids
    assert {e.adapter_version for e in found.values()} == {"base"}
    assert {e.user_id for e in found.values()} == {"kafka-user"}
