"""The event schema (``looprl.ingest.schema``) and the consumer's fast decoder agree with it."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from looprl.ingest.decode import decode
from looprl.ingest.schema import (
    DLQ_REASONS, MAX_TEXT_CHARS, ChatMessage, CorrectionEvent, InvalidEvent, PreferenceEvent, RatingEvent,
    ResponseEvent, ThumbsEvent, encode_event, parse_event,
)

MAX_BYTES = 64 * 1024

VALID = [
    ResponseEvent(response_id="r1", prompt="hi", completion="hello", model="policy", adapter_version="v2"),
    ResponseEvent(response_id="r2", messages=[ChatMessage(role="user", content="hi")], completion="yo", model="base"),
    ThumbsEvent(response_id="r1", up=False, user_id="u"),
    RatingEvent(response_id="r1", rating=5),
    CorrectionEvent(response_id="r1", corrected="better"),
    PreferenceEvent(chosen_response_id="a", rejected_response_id="b"),
    PreferenceEvent(prompt="p", chosen_text="x", rejected_text="y"),
]


@pytest.mark.parametrize("event", VALID, ids=lambda e: e.kind)
def test_round_trip_through_the_wire_form(event):
    raw = encode_event(event)
    assert parse_event(raw) == event
    assert decode(raw, MAX_BYTES) == event


def test_flattened_prompt_of_chat_messages():
    e = ResponseEvent(response_id="r", messages=[ChatMessage(role="system", content="be nice"),
                                                 ChatMessage(role="user", content="hi")], completion="c", model="m")
    assert e.prompt_text() == "system: be nice\nuser: hi"


def test_naive_timestamp_is_read_as_utc():
    raw = json.dumps({"kind": "thumbs", "response_id": "r", "up": True, "ts": "2024-05-01T12:00:00"}).encode()
    assert decode(raw, MAX_BYTES).ts == datetime(2024, 5, 1, 12, tzinfo=timezone.utc)


@pytest.mark.parametrize("raw, reason, names", [
    (b"{not json", "bad_json", ""),
    (b"\xff\xfe", "bad_json", ""),
    (b"[1, 2]", "not_an_object", "list"),
    (b'{"kind": "hug", "response_id": "r"}', "unknown_kind", "hug"),
    (b'{"response_id": "r", "up": true}', "unknown_kind", "None"),
    (b'{"kind": "thumbs", "response_id": "r", "up": true, "schema_version": 7}', "unsupported_schema_version", "7"),
    (b'{"kind": "thumbs", "response_id": "r", "up": "maybe"}', "invalid_fields", "up"),
    (b'{"kind": "rating", "response_id": "r", "rating": 9}', "invalid_fields", "rating"),
    (b'{"kind": "thumbs", "up": true}', "invalid_fields", "response_id"),
    (b'{"kind": "thumbs", "response_id": "r", "up": true, "extra": 1}', "invalid_fields", "extra"),
    (b'{"kind": "preference", "chosen_response_id": "a"}', "invalid_fields", "preference needs"),
    (b'{"kind": "preference", "chosen_response_id": "a", "rejected_response_id": "a"}', "invalid_fields", "differ"),
    (b'{"kind": "response", "response_id": "r", "completion": "c", "model": "m"}', "invalid_fields", "prompt"),
    (b'{"kind": "thumbs", "response_id": "r", "up": true, "event_id": "nope"}', "invalid_fields", "event_id"),
])
def test_invalid_events_name_the_reason_and_field(raw, reason, names):
    for fn in (lambda: parse_event(raw, max_bytes=MAX_BYTES), lambda: decode(raw, MAX_BYTES)):
        with pytest.raises(InvalidEvent) as e:
            fn()
        assert e.value.reason == reason
        assert names in e.value.detail
        assert reason in DLQ_REASONS


def test_size_limits():
    long = "x" * (MAX_TEXT_CHARS + 1)
    raw = json.dumps({"kind": "correction", "response_id": "r", "corrected": long}).encode()
    with pytest.raises(InvalidEvent) as e:
        decode(raw, 10 * MAX_BYTES)
    assert e.value.reason == "text_too_long" and "corrected" in e.value.detail
    with pytest.raises(InvalidEvent) as e:
        decode(raw, 1000)
    assert e.value.reason == "too_large"
    # the configured (smaller) text limit applies on the fast path too, chat messages included
    ok = encode_event(ResponseEvent(response_id="r", messages=[ChatMessage(role="user", content="y" * 50)],
                                    completion="c", model="m"))
    assert decode(ok, MAX_BYTES, max_text_chars=100).kind == "response"
    with pytest.raises(InvalidEvent) as e:
        decode(ok, MAX_BYTES, max_text_chars=20)
    assert e.value.reason == "text_too_long" and "messages.0.content" in e.value.detail


def test_null_value_is_dead_lettered_not_crashed():
    with pytest.raises(InvalidEvent) as e:
        decode(None, MAX_BYTES)
    assert e.value.reason == "bad_json"


def test_sdk_side_validation_names_the_field():
    with pytest.raises(ValidationError) as e:
        RatingEvent(response_id="r", rating=0)
    assert "rating" in str(e.value)


# ---------------------------------------------------------------- property: fast path == reference
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
_kinds = st.sampled_from(["response", "thumbs", "rating", "correction", "preference", "score", "nope", "", 3])
_fields = st.dictionaries(
    st.sampled_from(["response_id", "up", "rating", "corrected", "prompt", "completion", "model", "messages",
                     "chosen_response_id", "rejected_response_id", "chosen_text", "rejected_text", "user_id",
                     "schema_version", "event_id", "ts", "adapter_version", "name", "value", "comment", "metadata",
                     "bogus"]),
    st.one_of(st.text(max_size=12), st.booleans(), st.integers(-3, 9), st.none(), st.just(str(uuid.uuid4())),
              st.just("2024-01-01T00:00:00Z"), st.lists(st.fixed_dictionaries(
                  {"role": st.sampled_from(["user", "bot"]), "content": st.text(max_size=5)}), max_size=2),
              st.floats(allow_nan=False, allow_infinity=False), st.dictionaries(st.text(max_size=6), _json, max_size=5),
              st.just({"a": {"b": {"c": {"d": [1]}}}}), st.just({"k": "x" * 9000})),
    max_size=8,
)
_payloads = st.one_of(
    st.binary(max_size=64),
    _json.map(lambda v: json.dumps(v).encode()),
    st.builds(lambda k, f: json.dumps({"kind": k, **f}).encode(), _kinds, _fields),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_payloads)
def test_fast_decoder_agrees_with_the_reference_parser(raw):
    """For any bytes: both accept the same event, or both reject with the same reason."""
    try:
        want = parse_event(raw, max_bytes=MAX_BYTES, max_text_chars=MAX_TEXT_CHARS)
    except InvalidEvent as e:
        with pytest.raises(InvalidEvent) as got:
            decode(raw, MAX_BYTES)
        assert got.value.reason == e.reason and got.value.reason in DLQ_REASONS
    else:
        got = decode(raw, MAX_BYTES)
        # event_id and ts are generated where the event has none: those differ between two parses
        generated = {"event_id", "ts"} - want.model_fields_set
        # JSON, not dicts: True == 1.0 in Python, and a score's value must keep its type
        assert got.model_dump_json(exclude=generated) == want.model_dump_json(exclude=generated)
        assert type(got) is type(want) and got.model_fields_set == want.model_fields_set
