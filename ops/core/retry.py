"""Retries and backoff, one policy for every stage.

``retrying`` retries a call through ``tenacity`` (exponential wait, bounded attempts, the last
error re-raised). ``backoff_seconds`` is the same exponential curve for loops that wait between
their own iterations (a poller after a failed pass, a supervisor before a restart)."""

from __future__ import annotations

from typing import Callable

from tenacity import Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential


def backoff_seconds(failures: int, initial: float, cap: float) -> float:
    """Wait before the next try after ``failures`` consecutive failures: initial * 2^(failures-1), capped."""
    if failures <= 0:
        return 0.0
    return min(cap, initial * 2 ** min(failures - 1, 30))


def retrying(attempts: int, *, initial: float, cap: float = 30.0,
             on: type[BaseException] | tuple[type[BaseException], ...] = Exception,
             sleep: Callable[[float], None] | None = None) -> Retrying:
    """``for attempt in retrying(3, initial=0.2, on=OSError): with attempt: call()`` or
    ``retrying(...)(call, *args)``: up to ``attempts`` tries, waits from ``backoff_seconds``."""
    kw = {"sleep": sleep} if sleep is not None else {}
    return Retrying(stop=stop_after_attempt(max(1, attempts)), wait=wait_exponential(multiplier=initial, max=cap),
                    retry=retry_if_exception_type(on), reraise=True, **kw)
