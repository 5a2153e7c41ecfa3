"""`looprl ingest collect`: the HTTP feedback collector, for backends that do not speak Kafka.

    POST /v1/feedback   Authorization: Bearer <ingest.collector_token>
    body: one event object, a JSON array of events, or {"events": [...]}

- 202 ``{"accepted": n, "event_ids": [...]}`` once Kafka acknowledged every event (ids are
  generated for events without one: send your own ``event_id`` to make retries idempotent);
- 400 ``{"error": "invalid_event", "errors": [{"index", "reason", "detail"}]}``: nothing of the
  request is accepted (the ``detail`` names the bad field);
- 401 missing/wrong token; 413 body over ``ingest.collector_max_body_bytes``;
- 503 ``{"error": "not_delivered", "event_ids": [...]}``: Kafka did not acknowledge; retry;
- 503 ``{"error": "busy"}``: ``ingest.collector_max_concurrent`` requests already wait on Kafka
  (e.g. during an outage, each waits up to the delivery timeout); retry.
  Both 503s carry ``Retry-After`` (seconds).

Feedback only, to the feedback topic: answers are logged by the serving tier or a gateway
(``ResponseLogger``, on the responses topic, which the collector never writes), so an event of kind
``response`` is refused (reason ``kind_not_accepted``), and so is a preference carrying its own
texts (``texts_not_accepted``): a preference sent here names two served responses, whose texts
the event log joins in. ``/metrics`` serves Prometheus metrics, ``/health`` liveness.

Without ``ingest.collector_token`` the collector starts on a loopback address only; on any other
it refuses to start, naming the key.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from looprl.ingest import metrics as m
from looprl.ingest.schema import (
    FEEDBACK_KINDS, InvalidEvent, PreferenceEvent, TsWindow, encode_event, validate_event,
)
from looprl.ingest.transport import Producer, ensure_topics, make_producer, wait_for_broker
from looprl.ops.core.config import LooprlConfig, require_token_off_loopback
from looprl.ops.core.listen import run_http
from looprl.ops.core.log import get_logger
from looprl.ops.core.metrics import metrics_app

log = get_logger(__name__)

MAX_EVENTS_PER_REQUEST = 10_000
# Retry-After of a 503: over the concurrency cap acknowledgements usually come within
# milliseconds; events Kafka did not acknowledge wait for the broker to come back.
RETRY_BUSY_S = 1
RETRY_NOT_DELIVERED_S = 5
_PAIR_TEXTS = ("prompt", "chosen_text", "rejected_text")


def _reply(code: int, body: dict[str, Any], retry_after_s: int | None = None) -> JSONResponse:
    m.COLLECTOR_REQUESTS.labels(code=str(code)).inc()
    headers = None if retry_after_s is None else {"Retry-After": str(retry_after_s)}
    return JSONResponse(body, status_code=code, headers=headers)


def _events_of(body: Any) -> list[Any]:
    if isinstance(body, list):
        return body
    if isinstance(body, dict) and set(body) == {"events"}:
        if not isinstance(body["events"], list):
            raise InvalidEvent("invalid_fields", "events: expected a JSON array of events")
        return body["events"]
    return [body]


def _check_feedback_kind(obj: Any) -> None:
    if isinstance(obj, dict) and obj.get("kind") == "response":
        raise InvalidEvent("kind_not_accepted", "kind: 'response' is not accepted here: answers are logged by the "
                                                "serving tier or gateway (ResponseLogger, kafka.topic_responses); "
                                                f"send feedback: {', '.join(FEEDBACK_KINDS)}")


def _check_served_pair(event: Any) -> None:
    if isinstance(event, PreferenceEvent):
        given = [f for f in _PAIR_TEXTS if getattr(event, f) is not None]
        if given:
            raise InvalidEvent("texts_not_accepted", f"{', '.join(given)}: a preference sent here names the two "
                                                     "served responses (chosen_response_id, rejected_response_id) "
                                                     "and takes its texts from them")


def create_app(cfg: LooprlConfig, producer: Producer, delivery_timeout_s: float = 30.0) -> FastAPI:
    ing, k = cfg.ingest, cfg.kafka
    token = ing.collector_token.get_secret_value().encode() if ing.collector_token else None
    ts_window = TsWindow(ing.ts_max_past_s, ing.ts_max_future_s)
    waiting = 0  # requests waiting on Kafka; the event loop is one thread, so a plain counter
    app = FastAPI(title="looprl feedback collector", docs_url=None, redoc_url=None)
    app.mount("/metrics", metrics_app())

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> JSONResponse:
        nonlocal waiting
        if token is not None:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token):
                return _reply(401, {"error": "unauthorized", "detail": "missing or wrong bearer token"})
        limit = ing.collector_max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return _reply(413, {"error": "too_large", "detail": f"body of {declared} bytes > {limit}"})
        raw = bytearray()
        async for chunk in request.stream():  # bounded read: never buffer more than the limit
            raw += chunk
            if len(raw) > limit:
                return _reply(413, {"error": "too_large", "detail": f"body over {limit} bytes"})
        try:
            body = json.loads(bytes(raw))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            m.COLLECTOR_REJECTED.labels(reason="bad_json").inc()
            return _reply(400, {"error": "invalid_event", "errors": [
                {"index": None, "reason": "bad_json", "detail": str(e)[:200]}]})
        try:
            items = _events_of(body)
        except InvalidEvent as e:
            m.COLLECTOR_REJECTED.labels(reason=e.reason).inc()
            return _reply(400, {"error": "invalid_event", "errors": [{"index": None, "reason": e.reason,
                                                                       "detail": e.detail}]})
        if not items:
            return _reply(400, {"error": "invalid_event", "errors": [
                {"index": None, "reason": "invalid_fields", "detail": "no events in the request"}]})
        if len(items) > MAX_EVENTS_PER_REQUEST:
            return _reply(413, {"error": "too_large", "detail": f"{len(items)} events > {MAX_EVENTS_PER_REQUEST}"})
        events, errors = [], []
        for i, obj in enumerate(items):
            try:
                _check_feedback_kind(obj)
                ev = validate_event(obj, max_text_chars=ing.max_text_chars, ts_window=ts_window)
                _check_served_pair(ev)
                size = len(encode_event(ev))
                if size > ing.max_event_bytes:  # the consumer would dead-letter it: refuse it now
                    raise InvalidEvent("too_large", f"event of {size} bytes > {ing.max_event_bytes}")
                events.append(ev)
            except InvalidEvent as e:
                errors.append({"index": i, "reason": e.reason, "detail": e.detail})
                m.COLLECTOR_REJECTED.labels(reason=e.reason).inc()
        if errors:
            return _reply(400, {"error": "invalid_event", "errors": errors[:100]})
        if waiting >= ing.collector_max_concurrent:
            return _reply(503, {"error": "busy", "detail": f"{waiting} requests wait on Kafka "
                                                           f"(ingest.collector_max_concurrent)"}, RETRY_BUSY_S)
        waiting += 1
        try:
            failed = await _deliver(producer, events, k.topic_feedback, delivery_timeout_s)
        finally:
            waiting -= 1
        if failed:
            log.warning("collector: events not delivered", count=len(failed), error=failed[0][1])
            return _reply(503, {"error": "not_delivered", "event_ids": [str(e.event_id) for e, _ in failed],
                                "detail": failed[0][1]}, RETRY_NOT_DELIVERED_S)
        for e in events:
            m.COLLECTOR_EVENTS.labels(kind=e.kind).inc()
        return _reply(202, {"accepted": len(events), "event_ids": [str(e.event_id) for e in events]})

    return app


async def _deliver(producer: Producer, events: list[Any], topic: str, timeout: float) -> list[tuple[Any, str]]:
    """Send ``events`` and wait (without blocking the event loop) for Kafka's acknowledgements
    within ``timeout`` in all. Returns the (event, error) pairs that failed or timed out."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    done = asyncio.Event()
    lock = threading.Lock()
    outcome: dict[int, str | None] = {}  # index -> error text (None: acknowledged)

    def on_delivery(i: int, err: Exception | None) -> None:
        with lock:
            outcome[i] = None if err is None else str(err)[:300]
            last = len(outcome) == len(events)
        if last:
            loop.call_soon_threadsafe(done.set)

    def send_all() -> None:
        give_up = time.monotonic() + timeout
        for i, e in enumerate(events):
            if time.monotonic() > give_up:  # Kafka takes nothing: the rest count as not acknowledged
                return
            producer.send(topic, encode_event(e), key=str(e.event_id).encode(),
                          on_delivery=lambda err, i=i: on_delivery(i, err))

    # A send may wait for room in a full local queue (Kafka down): never on the event loop.
    await asyncio.to_thread(send_all)
    try:
        await asyncio.wait_for(done.wait(), max(0.0, deadline - loop.time()))
    except asyncio.TimeoutError:
        pass
    with lock:
        failed = [(e, outcome[i] if i in outcome else f"not acknowledged within {timeout:.0f}s")
                  for i, e in enumerate(events) if outcome.get(i, "") is not None]
    return failed


def run_collector(cfg: LooprlConfig, bootstrap: str, host: str | None = None, port: int | None = None) -> int:
    k = cfg.kafka
    h = host or cfg.ingest.collector_host
    require_token_off_loopback(h, cfg.ingest.collector_token, "ingest.collector_host", "ingest.collector_token")
    # The feedback principal: it writes the feedback topic only (and creates it if missing and allowed).
    security = k.security("feedback")
    try:
        wait_for_broker(bootstrap, timeout=60, security=security)
        ensure_topics(bootstrap, {k.topic_feedback: k.topic_partitions}, security=security)
    except Exception as e:  # the collector still starts; deliveries fail with 503 until Kafka is up
        log.warning("Kafka not ready at collector start", error=str(e)[:300])
    producer = make_producer(bootstrap, k.client, security=security, client_id="looprl-collector", linger_ms=2)
    if cfg.ingest.collector_token is None:
        log.warning("ingest.collector_token is not set: POST /v1/feedback is open on loopback only")
    p = cfg.ingest.collector_port if port is None else port
    try:
        # port 0: a free port, logged ("collector listening", url and port)
        run_http(create_app(cfg, producer), h, p, what="collector", key="ingest.collector_port (or --port)",
                 path="/v1/feedback", bootstrap=bootstrap)
    finally:
        producer.close(timeout=5)
    return 0
