"""Attribution and response logging of served answers: one module for the embedded server
(``looprl.serving.app``) and the gateway (``looprl.serving.gateway``).

Every answer the serving tier gives names the adapter version that produced it (JSON field
``looprl_adapter_version``, header ``X-Looprl-Adapter``) and is logged to ``kafka.topic_responses``
as a ``ResponseEvent`` whose ``response_id`` is the OpenAI id of the answer, so feedback about
it is attributed to that version. Routing itself (which adapter a user gets) is
``looprl.serving.routing``.

- ``response_event`` builds the event (texts cut to the schema's limits, sampling parameters,
  the served token ids and log-probs when known);
- ``ResponseRecorder`` hands events to a ``ResponseLogger`` without ever failing or delaying the
  request: while Kafka takes them (the logger's send only enqueues into the client library) an
  event is handed over at once; while Kafka is unreachable, events wait in a bounded buffer (with
  the client library's own in-flight queue counted against the same bound) and are sent again by
  a background thread; past the bound they are dropped and counted. An event Kafka did not
  acknowledge comes back through the logger's ``on_error`` and is buffered again; one the logger
  refuses outright (its ``log`` raises: a closed or broken logger) is dropped and counted.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from typing import Any, Callable, Iterable, Mapping

from looprl.ingest.schema import (
    MAX_COMPLETION_TOKENS, MAX_ID_CHARS, MAX_TEXT_CHARS, ChatMessage, ResponseEvent, Sampling,
)
from looprl.ops.core.chat import Chat
from looprl.ops.core.log import get_logger
from looprl.storage.releases import BASE, version_of_lora

log = get_logger(__name__)

ADAPTER_HEADER = "X-Looprl-Adapter"
RESPONSE_ID_HEADER = "X-Looprl-Response-Id"
VERSION_FIELD = "looprl_adapter_version"
# Per choice of an embedded server's answer: the response id feedback names (``choice_response_id``).
RESPONSE_ID_FIELD = "looprl_response_id"
# Top level of a chat answer to a looprl_compare request: the second candidate to compare
# ({"response_id", "content"}), logged as its own answer (looprl.serving.compare).
COMPARISON_FIELD = "looprl_comparison"
# The most negative log-prob stored: vLLM reports an impossible token as -inf (or -9999).
MIN_LOGPROB = -1e4

_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "seed", "stop", "presence_penalty", "frequency_penalty")


def served_version(name: str | None, base_name: str) -> str | None:
    """The registry version a served model name stands for: ``policy-v7`` -> ``v7``, the base
    model's name -> ``base``; None for any other name."""
    if name == base_name:
        return BASE
    return version_of_lora(name)


# The seeds a request may send: torch seeds a generator from a 64-bit integer; vLLM accepts the signed range.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


def choice_seed(seed: int, index: int) -> int:
    """The seed of choice ``index`` of a seeded n > 1 request: ``seed + index`` as vLLM does (so
    choice 0 is the n = 1 answer and the choices differ), wrapped into the signed 64-bit range."""
    return (seed + index - SEED_MIN) % 2**64 + SEED_MIN


def choice_response_id(response_id: str, index: int) -> str:
    """The response id feedback names for choice ``index`` of an answer with OpenAI id
    ``response_id``: the id itself for choice 0 (every n = 1 answer), ``<id>-<index>`` for the
    others of an n > 1 answer. Each choice is logged as its own ``ResponseEvent`` under it."""
    return response_id if index == 0 else f"{response_id}-{index}"


def sampling_of(body: Mapping[str, Any]) -> Sampling | None:
    """The sampling parameters an OpenAI request body asked for; None when it set none, or when
    they are not a valid set (the server refused or clamped them: not worth failing a log for)."""
    fields: dict[str, Any] = {k: body[k] for k in _SAMPLING_KEYS if body.get(k) is not None}
    tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    if tokens is not None:
        fields["max_tokens"] = tokens
    if isinstance(fields.get("stop"), str):
        fields["stop"] = [fields["stop"]]
    if not fields:
        return None
    try:
        return Sampling(**fields)
    except (ValueError, TypeError):
        return None


def logged_conversation(chat: Chat) -> tuple[str, list[ChatMessage]]:
    """(prompt text, messages) of a conversation as the event log keeps them."""
    return chat.text(), [ChatMessage(role=m.role, content=m.content[:MAX_TEXT_CHARS]) for m in chat.messages]


def response_event(
    *, response_id: str, model: str, completion: str, version: str | None, user: str | None = None,
    prompt: str | None = None, messages: list[ChatMessage] | None = None, sampling: Sampling | None = None,
    token_ids: Iterable[int] | None = None, logprobs: Iterable[float] | None = None,
) -> ResponseEvent:
    """The ``ResponseEvent`` of one served answer. Texts are cut to the schema's limits; token ids
    and log-probs are kept only when they are whole (one log-prob per token, at most
    ``MAX_COMPLETION_TOKENS``), since a partial list would misalign with the served tokens."""
    ids = list(token_ids) if token_ids is not None else None
    lps = [max(float(x), MIN_LOGPROB) if not math.isnan(float(x)) else MIN_LOGPROB for x in logprobs] \
        if logprobs is not None else None
    if ids is not None and (not ids or len(ids) > MAX_COMPLETION_TOKENS):
        ids = None
    if lps is not None and (ids is None or len(lps) != len(ids)):
        lps = None
    return ResponseEvent(
        response_id=response_id[:MAX_ID_CHARS], prompt=prompt[:MAX_TEXT_CHARS] if prompt is not None else None,
        messages=messages or None, completion=completion[:MAX_TEXT_CHARS], model=model[:MAX_ID_CHARS],
        adapter_version=version[:MAX_ID_CHARS] if version else None, user_id=user[:MAX_ID_CHARS] if user else None,
        sampling=sampling, completion_token_ids=ids, completion_logprobs=[min(x, 0.0) for x in lps] if lps else None,
    )


class ResponseRecorder:
    """Hands ``ResponseEvent`` s to a logger (``looprl.ingest.client.ResponseLogger``, or anything
    with ``log(event)``) without blocking or failing the caller; see the module docstring.

    ``logger``: a ready logger; or ``connect(on_error)``: makes one (called again, by the background
    thread, until it succeeds, so the recorder can start while Kafka is down). ``max_buffered``
    bounds what is held for Kafka: the buffer here plus the logger's unacknowledged events.
    ``dropped``/``buffered``: optional Prometheus counter and gauge.
    """

    def __init__(self, logger: Any = None, *, connect: Callable[[Callable[[Any, Exception], None]], Any] | None = None,
                 max_buffered: int = 10_000, retry_seconds: float = 1.0, dropped: Any = None, buffered: Any = None):
        if logger is None and connect is None:
            raise ValueError("ResponseRecorder needs a logger or a connect function")
        self.logger = logger
        self._connect = connect
        self.max_buffered = max_buffered
        self.retry_seconds = retry_seconds
        self._dropped_metric = dropped
        self._buffered_metric = buffered
        self._buffer: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._resume_at = 0.0  # no send before this (monotonic): Kafka just refused one
        self._closed = False
        self._thread: threading.Thread | None = None
        self.dropped = 0
        self.recorded = 0
        if logger is not None and getattr(logger, "on_error", "absent") is None:
            logger.on_error = self._undelivered  # failed deliveries come back here to be retried
        if logger is None:
            self._start()

    # ------------------------------------------------------------------ the request path
    def record(self, event: ResponseEvent) -> bool:
        """Log ``event``; False if it was dropped (buffer full). Never raises, never waits on Kafka."""
        try:
            with self._cv:
                self.recorded += 1
                inline = (self.logger is not None and not self._buffer and time.monotonic() >= self._resume_at
                          and self._in_flight() < self.max_buffered)
                if not inline and not self._hold(event):
                    return False
            if inline and not self._send(event):
                return False
            self._publish_gauge()
            return True
        except Exception as e:  # never let logging reach the answer
            log.warning("response not recorded", error=str(e)[:200])
            return False

    def _send(self, event: ResponseEvent) -> bool:
        """Hand ``event`` to the logger. Its ``log`` only enqueues (Kafka being down shows up later,
        through ``on_error``), so an exception here is the event's or the logger's fault, which
        trying again would not fix: the event is dropped and counted."""
        try:
            self.logger.log(event)
            return True
        except Exception as e:
            with self._cv:
                self._count_dropped(1)
            log.warning("response log refused by the logger; dropped", response_id=event.response_id,
                        error=f"{type(e).__name__}: {e}"[:300])
            return False

    def _count_dropped(self, n: int) -> None:
        self.dropped += n
        if self._dropped_metric is not None:
            self._dropped_metric.inc(n)

    def _in_flight(self) -> int:
        return int(getattr(self.logger, "pending", 0) or 0) if self.logger is not None else 0

    def _hold(self, event: ResponseEvent) -> bool:
        """Buffer ``event`` (lock held); False, counted, if the bound is reached."""
        if len(self._buffer) + self._in_flight() >= self.max_buffered:
            self._count_dropped(1)
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.error("response logs dropped: Kafka has not taken them and the buffer is full",
                          dropped=self.dropped, max_buffered=self.max_buffered)
            return False
        self._buffer.append(event)
        self._start()
        self._cv.notify()
        return True

    def _undelivered(self, event: Any, err: Exception) -> None:
        """The logger's ``on_error``: Kafka did not acknowledge ``event``; send it again later."""
        with self._cv:
            self._resume_at = time.monotonic() + self.retry_seconds
            self._hold(event)
        self._publish_gauge()

    def _publish_gauge(self) -> None:
        if self._buffered_metric is not None:
            self._buffered_metric.set(self.pending)

    @property
    def pending(self) -> int:
        """Events not yet acknowledged by Kafka: buffered here plus in flight in the logger."""
        return len(self._buffer) + self._in_flight()

    # ------------------------------------------------------------------ the sender thread
    def _start(self) -> None:
        if self._thread is None and not self._closed:
            self._thread = threading.Thread(target=self._run, name="looprl-response-recorder", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._closed and (
                        (self.logger is not None and not self._buffer) or time.monotonic() < self._resume_at):
                    self._cv.wait(max(0.01, min(1.0, self._resume_at - time.monotonic())))
                if self._closed:
                    return
                need_logger = self.logger is None
            if need_logger:
                self._try_connect()
                continue
            with self._cv:
                if not self._buffer:
                    continue
                event = self._buffer.popleft()
            self._send(event)
            self._publish_gauge()

    def _try_connect(self) -> None:
        try:
            logger = self._connect(self._undelivered)
        except Exception as e:
            log.warning("response logger not connected yet; buffering answers", error=str(e)[:300])
            logger = None
        with self._cv:
            if logger is None:
                self._resume_at = time.monotonic() + self.retry_seconds
                return
            self.logger = logger
            self._resume_at = 0.0
        log.info("response logger connected", buffered=len(self._buffer))

    # ------------------------------------------------------------------ shutdown
    def flush(self, timeout: float = 10.0) -> bool:
        """Wait (up to ``timeout``) until nothing is buffered here; True if so."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._cv:
                if not self._buffer:
                    return True
                self._cv.notify()
            time.sleep(0.02)
        return False

    def close(self, timeout: float = 10.0) -> None:
        """Send what is buffered (up to ``timeout``), then flush and close the logger; what is
        still not delivered is counted as dropped."""
        self.flush(timeout)
        with self._cv:
            self._closed = True
            left = len(self._buffer)
            self._buffer.clear()
            self._cv.notify_all()
        if left:
            self._count_dropped(left)
            log.error("response logs not delivered at shutdown", dropped=left)
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        logger = self.logger
        if logger is None:
            return
        for step in ("flush", "close"):
            fn = getattr(logger, step, None)
            if fn is None:
                continue
            try:
                fn()
            except Exception as e:  # DeliveryError: what Kafka never took
                log.warning(f"response logger {step} at shutdown", error=str(e)[:300])
