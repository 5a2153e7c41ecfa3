"""The SDK's HTTP transport (``HttpFeedbackClient``): through the real collector, and its retry rules."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import uvicorn

from kafka_testing import RecordingProducer
from looprl.ingest.client import DeliveryError, HttpFeedbackClient
from looprl.ingest.collector import create_app
from looprl.ingest.http_transport import HttpDeliveryFailed
from looprl.ingest.schema import PreferenceEvent, ScoreEvent, ThumbsEvent, parse_event
from looprl.ops.core.config import load_config


TOKEN = "s3cret"


@pytest.fixture
def collector(tmp_path):
    """The real collector app on a loopback port: (base url, what it sent to Kafka)."""
    cfg = load_config(environ={}, workspace=tmp_path / "ws", ingest={"collector_token": TOKEN})
    rec = RecordingProducer()
    server = uvicorn.Server(uvicorn.Config(create_app(cfg, rec), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the collector did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", rec
    server.should_exit = True
    thread.join(timeout=10)


def test_feedback_reaches_kafka_through_the_collector(collector):
    url, rec = collector
    with HttpFeedbackClient(url, TOKEN, linger_ms=20) as fb:
        ids = [fb.thumbs("r1", up=True, user_id="u1", comment="thanks", metadata={"page": "faq"}),
               fb.score("r1", "correctness", 0.75), fb.score("r1", "tone", "friendly"),
               fb.rating("r2", 4), fb.correction("r2", "better"),
               fb.preference(chosen_response_id="r1", rejected_response_id="r2")]
    got = {str(e.event_id): e for e in map(parse_event, rec.values)}
    assert list(got) == ids  # all delivered, in order, each once
    assert got[ids[0]] == ThumbsEvent(event_id=ids[0], ts=got[ids[0]].ts, response_id="r1", up=True, user_id="u1",
                                      comment="thanks", metadata={"page": "faq"})
    assert (got[ids[2]].name, got[ids[2]].value) == ("tone", "friendly")

    with pytest.raises(DeliveryError) as e:  # a wrong token is refused, never retried
        with HttpFeedbackClient(url, "wrong", linger_ms=0) as fb:
            bad = fb.thumbs("r1", up=False)
    assert e.value.event_ids == [bad]
    err = e.value.failures[0][1]
    assert isinstance(err, HttpDeliveryFailed) and err.status == 401 and err.permanent
    assert "ingest.collector_token" in str(err)


class Collector:
    """A scripted collector: ``answers`` are consumed one per request (the last one repeats)."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.requests: list[list[dict]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        events = json.loads(request.content)["events"]
        self.requests.append(events)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if callable(answer):
            answer = answer(events)
        if isinstance(answer, Exception):
            raise answer
        return answer


def client(script: Collector, **kw) -> HttpFeedbackClient:
    kw.setdefault("linger_ms", 0)
    return HttpFeedbackClient("http://collector", TOKEN, transport=httpx.MockTransport(script), **kw)


def ok(events=None):
    return httpx.Response(202, json={"accepted": 1})


def test_connection_errors_and_5xx_are_retried():
    script = Collector(httpx.ConnectError("refused"), httpx.Response(503, headers={"Retry-After": "0"}),
                       httpx.Response(500, text="proxy error"), httpx.Response(202, json={}))
    seen = []
    with client(script, on_error=lambda ev, err: seen.append(err)) as fb:
        eid = fb.thumbs("r1", up=True)
    assert [[e["event_id"] for e in r] for r in script.requests] == [[eid]] * 4  # the same event id each time
    assert seen == []


def test_retries_are_bounded_and_every_failed_event_is_reported():
    script = Collector(httpx.Response(503, json={"error": {"message": "busy: 64 requests wait on Kafka"}}))
    seen = []
    fb = client(script, max_attempts=3, on_error=lambda ev, err: seen.append(str(ev.event_id)))
    ids = [fb.thumbs(f"r{i}", up=True) for i in range(3)]
    with pytest.raises(DeliveryError) as e:
        fb.flush(timeout=30)
    assert sorted(e.value.event_ids) == sorted(ids) and sorted(seen) == sorted(ids)
    assert 3 <= len(script.requests) <= 3 * len(ids)  # 3 attempts per batch
    assert "busy: 64 requests" in str(e.value) and not e.value.failures[0][1].permanent
    fb.close()

    # the delivery deadline bounds the retries too, whatever Retry-After says
    script = Collector(httpx.Response(503, headers={"Retry-After": "30"}))
    fb = client(script, max_attempts=100, delivery_timeout_s=0.6)
    t0 = time.monotonic()
    fb.thumbs("r1", up=True)
    with pytest.raises(DeliveryError):
        fb.flush(timeout=20)
    assert time.monotonic() - t0 < 5 and len(script.requests) <= 3
    fb.close()


def test_a_400_fails_only_the_events_it_names():
    def refuse_index_1(events):
        if len(events) == 3:
            return httpx.Response(400, json={"error": {"message": "event 1: up: ...", "code": "invalid_fields"},
                                             "errors": [{"index": 1, "reason": "invalid_fields",
                                                         "detail": "up: forged"}]})
        return httpx.Response(202, json={})
    script = Collector(refuse_index_1)
    fb = client(script, linger_ms=200)
    ids = [fb.thumbs(f"r{i}", up=True) for i in range(3)]
    with pytest.raises(DeliveryError) as e:
        fb.flush(timeout=20)
    assert e.value.event_ids == [ids[1]] and "up: forged" in str(e.value)
    assert [[x["event_id"] for x in r] for r in script.requests] == [ids, [ids[0], ids[2]]]
    fb.close()


def test_a_413_splits_the_batch():
    script = Collector(lambda events: httpx.Response(413 if len(events) > 2 else 202, json={}))
    with client(script, linger_ms=200) as fb:
        ids = [fb.rating(f"r{i}", 3) for i in range(5)]
    delivered = [x["event_id"] for r in script.requests if len(r) <= 2 for x in r]
    assert sorted(delivered) == sorted(ids) and len(script.requests) > 1


def test_what_the_collector_never_takes_is_refused_before_sending():
    script = Collector(ok)
    with client(script) as fb:
        with pytest.raises(ValueError, match="chosen_response_id"):
            fb.preference(prompt="p", chosen_text="a", rejected_text="b")
        with pytest.raises(ValueError):  # bad input: the event is never built
            fb.score("r1", "n", float("inf"))
        fb.send(ScoreEvent(response_id="r1", name="n", value=True))
        fb.send(PreferenceEvent(chosen_response_id="a", rejected_response_id="b"))
    assert [e["kind"] for r in script.requests for e in r] == ["score", "preference"]
