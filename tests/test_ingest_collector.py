"""The HTTP feedback collector: auth, body limits, batch forms, field-level errors, delivery."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from fixtures_kafka import ingest_config
from kafka_testing import RecordingProducer
from looprl.ingest.broker import free_port
from looprl.ingest.collector import create_app
from looprl.ingest.schema import parse_event
from looprl.ingest.transport import make_producer

from test_ingest_consumer import read_topic

TOKEN = "s3cret"


@pytest.fixture
def cfg(tmp_path, kafka_bootstrap, kafka_topics):
    return ingest_config(tmp_path, kafka_bootstrap, kafka_topics, collector_token=TOKEN,
                         collector_max_body_bytes=4096, max_event_bytes=1024)


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


THUMBS = {"kind": "thumbs", "response_id": "r1", "up": True}


def test_auth_limits_and_field_errors(cfg):
    rec = RecordingProducer()
    c = TestClient(create_app(cfg, rec))
    assert c.post("/v1/feedback", json=THUMBS).status_code == 401
    assert c.post("/v1/feedback", json=THUMBS, headers=auth("wrong")).status_code == 401
    assert rec.sent == []

    big = {**THUMBS, "user_id": "x" * 100, "pad": "y" * 5000}
    r = c.post("/v1/feedback", content=json.dumps(big), headers=auth())
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(10):
            yield b" " * 1000
    r = c.post("/v1/feedback", content=chunks(), headers=auth())
    assert r.status_code == 413

    one_event_too_big = {"kind": "correction", "response_id": "r", "corrected": "z" * 2000}
    r = c.post("/v1/feedback", json=one_event_too_big, headers=auth())
    assert r.status_code == 400 and r.json()["errors"][0]["reason"] == "too_large"

    r = c.post("/v1/feedback", json=[THUMBS, {"kind": "rating", "response_id": "r1", "rating": 11}, {"kind": "x"}],
               headers=auth())
    assert r.status_code == 400
    errs = r.json()["errors"]
    assert [(e["index"], e["reason"]) for e in errs] == [(1, "invalid_fields"), (2, "unknown_kind")]
    assert "rating" in errs[0]["detail"]
    r = c.post("/v1/feedback", content=b"{nope", headers=auth())
    assert r.status_code == 400 and r.json()["errors"][0]["reason"] == "bad_json"
    assert c.post("/v1/feedback", json={"events": "x"}, headers=auth()).status_code == 400
    assert c.post("/v1/feedback", json=[], headers=auth()).status_code == 400
    assert rec.sent == []  # all or nothing: a request with a bad event sends none

    metrics = c.get("/metrics").text
    assert 'looprl_ingest_collector_requests_total{code="401"}' in metrics
    assert 'looprl_ingest_collector_rejected_total{reason="unknown_kind"}' in metrics


def test_batch_forms_reach_the_feedback_topic(cfg, kafka_bootstrap):
    producer = make_producer(kafka_bootstrap, "confluent", linger_ms=1)
    try:
        c = TestClient(create_app(cfg, producer))
        r1 = c.post("/v1/feedback", json={**THUMBS, "user_id": "u1"}, headers=auth())
        given = "6f1c1f5e-8a2e-4d0a-9a43-3f7a6f1d2b11"
        r2 = c.post("/v1/feedback", headers=auth(), json=[
            {"kind": "rating", "response_id": "r1", "rating": 3, "event_id": given},
            {"kind": "preference", "chosen_response_id": "r1", "rejected_response_id": "r2"}])
        r3 = c.post("/v1/feedback", headers=auth(), json={"events": [
            {"kind": "correction", "response_id": "r9", "corrected": "c"}]})
        assert [r.status_code for r in (r1, r2, r3)] == [202, 202, 202]
        assert r2.json()["event_ids"][0] == given and r2.json()["accepted"] == 2
        fb = read_topic(kafka_bootstrap, cfg.kafka.topic_feedback, 4)
        sent = {*r1.json()["event_ids"], *r2.json()["event_ids"], *r3.json()["event_ids"]}
        assert {str(parse_event(m.value()).event_id) for m in fb} == sent
    finally:
        producer.close()


def test_unreachable_kafka_is_a_503_naming_the_events(cfg):
    producer = make_producer(f"127.0.0.1:{free_port()}", "confluent", delivery_timeout_ms=800)
    try:
        r = TestClient(create_app(cfg, producer)).post("/v1/feedback", json=[THUMBS, THUMBS], headers=auth())
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "not_delivered" and len(r.json()["event_ids"]) == 2
    finally:
        producer.close(timeout=1)


def test_looprl_collector_process(cfg, kafka_bootstrap, tmp_path):
    port = free_port()
    k = cfg.kafka
    env = {**{n: v for n, v in os.environ.items() if not n.startswith("LOOPRL_")},
           "LOOPRL_WORKSPACE": str(cfg.workspace), "LOOPRL_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap,
           "LOOPRL_KAFKA__TOPIC_FEEDBACK": k.topic_feedback, "LOOPRL_KAFKA__TOPIC_RESPONSES": k.topic_responses,
           "LOOPRL_INGEST__COLLECTOR_TOKEN": TOKEN, "LOOPRL_INGEST__COLLECTOR_PORT": str(port)}
    log = open(tmp_path / "collector.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "looprl.ops.cli", "ingest", "collect"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "collector.log").read_text()
            time.sleep(0.2)
        assert httpx.post(f"{url}/v1/feedback", json=THUMBS, timeout=10).status_code == 401
        r = httpx.post(f"{url}/v1/feedback", json=THUMBS, headers=auth(), timeout=30)
        assert r.status_code == 202, r.text
        [msg] = read_topic(kafka_bootstrap, k.topic_feedback, 1)
        assert str(parse_event(msg.value()).event_id) == r.json()["event_ids"][0]
        m = httpx.get(f"{url}/metrics", timeout=5, follow_redirects=True)
        assert m.status_code == 200 and 'looprl_ingest_collector_events_total{kind="thumbs"} 1.0' in m.text
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            # uvicorn shuts down gracefully, then re-raises the signal it caught
            assert proc.wait(timeout=20) in (0, -signal.SIGTERM)
            assert b"Traceback" not in (tmp_path / "collector.log").read_bytes()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
