"""The producer SDK for product backends (``FeedbackClient``) and the serving tier (``ResponseLogger``).

Sends are non-blocking and batched by the Kafka client; every event is tracked until Kafka
acknowledges it. Nothing is dropped silently: an event that fails (broker unreachable, timeout,
too large) is handed to ``on_error(event, error)`` if given, and ``flush()``/``close()`` raise
``DeliveryError`` listing every event that failed since the last flush (``.events``, ``.event_ids``),
so the caller can resend them (``client.send(event)`` with the same ``event_id`` is deduplicated).

    fb = FeedbackClient("localhost:9092")
    fb.thumbs(response_id, up=True, user_id="u1", comment="spot on")
    fb.score(response_id, "correctness", 0.8, metadata={"page": "checkout"})
    fb.preference(chosen_response_id=a, rejected_response_id=b)
    fb.flush()       # raises DeliveryError if anything was not acknowledged
    fb.close()

``HttpFeedbackClient("https://collector:8090", token=...)`` has the same methods and guarantees,
over the HTTP collector instead of Kafka (``looprl.ingest.http_transport``), for backends that
should not talk to Kafka.

On a Kafka with TLS or SASL, pass ``security=KafkaSecurity(...)`` (protocol, mechanism, username,
password, cafile), or ``cfg.kafka.security("feedback")`` / ``cfg.kafka.security("responses")``
from a looprl config.

This module and ``looprl.ingest.schema`` are the light SDK: they import neither the training nor
the serving stack (torch, transformers, ray, duckdb, pyarrow, fastapi), so ``pip install looprl``
without extras is enough for them (tests/test_sdk_light.py checks it).
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from looprl.ingest import metrics as m
from looprl.ingest.http_transport import HttpProducer
from looprl.ingest.schema import (
    CorrectionEvent, PreferenceEvent, RatingEvent, ResponseEvent, ScoreEvent, ThumbsEvent, encode_event,
)
from looprl.ingest.transport import ClientName, DeliveryFailed, Producer, make_producer
from looprl.ops.core.config import KafkaSecurity
from looprl.ops.core.log import get_logger

__all__ = ["DeliveryError", "FeedbackClient", "HttpFeedbackClient", "KafkaSecurity", "ResponseLogger"]

log = get_logger(__name__)

ErrorCallback = Callable[[Any, Exception], None]


class DeliveryError(RuntimeError):
    """Events Kafka did not acknowledge. ``failures`` holds (event, error) pairs."""

    def __init__(self, failures: list[tuple[Any, Exception]], topic: str):
        self.failures = failures
        self.topic = topic
        ids = [str(e.event_id) for e, _ in failures]
        shown = ", ".join(ids[:10]) + (f", ... ({len(ids)} in all)" if len(ids) > 10 else "")
        first = str(failures[0][1]) if failures else ""
        super().__init__(f"{len(ids)} event(s) not delivered to topic {topic}: {shown} (first error: {first})")

    @property
    def events(self) -> list[Any]:
        return [e for e, _ in self.failures]

    @property
    def event_ids(self) -> list[str]:
        return [str(e.event_id) for e, _ in self.failures]


class _TrackedProducer:
    """Tracks every event from send to acknowledgement; failures are kept until ``flush``."""

    def __init__(self, producer: Producer, topic: str, role: str, on_error: ErrorCallback | None,
                 delivery_timeout_s: float):
        self.topic = topic
        self.role = role
        self.on_error = on_error
        self.delivery_timeout_s = delivery_timeout_s
        self._producer = producer
        self._lock = threading.Lock()
        self._pending: dict[int, Any] = {}
        self._failed: list[tuple[Any, Exception]] = []
        self._seq = 0
        self._closed = False

    def send(self, event: Any) -> str:
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed")
        value = encode_event(event)
        with self._lock:
            self._seq += 1
            token = self._seq
            self._pending[token] = event
        # Key by event id: a resend of the same event lands in the same partition as the original.
        self._producer.send(self.topic, value, key=str(event.event_id).encode(),
                            on_delivery=lambda err, t=token: self._delivered(t, err))
        return str(event.event_id)

    def _delivered(self, token: int, err: Exception | None) -> None:
        with self._lock:
            event = self._pending.pop(token, None)
            if event is None:
                return
            if err is not None:
                self._failed.append((event, err))
        if err is None:
            m.SDK_SENT.labels(topic_role=self.role).inc()
            return
        m.SDK_FAILED.labels(topic_role=self.role).inc()
        log.warning("event not delivered", topic=self.topic, event_id=str(event.event_id), error=str(err)[:200])
        if self.on_error is not None:
            try:
                self.on_error(event, err)
            except Exception as e:  # the caller's callback must not break delivery tracking
                log.warning("on_error callback raised", error=str(e)[:200])

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def flush(self, timeout: float | None = None) -> None:
        """Wait for every sent event; raise ``DeliveryError`` listing those that failed or are
        still unacknowledged after ``timeout`` (default: the delivery timeout + 5 s)."""
        timeout = self.delivery_timeout_s + 5.0 if timeout is None else timeout
        self._producer.flush(timeout)
        with self._lock:
            stuck = [(e, DeliveryFailed(f"not acknowledged within {timeout:.0f}s"))
                     for e in self._pending.values()]
            self._pending.clear()
            failures, self._failed = self._failed + stuck, []
        if failures:
            raise DeliveryError(failures, self.topic)

    def close(self, timeout: float | None = None) -> None:
        """Flush (raising ``DeliveryError`` if events failed), then release the client."""
        if self._closed:
            return
        try:
            self.flush(timeout)
        finally:
            self._closed = True
            self._producer.close(timeout=1.0)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _FeedbackMethods:
    """One method per feedback kind. Each builds the typed event (so bad input raises
    ``pydantic.ValidationError`` naming the field, before anything is sent), sends it without
    blocking and returns its ``event_id``. Every kind takes an optional ``comment`` (text) and
    ``metadata`` (a small JSON object: ``schema.MAX_METADATA_*``); ``**fields`` sets the others
    (``event_id``, ``ts``)."""

    def send(self, event: Any) -> str:
        raise NotImplementedError

    def thumbs(self, response_id: str, up: bool, user_id: str | None = None, *, comment: str | None = None,
               metadata: dict[str, Any] | None = None, **fields: Any) -> str:
        return self.send(ThumbsEvent(response_id=response_id, up=up, user_id=user_id, comment=comment,
                                     metadata=metadata, **fields))

    def rating(self, response_id: str, rating: int, user_id: str | None = None, *, comment: str | None = None,
               metadata: dict[str, Any] | None = None, **fields: Any) -> str:
        return self.send(RatingEvent(response_id=response_id, rating=rating, user_id=user_id, comment=comment,
                                     metadata=metadata, **fields))

    def correction(self, response_id: str, corrected: str, user_id: str | None = None, *,
                   comment: str | None = None, metadata: dict[str, Any] | None = None, **fields: Any) -> str:
        return self.send(CorrectionEvent(response_id=response_id, corrected=corrected, user_id=user_id,
                                         comment=comment, metadata=metadata, **fields))

    def preference(self, chosen_response_id: str | None = None, rejected_response_id: str | None = None, *,
                   prompt: str | None = None, chosen_text: str | None = None, rejected_text: str | None = None,
                   user_id: str | None = None, comment: str | None = None, metadata: dict[str, Any] | None = None,
                   **fields: Any) -> str:
        return self.send(PreferenceEvent(
            chosen_response_id=chosen_response_id, rejected_response_id=rejected_response_id, prompt=prompt,
            chosen_text=chosen_text, rejected_text=rejected_text, user_id=user_id, comment=comment,
            metadata=metadata, **fields))

    def score(self, response_id: str, name: str, value: float | bool | str, user_id: str | None = None, *,
              comment: str | None = None, metadata: dict[str, Any] | None = None, **fields: Any) -> str:
        """A named score: LangSmith's ``create_feedback(run_id, key, score=..., comment=...)`` is
        ``score(run_id, key, score, comment=...)`` (its categorical ``value=`` too); Langfuse's
        ``create_score(trace_id, name, value, comment, metadata)`` is ``score(response_id, name,
        value, comment=..., metadata=...)``. Which names train the reward model: ``reward.score_names``."""
        return self.send(ScoreEvent(response_id=response_id, name=name, value=value, user_id=user_id,
                                    comment=comment, metadata=metadata, **fields))


class FeedbackClient(_TrackedProducer, _FeedbackMethods):
    """Feedback from product backends to ``topic`` (default ``looprl.feedback``) on Kafka."""

    def __init__(self, bootstrap_servers: str, topic: str = "looprl.feedback", *, client: ClientName = "confluent",
                 on_error: ErrorCallback | None = None, delivery_timeout_s: float = 30.0, linger_ms: int = 5,
                 security: KafkaSecurity | None = None):
        producer = make_producer(bootstrap_servers, client, linger_ms=linger_ms,
                                 delivery_timeout_ms=int(delivery_timeout_s * 1000), client_id="looprl-feedback",
                                 security=security)
        super().__init__(producer, topic, "feedback", on_error, delivery_timeout_s)


class HttpFeedbackClient(_TrackedProducer, _FeedbackMethods):
    """``FeedbackClient`` over the HTTP collector (``looprl ingest collect``): the same methods,
    ``flush``/``close`` raising ``DeliveryError`` and ``on_error``, for backends that should not talk
    to Kafka. ``url``: the collector (``http://host:8090``); ``token``: its ``ingest.collector_token``.
    Events are posted in batches by a background thread; connection errors, timeouts, 429 and 5xx
    are retried (at most ``max_attempts`` attempts within ``delivery_timeout_s``), a refused event
    (400, 401) is not. The collector takes feedback about served responses only: a preference
    must name two served responses (``texts_not_accepted`` otherwise), checked here before sending.
    """

    def __init__(self, url: str, token: str | None = None, *, on_error: ErrorCallback | None = None,
                 delivery_timeout_s: float = 30.0, linger_ms: int = 5, request_timeout_s: float = 10.0,
                 max_attempts: int = 5, max_batch_events: int = 500, transport: Any = None):
        producer = HttpProducer(url, token, delivery_timeout_s=delivery_timeout_s, request_timeout_s=request_timeout_s,
                                linger_ms=linger_ms, max_batch_events=max_batch_events, max_attempts=max_attempts,
                                transport=transport)
        super().__init__(producer, producer.url, "feedback", on_error, delivery_timeout_s)

    def send(self, event: Any) -> str:
        if isinstance(event, ResponseEvent):
            raise ValueError("the collector takes feedback only: answers are logged by the serving tier "
                             "(ResponseLogger)")
        if isinstance(event, PreferenceEvent) and (event.prompt or event.chosen_text or event.rejected_text):
            raise ValueError("prompt, chosen_text, rejected_text: a preference sent to the collector names two "
                             "served responses (chosen_response_id, rejected_response_id)")
        return super().send(event)


class ResponseLogger(_TrackedProducer):
    """Logs every served answer to ``topic`` (default ``looprl.responses``). ``log`` never blocks
    and never raises for delivery problems (they are logged, counted, and raised by ``flush``)."""

    def __init__(self, bootstrap_servers: str, topic: str = "looprl.responses", *, client: ClientName = "confluent",
                 on_error: ErrorCallback | None = None, delivery_timeout_s: float = 30.0, linger_ms: int = 20,
                 max_failed: int = 10_000, security: KafkaSecurity | None = None):
        producer = make_producer(bootstrap_servers, client, linger_ms=linger_ms,
                                 delivery_timeout_ms=int(delivery_timeout_s * 1000), client_id="looprl-responses",
                                 security=security)
        super().__init__(producer, topic, "responses", on_error, delivery_timeout_s)
        self.max_failed = max_failed

    def log(self, event: ResponseEvent) -> str:
        if not isinstance(event, ResponseEvent):
            raise TypeError(f"ResponseLogger.log expects a ResponseEvent, got {type(event).__name__}")
        return self.send(event)

    def _delivered(self, token: int, err: Exception | None) -> None:
        super()._delivered(token, err)
        if err is not None:
            with self._lock:  # a long outage must not grow memory without bound
                if len(self._failed) > self.max_failed:
                    dropped = len(self._failed) - self.max_failed
                    del self._failed[:dropped]
                    log.error("failed responses beyond max_failed are no longer kept for flush()", dropped=dropped)
