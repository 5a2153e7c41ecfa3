"""The versioned event schema: the stable contract between product backends and looprl.

Two topics carry events (see config ``kafka.*``):
- served responses: one ``ResponseEvent`` per answer the serving tier gave;
- feedback: ``ThumbsEvent``, ``PreferenceEvent``, ``RatingEvent``, ``CorrectionEvent`` about
  a served response, by ``response_id`` (storage joins in the prompt and completion).

Every event carries ``schema_version``, a UUID ``event_id`` (the dedupe key), ``kind``,
a timestamp ``ts`` and an optional opaque ``user_id``. Texts are size-limited.

Compatibility rule: a new optional field keeps the version; anything else bumps
``SCHEMA_VERSION`` and the consumer keeps accepting every version in ``SUPPORTED_VERSIONS``.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

SCHEMA_VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})
MAX_TEXT_CHARS = 16_000  # default; the consumer may apply the (smaller or larger) configured limit
MAX_ID_CHARS = 128

Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]


def new_event_id() -> str:
    return str(uuid.uuid4())


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "tool"]
    content: Text


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    schema_version: int = SCHEMA_VERSION
    event_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    ts: datetime = Field(default_factory=utcnow)
    user_id: Annotated[str, Field(max_length=MAX_ID_CHARS)] | None = None

    @model_validator(mode="after")
    def _check_version(self) -> "_Event":
        if self.schema_version not in SUPPORTED_VERSIONS:
            raise ValueError(f"unsupported schema_version {self.schema_version}; supported: {sorted(SUPPORTED_VERSIONS)}")
        if self.ts.tzinfo is None:
            # Naive timestamps are ambiguous across backends; we read them as UTC.
            object.__setattr__(self, "ts", self.ts.replace(tzinfo=timezone.utc))
        return self


class ResponseEvent(_Event):
    """One answer served by the serving tier (written by serving, not by product backends)."""

    kind: Literal["response"] = "response"
    response_id: Id
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    completion: Text
    model: Id
    adapter_version: Annotated[str, Field(max_length=MAX_ID_CHARS)] | None = None

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> "ResponseEvent":
        if self.prompt is None and not self.messages:
            raise ValueError("one of prompt or messages is required")
        return self

    def prompt_text(self) -> str:
        """The prompt as one string (chat messages flattened in order)."""
        if self.prompt is not None:
            return self.prompt
        return "\n".join(f"{m.role}: {m.content}" for m in self.messages or [])


class ThumbsEvent(_Event):
    kind: Literal["thumbs"] = "thumbs"
    response_id: Id
    up: bool


class RatingEvent(_Event):
    kind: Literal["rating"] = "rating"
    response_id: Id
    rating: Annotated[int, Field(ge=1, le=5)]


class CorrectionEvent(_Event):
    """The user edited the answer: ``corrected`` is preferred over the served completion."""

    kind: Literal["correction"] = "correction"
    response_id: Id
    corrected: Text


class PreferenceEvent(_Event):
    """A pairwise preference, by served response ids or by texts (with a shared prompt)."""

    kind: Literal["preference"] = "preference"
    chosen_response_id: Id | None = None
    rejected_response_id: Id | None = None
    prompt: Text | None = None
    chosen_text: Text | None = None
    rejected_text: Text | None = None

    @model_validator(mode="after")
    def _ids_or_texts(self) -> "PreferenceEvent":
        by_id = self.chosen_response_id is not None and self.rejected_response_id is not None
        by_text = self.prompt is not None and self.chosen_text is not None and self.rejected_text is not None
        if not (by_id or by_text):
            raise ValueError(
                "preference needs chosen_response_id and rejected_response_id, "
                "or prompt, chosen_text and rejected_text"
            )
        if by_id and self.chosen_response_id == self.rejected_response_id:
            raise ValueError("chosen_response_id and rejected_response_id must differ")
        return self


FeedbackEvent = Annotated[
    Union[ThumbsEvent, RatingEvent, CorrectionEvent, PreferenceEvent], Field(discriminator="kind")
]
Event = Annotated[
    Union[ResponseEvent, ThumbsEvent, RatingEvent, CorrectionEvent, PreferenceEvent], Field(discriminator="kind")
]
EVENT_KINDS = ("response", "thumbs", "rating", "correction", "preference")
FEEDBACK_KINDS = ("thumbs", "rating", "correction", "preference")

_EVENT = TypeAdapter(Event)


class InvalidEvent(ValueError):
    """An event that cannot be accepted. ``reason`` is a short bounded label (for metrics and
    the dead-letter topic); ``detail`` names the bad field."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class TsWindow:
    """How far (seconds) an event's ``ts`` may lie before and after ingest time."""

    max_past_s: float
    max_future_s: float


def check_ts(ts: datetime, window: TsWindow | None = None, now: datetime | None = None) -> None:
    """Raise ``InvalidEvent("ts_out_of_range")`` for a ``ts`` with no UTC equivalent in Python's
    datetime range (``9999-12-31T23:59:59-23:59`` is year 10000 in UTC: every later read of it
    would overflow) or, given ``window``, outside that window around ``now`` (default: now)."""
    try:
        utc = ts.astimezone(timezone.utc)
    except OverflowError:
        raise InvalidEvent("ts_out_of_range", f"ts {ts.isoformat()} is outside the representable range in UTC") from None
    if window is None:
        return
    now = now or utcnow()
    ahead = (utc - now).total_seconds()
    if ahead > window.max_future_s:
        raise InvalidEvent("ts_out_of_range", f"ts {utc.isoformat()} is {ahead:.0f} s after ingest time "
                                              f"{now.isoformat()} (limit ingest.ts_max_future_s={window.max_future_s:g})")
    if -ahead > window.max_past_s:
        raise InvalidEvent("ts_out_of_range", f"ts {utc.isoformat()} is {-ahead:.0f} s before ingest time "
                                              f"{now.isoformat()} (limit ingest.ts_max_past_s={window.max_past_s:g})")


def _describe(e: ValidationError) -> str:
    parts = []
    for err in e.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "(event)"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def validate_event(obj: Any, max_text_chars: int | None = None, ts_window: TsWindow | None = None) -> _Event:
    """Validate a decoded JSON object into a typed event, or raise ``InvalidEvent``.

    Reasons: ``not_an_object``, ``unknown_kind``, ``unsupported_schema_version``,
    ``text_too_long``, ``invalid_fields``, ``ts_out_of_range`` (see ``check_ts``).
    """
    if not isinstance(obj, dict):
        raise InvalidEvent("not_an_object", f"expected a JSON object, got {type(obj).__name__}")
    kind = obj.get("kind")
    if kind not in EVENT_KINDS:
        raise InvalidEvent("unknown_kind", f"kind={kind!r}; expected one of {', '.join(EVENT_KINDS)}")
    version = obj.get("schema_version", SCHEMA_VERSION)
    if isinstance(version, int) and not isinstance(version, bool) and version not in SUPPORTED_VERSIONS:
        raise InvalidEvent("unsupported_schema_version", f"schema_version={version!r}")
    try:
        event = _EVENT.validate_python(obj)
    except ValidationError as e:
        too_long = [err for err in e.errors() if err["type"] == "string_too_long"]
        if too_long:
            loc = ".".join(str(p) for p in too_long[0]["loc"])
            raise InvalidEvent("text_too_long", f"{loc} exceeds the text size limit") from None
        raise InvalidEvent("invalid_fields", _describe(e)) from None
    if max_text_chars is not None:
        for name, value in event:
            if isinstance(value, str) and len(value) > max_text_chars:
                raise InvalidEvent("text_too_long", f"{name} has {len(value)} chars > {max_text_chars}")
    check_ts(event.ts, ts_window)
    return event


def parse_event(raw: bytes, max_bytes: int | None = None, max_text_chars: int | None = None,
                ts_window: TsWindow | None = None) -> _Event:
    """Decode bytes from Kafka or HTTP into a typed event, or raise ``InvalidEvent``
    (reasons above plus ``too_large`` and ``bad_json``)."""
    if max_bytes is not None and len(raw) > max_bytes:
        raise InvalidEvent("too_large", f"{len(raw)} bytes > {max_bytes}")
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise InvalidEvent("bad_json", str(e)[:200]) from None
    return validate_event(obj, max_text_chars=max_text_chars, ts_window=ts_window)


def encode_event(event: _Event) -> bytes:
    """The wire form: compact UTF-8 JSON."""
    return event.model_dump_json(exclude_none=True).encode()


DLQ_REASONS = (
    "not_an_object", "unknown_kind", "unsupported_schema_version", "text_too_long",
    "invalid_fields", "too_large", "bad_json", "ts_out_of_range", "wrong_topic", "orphan_feedback",
)
