"""The versioned event schema: the stable contract between product backends and looprl.

Two topics carry events (see config ``kafka.*``):
- served responses: one ``ResponseEvent`` per answer the serving tier gave;
- feedback: ``ThumbsEvent``, ``PreferenceEvent``, ``RatingEvent``, ``CorrectionEvent`` and
  ``ScoreEvent`` (a named metric: float, bool or category, as LangSmith's ``create_feedback`` and
  Langfuse's ``create_score``) about a served response, by ``response_id`` (storage joins in the
  prompt and completion). Every feedback kind may carry a free-text ``comment`` and a small JSON
  object ``metadata`` (bounded in bytes, depth and keys: ``MAX_METADATA_*``).

Every event carries ``schema_version``, a UUID ``event_id`` (the dedupe key), ``kind``,
a timestamp ``ts`` and an optional opaque ``user_id``. Texts are size-limited.

Compatibility rule: a new optional field keeps the version; anything else bumps
``SCHEMA_VERSION`` and the consumer keeps accepting every version in ``SUPPORTED_VERSIONS``.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, WrapValidator, model_validator,
)

SCHEMA_VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})
MAX_TEXT_CHARS = 16_000  # default; the consumer may apply the (smaller or larger) configured limit
MAX_ID_CHARS = 128
# The most tokens of one served completion the log keeps ids and log-probs for.
MAX_COMPLETION_TOKENS = 32_768

# metadata on feedback: its compact JSON encoding, its nesting (objects and arrays) and its keys
# (all levels together) are bounded, so one event cannot carry an unbounded document.
MAX_METADATA_BYTES = 8192
MAX_METADATA_DEPTH = 4
MAX_METADATA_KEYS = 64

Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]
# A score's name: a bounded label of printable characters (it names a metric, like "correctness").
ScoreName = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS, pattern=r"^[^\x00-\x1f\x7f]+$")]


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


class Sampling(BaseModel):
    """The sampling parameters a response was generated with (as the client sent them; None: the
    server's default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    temperature: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None = None
    top_k: int | None = None
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    seed: int | None = None
    stop: list[Annotated[str, Field(max_length=MAX_ID_CHARS * 2)]] | None = Field(None, max_length=16)
    presence_penalty: Annotated[float, Field(allow_inf_nan=False)] | None = None
    frequency_penalty: Annotated[float, Field(allow_inf_nan=False)] | None = None


class ResponseEvent(_Event):
    """One answer served by the serving tier (written by serving, not by product backends).

    ``completion_token_ids`` / ``completion_logprobs``: the tokens of the served completion and
    their log-probabilities under the serving policy, when the server reported them (off-policy
    learning needs exactly the served tokens and their behaviour log-probs)."""

    kind: Literal["response"] = "response"
    response_id: Id
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    completion: Text
    model: Id
    adapter_version: Annotated[str, Field(max_length=MAX_ID_CHARS)] | None = None
    sampling: Sampling | None = None
    completion_token_ids: list[Annotated[int, Field(ge=0, lt=2**31)]] | None = Field(
        None, max_length=MAX_COMPLETION_TOKENS)
    completion_logprobs: list[Annotated[float, Field(le=0, allow_inf_nan=False)]] | None = Field(
        None, max_length=MAX_COMPLETION_TOKENS)

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> "ResponseEvent":
        if self.prompt is None and not self.messages:
            raise ValueError("one of prompt or messages is required")
        ids, lps = self.completion_token_ids, self.completion_logprobs
        if ids is not None and lps is not None and len(ids) != len(lps):
            raise ValueError(f"completion_logprobs has {len(lps)} entries for {len(ids)} completion_token_ids")
        return self

    def prompt_text(self) -> str:
        """The prompt as one string (chat messages flattened in order)."""
        if self.prompt is not None:
            return self.prompt
        return "\n".join(f"{m.role}: {m.content}" for m in self.messages or [])


def _check_metadata(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """A JSON object within the ``MAX_METADATA_*`` bounds (finite numbers only)."""
    if value is None:
        return None
    keys = 0
    stack: list[tuple[Any, int, str]] = [(value, 1, "")]  # (value, nesting, path below metadata)
    while stack:
        v, depth, where = stack.pop()
        if isinstance(v, (dict, list)):
            if depth > MAX_METADATA_DEPTH:
                raise ValueError(f"{where}: nested deeper than {MAX_METADATA_DEPTH} levels of objects and arrays")
            if isinstance(v, dict):
                keys += len(v)
                if keys > MAX_METADATA_KEYS:
                    raise ValueError(f"more than {MAX_METADATA_KEYS} keys in all")
                for k, item in v.items():
                    if not isinstance(k, str):
                        raise ValueError(f"{where or 'object'}: key {k!r} is not a string")
                    stack.append((item, depth + 1, f"{where}.{k}" if where else k))
            else:
                stack.extend((item, depth + 1, f"{where}[{i}]") for i, item in enumerate(v))
        elif isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{where}: {v} is not a JSON number")
        elif not (v is None or isinstance(v, (str, int, float))):
            raise ValueError(f"{where}: a {type(v).__name__} is not a JSON value")
    size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())
    if size > MAX_METADATA_BYTES:
        raise ValueError(f"{size} bytes of JSON > {MAX_METADATA_BYTES}")
    return value


Metadata = Annotated[dict[str, Any], AfterValidator(_check_metadata)]


class _Feedback(_Event):
    """What every feedback kind may carry besides its own fields: the user's words (``comment``)
    and a small JSON object of the caller's (``metadata``: page, experiment, ...). Stored, never
    interpreted."""

    comment: Text | None = None
    metadata: Metadata | None = None


class ThumbsEvent(_Feedback):
    kind: Literal["thumbs"] = "thumbs"
    response_id: Id
    up: bool


class RatingEvent(_Feedback):
    kind: Literal["rating"] = "rating"
    response_id: Id
    rating: Annotated[int, Field(ge=1, le=5)]


class CorrectionEvent(_Feedback):
    """The user edited the answer: ``corrected`` is preferred over the served completion."""

    kind: Literal["correction"] = "correction"
    response_id: Id
    corrected: Text


class PreferenceEvent(_Feedback):
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


def _score_value(value: Any, handler: Any) -> Any:
    try:
        return handler(value)
    except ValidationError:  # one message instead of one per member of the union
        raise ValueError(f"expected a finite number, a boolean or a category label of 1 to {MAX_ID_CHARS} "
                         f"characters, got {_short(value)}") from None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class ScoreEvent(_Feedback):
    """A named score of a served response (LangSmith ``create_feedback(run_id, key, score)``,
    Langfuse ``create_score(trace_id, name, value)``): ``value`` is a finite number, a boolean or a
    category label. Every score is stored; the reward model trains only on the names listed in
    ``reward.score_names``, which say how a value maps to a label (see reward/README.md)."""

    kind: Literal["score"] = "score"
    response_id: Id
    name: ScoreName
    value: Annotated[bool | Annotated[float, Field(allow_inf_nan=False)]
                     | Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)], WrapValidator(_score_value)]


FeedbackEvent = Annotated[
    Union[ThumbsEvent, RatingEvent, CorrectionEvent, PreferenceEvent, ScoreEvent], Field(discriminator="kind")
]
Event = Annotated[
    Union[ResponseEvent, ThumbsEvent, RatingEvent, CorrectionEvent, PreferenceEvent, ScoreEvent],
    Field(discriminator="kind")
]
EVENT_KINDS = ("response", "thumbs", "rating", "correction", "preference", "score")
FEEDBACK_KINDS = ("thumbs", "rating", "correction", "preference", "score")

_EVENT = TypeAdapter(Event)


class InvalidEvent(ValueError):
    """An event that cannot be accepted. ``reason`` is a short bounded label (for metrics and
    the dead-letter topic); ``detail`` names the bad field; ``field`` is its dotted path in the
    event (``metadata.page``), when one field is to blame."""

    def __init__(self, reason: str, detail: str, field: str | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.field = field


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


def _loc(err: Any) -> str:
    """The field path of one pydantic error, without the union's kind tag (``thumbs.up`` -> ``up``)."""
    loc = [str(p) for p in err["loc"]]
    if loc and loc[0] in EVENT_KINDS:
        loc = loc[1:]
    return ".".join(loc)


def _describe(e: ValidationError) -> str:
    parts = []
    for err in e.errors()[:5]:
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{_loc(err) or '(event)'}: {msg}")
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
            loc = _loc(too_long[0])
            raise InvalidEvent("text_too_long", f"{loc} exceeds the text size limit", loc) from None
        raise InvalidEvent("invalid_fields", _describe(e), _loc(e.errors()[0]) or None) from None
    if max_text_chars is not None:
        for name, value in event:
            if isinstance(value, str) and len(value) > max_text_chars:
                raise InvalidEvent("text_too_long", f"{name} has {len(value)} chars > {max_text_chars}", name)
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
