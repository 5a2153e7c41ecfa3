"""Stop events for long-running commands: SIGTERM (a supervisor, docker stop) and SIGINT (Ctrl-C)
set an event that every loop polls, so a stage ends its current step and closes cleanly."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event | None = None) -> Iterator[threading.Event]:
    """``with stop_on_signals() as stop: while not stop.is_set(): ...``. Handlers are installed
    only in the main thread (Python allows no other) and the previous ones are restored after."""
    stop = stop if stop is not None else threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for s in STOP_SIGNALS:
            previous[s] = signal.getsignal(s)
            signal.signal(s, lambda *_: stop.set())
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
