"""Structured logging on stderr. Use ``get_logger(__name__).info("event name", key=value, ...)``.

Two renderings of the same records: one JSON object per line (machine-readable: containers,
log shippers, the tests that parse a subprocess's stderr) and one plain line per record for a
person at a terminal (``12:00:01 INFO    ops.cli  config  command="serving serve" workspace=ws``).
``log_format = "auto"`` picks human when stderr is a terminal at start-up, JSON otherwise;
``human`` / ``json`` force one (``looprl --log-format``, config key ``log_format``)."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any, Literal

_HANDLER: logging.Handler | None = None


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
    """``log.info("batch written", events=n, seconds=dt)`` -> one line (JSON or human)."""

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


LogFormat = Literal["auto", "human", "json"]

# Level colours of the human rendering (ANSI SGR), on a terminal only.
_COLOURS = {"DEBUG": "2", "INFO": "32", "WARNING": "33", "ERROR": "31", "CRITICAL": "1;31"}
_BARE = re.compile(r"[^\s\"'=]+")


def _human_value(v: Any) -> str:
    if isinstance(v, str):
        return v if _BARE.fullmatch(v) else json.dumps(v)
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, default=str, separators=(",", ":"))
    return str(v)


class _HumanFormatter(logging.Formatter):
    """``HH:MM:SS LEVEL logger  msg  key=value ...`` on one line (a traceback follows it)."""

    def __init__(self, colour: bool = False):
        super().__init__()
        self.colour = colour

    def format(self, record: logging.LogRecord) -> str:
        level = f"{record.levelname:<7}"
        if self.colour:
            level = f"\x1b[{_COLOURS.get(record.levelname, '0')}m{level}\x1b[0m"
        name = record.name.removeprefix("looprl.")
        parts = [time.strftime("%H:%M:%S", time.localtime(record.created)), level, name, " " + record.getMessage()]
        fields = getattr(record, "fields", None)
        if fields:
            parts.append(" " + " ".join(f"{k}={_human_value(v)}" for k, v in fields.items()))
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def resolve_format(fmt: LogFormat = "auto") -> Literal["human", "json"]:
    """``auto``: human when stderr is a terminal now, else JSON (pipes, files, containers)."""
    if fmt not in ("auto", "human", "json"):
        raise ValueError(f"log format {fmt!r}: use auto, human or json")
    if fmt != "auto":
        return fmt
    isatty = getattr(sys.stderr, "isatty", None)
    return "human" if isatty is not None and isatty() else "json"


def setup_logging(level: str = "INFO", fmt: LogFormat = "auto") -> None:
    """Route the ``looprl`` loggers to stderr at ``level``, rendered as ``fmt`` (see the module doc).
    Called again (tests run several commands in one process), it replaces level and rendering."""
    global _HANDLER
    root = logging.getLogger("looprl")
    root.setLevel(level)
    if _HANDLER is None:
        _HANDLER = _CurrentStderrHandler()
        root.addHandler(_HANDLER)
        root.propagate = False
    if resolve_format(fmt) == "human":
        isatty = getattr(sys.stderr, "isatty", None)
        _HANDLER.setFormatter(_HumanFormatter(colour=isatty is not None and isatty()))
    else:
        _HANDLER.setFormatter(_JsonFormatter())


def get_logger(name: str) -> StructLogger:
    if not name.startswith("looprl"):
        name = "looprl." + name
    return StructLogger(logging.getLogger(name), {})
