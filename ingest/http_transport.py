"""The SDK's HTTP transport: feedback to the collector's ``POST /v1/feedback`` instead of Kafka.

``HttpProducer`` has the shape of ``looprl.ingest.transport.Producer`` (send with a delivery
callback, flush, close), so ``HttpFeedbackClient`` tracks events exactly as the Kafka client does.
A daemon thread gathers the queued events into batches (``{"events": [...]}``, at most
``max_batch_events`` and ``max_batch_bytes``) and posts each with the bearer token.

Which failures are retried (tenacity, exponential back-off with jitter, at least the collector's
``Retry-After``): connection errors, timeouts, 429 and 5xx, for at most ``max_attempts`` attempts and
never past the delivery deadline (``delivery_timeout_s`` after the oldest event of the batch was
sent). Retrying is safe: events carry their id, and the consumer drops ids it already stored.
Never retried, as the same request can never succeed: 401 (token), 400 (the events the collector
names by index fail; the rest of the batch is posted again without them) and 413 (the batch is
split in two until a single event is left, which fails).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable

import httpx
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt

from looprl.ops.core.log import get_logger

log = get_logger(__name__)

DeliveryCallback = Callable[[Exception | None], None]
# The longest a Retry-After from the collector is honoured; the delivery deadline bounds it too.
MAX_RETRY_AFTER_S = 30.0


class HttpDeliveryFailed(RuntimeError):
    """Events the collector did not accept. ``status``: the last HTTP status (None: no answer);
    ``permanent``: the same request can never succeed (a bad event, a wrong token)."""

    def __init__(self, reason: str, status: int | None = None, permanent: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.permanent = permanent


class _Retryable(Exception):
    def __init__(self, status: int, detail: str, retry_after_s: float | None):
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.retry_after_s = retry_after_s


def _retryable(e: BaseException) -> bool:
    return isinstance(e, (_Retryable, httpx.TransportError))


def _message(r: httpx.Response) -> str:
    """The collector's error message (OpenAI's shape), else the start of the body."""
    try:
        body = r.json()
        return str(body["error"]["message"])[:300]
    except Exception:  # not our collector's shape: a proxy's page, say
        return r.text[:300]


def _retry_after(r: httpx.Response) -> float | None:
    try:
        return min(float(r.headers["retry-after"]), MAX_RETRY_AFTER_S)
    except (KeyError, ValueError):
        return None


class HttpProducer:
    """Posts batches of encoded feedback events to ``url`` (the collector's base URL or its
    ``/v1/feedback``). ``transport``: an ``httpx`` transport (tests pass ``httpx.MockTransport``)."""

    def __init__(self, url: str, token: str | None = None, *, delivery_timeout_s: float = 30.0,
                 request_timeout_s: float = 10.0, linger_ms: int = 5, max_batch_events: int = 500,
                 max_batch_bytes: int = 512 * 1024, max_attempts: int = 5,
                 transport: httpx.BaseTransport | None = None, user_agent: str = "looprl-sdk"):
        base = url.rstrip("/")
        self.url = base if base.endswith("/v1/feedback") else base + "/v1/feedback"
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"collector url {url!r}: expected http:// or https://")
        if max_attempts < 1 or max_batch_events < 1:
            raise ValueError("max_attempts and max_batch_events must be at least 1")
        headers = {"Content-Type": "application/json", "User-Agent": user_agent}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(timeout=request_timeout_s, transport=transport, headers=headers)
        self.delivery_timeout_s = delivery_timeout_s
        self.linger_s = linger_ms / 1000
        self.max_batch_events = max_batch_events
        self.max_batch_bytes = max_batch_bytes
        self.max_attempts = max_attempts
        self._queue: deque[tuple[bytes, DeliveryCallback | None, float]] = deque()
        self._cond = threading.Condition()
        self._busy = 0  # events taken off the queue whose outcome is not reported yet
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="looprl-http-producer", daemon=True)
        self._thread.start()

    # ---- the Producer protocol
    def send(self, topic: str, value: bytes, key: bytes | None = None,
             headers: list[tuple[str, bytes]] | None = None, on_delivery: DeliveryCallback | None = None) -> None:
        """Queue one encoded event (``topic``, ``key`` and ``headers`` are the collector's business)."""
        with self._cond:
            if self._closing:
                raise RuntimeError("HttpProducer is closed")
            self._queue.append((value, on_delivery, time.monotonic()))
            self._cond.notify_all()

    def flush(self, timeout: float) -> int:
        """Wait until every queued event has an outcome or ``timeout`` passed; the number still open."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return len(self._queue) + self._busy

    def close(self, timeout: float = 5.0) -> None:
        self.flush(timeout)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout=max(timeout, 0.1))
        self._http.close()

    # ---- the sender thread
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:  # closing and nothing left
                    return
            if self.linger_s > 0:  # let a burst of sends share one request
                time.sleep(self.linger_s)
            batch = self._take()
            try:
                self._deliver(batch)
            except Exception as e:  # never lose track of a batch, whatever went wrong
                log.exception("feedback batch failed unexpectedly", events=len(batch))
                self._report(batch, HttpDeliveryFailed(f"{type(e).__name__}: {e}"[:300]))

    def _take(self) -> list[tuple[bytes, DeliveryCallback | None, float]]:
        with self._cond:
            batch, size = [], 0
            while self._queue and len(batch) < self.max_batch_events:
                value = self._queue[0][0]
                if batch and size + len(value) + 1 > self.max_batch_bytes:
                    break
                batch.append(self._queue.popleft())
                size += len(value) + 1
            self._busy += len(batch)
            return batch

    def _report(self, items: list[tuple[bytes, DeliveryCallback | None, float]], err: Exception | None) -> None:
        for _, cb, _ in items:
            if cb is not None:
                try:
                    cb(err)
                except Exception as e:  # a callback's failure must not stop the sender
                    log.warning("delivery callback raised", error=str(e)[:200])
        with self._cond:
            self._busy -= len(items)
            self._cond.notify_all()

    def _deliver(self, batch: list[tuple[bytes, DeliveryCallback | None, float]]) -> None:
        deadline = min(sent for _, _, sent in batch) + self.delivery_timeout_s
        try:
            r = self._post(b'{"events":[' + b",".join(v for v, _, _ in batch) + b"]}", deadline)
        except _Retryable as e:
            self._report(batch, HttpDeliveryFailed(f"{self.url}: {e} (after retries)", e.status))
            return
        except httpx.HTTPError as e:
            self._report(batch, HttpDeliveryFailed(f"{self.url}: {type(e).__name__}: {e} (after retries)"[:400]))
            return
        if r.status_code == 202:
            self._report(batch, None)
        elif r.status_code == 413 and len(batch) > 1:  # the collector's body limit is smaller than ours
            half = len(batch) // 2
            self._deliver(batch[:half])
            self._deliver(batch[half:])
        elif r.status_code == 400:
            self._refused(batch, r)
        else:
            self._report(batch, HttpDeliveryFailed(f"{self.url}: HTTP {r.status_code}: {_message(r)}",
                                                   r.status_code, permanent=True))

    def _refused(self, batch: list[tuple[bytes, DeliveryCallback | None, float]], r: httpx.Response) -> None:
        """A 400: the events it names fail; the others were refused only for being in their company."""
        try:
            errors = r.json().get("errors") or []
            bad = {int(e["index"]): e for e in errors if isinstance(e.get("index"), int)}
        except (ValueError, AttributeError, TypeError, KeyError):
            bad = {}
        if not bad or any(i >= len(batch) for i in bad):
            self._report(batch, HttpDeliveryFailed(f"{self.url}: HTTP 400: {_message(r)}", 400, permanent=True))
            return
        for i, item in enumerate(batch):
            if i in bad:
                e = bad[i]
                self._report([item], HttpDeliveryFailed(f"{self.url}: HTTP 400: {e.get('reason')}: {e.get('detail')}",
                                                        400, permanent=True))
        rest = [item for i, item in enumerate(batch) if i not in bad]
        if rest:
            self._deliver(rest)

    def _post(self, body: bytes, deadline: float) -> httpx.Response:
        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            backoff = min(0.2 * 2 ** (state.attempt_number - 1), 5.0)
            hinted = exc.retry_after_s if isinstance(exc, _Retryable) and exc.retry_after_s is not None else 0.0
            return max(0.0, min(max(backoff, hinted), deadline - time.monotonic()))

        def past_deadline(state: RetryCallState) -> bool:
            return time.monotonic() >= deadline

        for attempt in Retrying(stop=stop_after_attempt(self.max_attempts) | past_deadline, wait=wait,
                                retry=retry_if_exception(_retryable), reraise=True):
            with attempt:
                r = self._http.post(self.url, content=body)
                if r.status_code == 429 or r.status_code >= 500:
                    raise _Retryable(r.status_code, _message(r), _retry_after(r))
                return r
        raise AssertionError("unreachable: tenacity re-raises the last error")
