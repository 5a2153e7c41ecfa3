"""Structured logging: one JSON object per line on stderr, so every process's log is greppable
and machine-readable. Use ``get_logger(__name__).info("event name", key=value, ...)``."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

_CONFIGURED = False


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class StructLogger(logging.LoggerAdapter):
    """``log.info("batch written", events=n, seconds=dt)`` -> one JSON line."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        fields = {k: kwargs.pop(k) for k in list(kwargs) if k not in ("exc_info", "stack_info", "stacklevel", "extra")}
        kwargs["extra"] = {"fields": fields}
        return msg, kwargs


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at emit time, not the one seen at setup: a test
    harness or a daemonizing wrapper may replace (and close) the original."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def setup_logging(level: str = "INFO") -> None:
    global _CONFIGURED
    root = logging.getLogger("looprl")
    root.setLevel(level)
    if not _CONFIGURED:
        h = _CurrentStderrHandler()
        h.setFormatter(_JsonFormatter())
        root.addHandler(h)
        root.propagate = False
        _CONFIGURED = True


def get_logger(name: str) -> StructLogger:
    if not name.startswith("looprl"):
        name = "looprl." + name
    return StructLogger(logging.getLogger(name), {})
