"""`looprl ingest collect`: the HTTP feedback collector, for backends that do not speak Kafka.

    POST /v1/feedback   Authorization: Bearer <ingest.collector_token>
    body: one event object, a JSON array of events, or {"events": [...]}

- 202 ``{"accepted": n, "event_ids": [...]}`` once Kafka acknowledged every event (ids are
  generated for events without one: send your own ``event_id`` to make retries idempotent);
- errors have the shape of serving's and the gateway's, OpenAI's
  ``{"error": {"message", "type", "param", "code"}}`` (``looprl.ops.core.errors``), plus details
  beside ``"error"``:
- 400 ``code`` = the first refused event's reason (``invalid_fields``, ``text_too_long``,
  ``kind_not_accepted``, ``bad_json``, ...), ``param`` its field (``up``; in a batch ``3.up``, or
  ``events.3.up`` for ``{"events": [...]}``), and ``"errors": [{"index", "reason", "detail"}]``
  for every refused event: nothing of the request is accepted;
- 401 ``code: "unauthorized"`` missing/wrong token; 413 ``code: "too_large"`` body over
  ``ingest.collector_max_body_bytes`` (or more than ``MAX_EVENTS_PER_REQUEST`` events);
- 503 ``code: "not_delivered"`` with ``"event_ids": [...]``: Kafka did not acknowledge; retry;
- 503 ``code: "busy"``: ``ingest.collector_max_concurrent`` requests already wait on Kafka
  (e.g. during an outage, each waits up to the delivery timeout); retry.
  Both 503s carry ``Retry-After`` (seconds).

CORS: pages from the origins in ``ingest.collector_cors_origins`` (none by default) may post
feedback from a browser; preflight requests (``OPTIONS``) are answered for them, allowing the
``Authorization`` and ``Content-Type`` headers.

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
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from looprl.ingest import metrics as m
from looprl.ingest.schema import (
    FEEDBACK_KINDS, InvalidEvent, PreferenceEvent, TsWindow, encode_event, validate_event,
)
from looprl.ingest.transport import Producer, ensure_topics, make_producer, wait_for_broker
from looprl.ops.core.config import LooprlConfig, require_token_off_loopback
from looprl.ops.core.errors import error_response
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


def _reply(code: int, body: dict[str, Any]) -> JSONResponse:
    m.COLLECTOR_REQUESTS.labels(code=str(code)).inc()
    return JSONResponse(body, status_code=code)


def _fail(status: int, message: str, *, code: str, param: str | None = None, retry_after_s: int | None = None,
          **extra: Any) -> JSONResponse:
    m.COLLECTOR_REQUESTS.labels(code=str(status)).inc()
    headers = None if retry_after_s is None else {"Retry-After": str(retry_after_s)}
    return error_response(status, message, param=param, code=code, headers=headers, **extra)


def _refused(errors: list[dict[str, Any]], batch: str | None) -> JSONResponse:
    """400 for refused events; ``batch``: how the events were sent (None: one object, "" a JSON
    array, "events" the ``{"events": [...]}`` form), to name the first bad field's path."""
    first = errors[0]
    field = first.get("field")
    if first["index"] is not None and batch is not None:
        field = ".".join(str(p) for p in (batch or None, first["index"], field) if p not in (None, ""))
    where = "" if first["index"] is None or batch is None else f"event {first['index']}: "
    more = f" (and {len(errors) - 1} more refused events)" if len(errors) > 1 else ""
    listed = [{k: e[k] for k in ("index", "reason", "detail")} for e in errors[:100]]
    return _fail(400, f"{where}{first['detail']}{more}", code=first["reason"], param=field or None, errors=listed)


def _events_of(body: Any) -> tuple[list[Any], str | None]:
    """The events of a request body and its form (see ``_refused``)."""
    if isinstance(body, list):
        return body, ""
    if isinstance(body, dict) and set(body) == {"events"}:
        if not isinstance(body["events"], list):
            raise InvalidEvent("invalid_fields", "events: expected a JSON array of events", "events")
        return body["events"], "events"
    return [body], None


def _check_feedback_kind(obj: Any) -> None:
    if isinstance(obj, dict) and obj.get("kind") == "response":
        raise InvalidEvent("kind_not_accepted", "kind: 'response' is not accepted here: answers are logged by the "
                                                "serving tier or gateway (ResponseLogger, kafka.topic_responses); "
                                                f"send feedback: {', '.join(FEEDBACK_KINDS)}", "kind")


def _check_served_pair(event: Any) -> None:
    if isinstance(event, PreferenceEvent):
        given = [f for f in _PAIR_TEXTS if getattr(event, f) is not None]
        if given:
            raise InvalidEvent("texts_not_accepted", f"{', '.join(given)}: a preference sent here names the two "
                                                     "served responses (chosen_response_id, rejected_response_id) "
                                                     "and takes its texts from them", given[0])


class _Cors(CORSMiddleware):
    """Starlette's CORS, with a refused preflight in the collector's error shape."""

    def preflight_response(self, request_headers: Any) -> Any:
        r = super().preflight_response(request_headers)
        if r.status_code != 400:
            return r
        m.COLLECTOR_REQUESTS.labels(code="400").inc()
        return error_response(400, f"CORS preflight refused: {bytes(r.body).decode()} (allowed: "
                                   "ingest.collector_cors_origins)", code="cors_refused",
                              headers={"Vary": r.headers.get("vary", "Origin")})


def create_app(cfg: LooprlConfig, producer: Producer, delivery_timeout_s: float = 30.0) -> FastAPI:
    ing, k = cfg.ingest, cfg.kafka
    token = ing.collector_token.get_secret_value().encode() if ing.collector_token else None
    ts_window = TsWindow(ing.ts_max_past_s, ing.ts_max_future_s)
    waiting = 0  # requests waiting on Kafka; the event loop is one thread, so a plain counter
    app = FastAPI(title="looprl feedback collector", docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/metrics", metrics_app())
    if ing.collector_cors_origins:
        # Preflights are answered here, before the token check: browsers send them without credentials.
        app.add_middleware(_Cors, allow_origins=ing.collector_cors_origins, allow_methods=["POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:  # 404, 405: the same shape
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        m.COLLECTOR_REQUESTS.labels(code=str(exc.status_code)).inc()
        return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code,
                              headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _fail(400, str(exc)[:300], code="invalid_request")

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> JSONResponse:
        nonlocal waiting
        if token is not None:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token):
                return _fail(401, "missing or wrong bearer token (ingest.collector_token)", code="unauthorized")
        limit = ing.collector_max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return _fail(413, f"body of {declared} bytes > {limit} (ingest.collector_max_body_bytes)",
                         code="too_large")
        raw = bytearray()
        async for chunk in request.stream():  # bounded read: never buffer more than the limit
            raw += chunk
            if len(raw) > limit:
                return _fail(413, f"body over {limit} bytes (ingest.collector_max_body_bytes)", code="too_large")
        try:
            body = json.loads(bytes(raw))
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            m.COLLECTOR_REJECTED.labels(reason="bad_json").inc()
            return _refused([{"index": None, "reason": "bad_json", "detail": f"body is not JSON: {e}"[:200]}], None)
        try:
            items, batch = _events_of(body)
        except InvalidEvent as e:
            m.COLLECTOR_REJECTED.labels(reason=e.reason).inc()
            return _refused([{"index": None, "reason": e.reason, "detail": e.detail, "field": e.field}], None)
        if not items:
            return _refused([{"index": None, "reason": "invalid_fields", "detail": "no events in the request"}], None)
        if len(items) > MAX_EVENTS_PER_REQUEST:
            return _fail(413, f"{len(items)} events in one request > {MAX_EVENTS_PER_REQUEST}", code="too_large")
        events, errors = [], []
        for i, obj in enumerate(items):
            try:
                _check_feedback_kind(obj)
                ev = validate_event(obj, max_text_chars=ing.max_text_chars, ts_window=ts_window)
                _check_served_pair(ev)
                size = len(encode_event(ev))
                if size > ing.max_event_bytes:  # the consumer would dead-letter it: refuse it now
                    raise InvalidEvent("too_large", f"event of {size} bytes > {ing.max_event_bytes} "
                                                    "(ingest.max_event_bytes)")
                events.append(ev)
            except InvalidEvent as e:
                errors.append({"index": i, "reason": e.reason, "detail": e.detail, "field": e.field})
                m.COLLECTOR_REJECTED.labels(reason=e.reason).inc()
        if errors:
            return _refused(errors, batch)
        if waiting >= ing.collector_max_concurrent:
            return _fail(503, f"busy: {waiting} requests wait on Kafka (ingest.collector_max_concurrent); retry",
                         code="busy", retry_after_s=RETRY_BUSY_S)
        waiting += 1
        try:
            failed = await _deliver(producer, events, k.topic_feedback, delivery_timeout_s)
        finally:
            waiting -= 1
        if failed:
            log.warning("collector: events not delivered", count=len(failed), error=failed[0][1])
            return _fail(503, f"{len(failed)} event(s) not acknowledged by Kafka: {failed[0][1]}; retry",
                         code="not_delivered", retry_after_s=RETRY_NOT_DELIVERED_S,
                         event_ids=[str(e.event_id) for e, _ in failed])
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
