"""Score events, and comment/metadata on every feedback kind: schema, Parquet log, views, reward data."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from looprl.ingest.decode import Columns, decode
from looprl.ingest.schema import (
    MAX_METADATA_BYTES, MAX_METADATA_DEPTH, MAX_METADATA_KEYS, CorrectionEvent, InvalidEvent, PreferenceEvent,
    RatingEvent, ResponseEvent, ScoreEvent, ThumbsEvent, encode_event, parse_event,
)
from looprl.ops.core.config import ScoreSpec, load_config
from looprl.reward.data import FeedbackSource
from looprl.storage.event_schema import COMMON, SCHEMAS
from looprl.storage.events import EventLog
from looprl.storage.parts import PartWriter

T0 = datetime(2026, 3, 1, 10, 30, tzinfo=timezone.utc)


def write(events_dir, events, at=T0):
    cols: dict[str, Columns] = {}
    for i, e in enumerate(events):
        cols.setdefault(e.kind, Columns(e.kind)).append(e, str(e.event_id), "looprl.feedback", 0, i)
    return PartWriter(events_dir).write_batch({k: c.table(at) for k, c in cols.items()}, at)


def served(rid: str, user: str) -> ResponseEvent:
    return ResponseEvent(response_id=rid, prompt=f"question {rid}", completion=f"answer {rid}", model="policy",
                         adapter_version="v1", user_id=user)


# ------------------------------------------------------------------------------------------ schema
def test_score_value_keeps_its_type_through_the_wire_and_both_decoders():
    for value, want in [(0.75, 0.75), (3, 3.0), (True, True), (False, False), ("good", "good"), ("1", "1")]:
        e = ScoreEvent(response_id="r", name="correctness", value=value, comment="why", metadata={"k": [1, None]})
        raw = encode_event(e)
        for got in (parse_event(raw), decode(raw, 65536)):
            assert got == e and type(got.value) is type(want) and got.value == want


@pytest.mark.parametrize("fields, field, words", [
    ({"value": float("nan")}, "value", "finite number"),
    ({"value": [1]}, "value", "category label"),
    ({"value": ""}, "value", "category label"),
    ({"value": "x" * 129}, "value", "category label"),
    ({"name": ""}, "name", "at least 1"),
    ({"name": "a\nb"}, "name", "pattern"),
    ({"metadata": {"a": {"b": {"c": {"d": [1]}}}}}, "metadata", "a.b.c.d: nested deeper"),
    ({"metadata": {f"k{i}": i for i in range(MAX_METADATA_KEYS + 1)}}, "metadata", "keys in all"),
    ({"metadata": {"k": "x" * MAX_METADATA_BYTES}}, "metadata", "bytes of JSON"),
    ({"metadata": [1, 2]}, "metadata", "dictionary"),
    ({"metadata": {"when": datetime(2026, 1, 1)}}, "metadata", "not a JSON value"),
    ({"comment": "x" * 16_001}, "comment", "16000"),
])
def test_bad_scores_and_metadata_name_the_field(fields, field, words):
    event = {"kind": "score", "response_id": "r", "name": "n", "value": 1.0, **fields}
    with pytest.raises(ValidationError) as e:
        ScoreEvent(**{k: v for k, v in event.items() if k != "kind"})
    assert field in str(e.value) and words in str(e.value)
    if "when" not in str(fields):  # JSON can carry it: the decoders refuse it, naming the field
        raw = json.dumps(event, allow_nan=True).encode()
        for parse in (lambda: parse_event(raw), lambda: decode(raw, 1 << 20)):
            with pytest.raises(InvalidEvent) as err:
                parse()
            assert err.value.field == field and err.value.reason in ("invalid_fields", "text_too_long")


def test_metadata_at_the_limits_is_accepted():
    deepest = {"a": {"b": {"c": [1]}}}  # MAX_METADATA_DEPTH levels of objects and arrays
    assert MAX_METADATA_DEPTH == 4
    many = {f"k{i}": i for i in range(MAX_METADATA_KEYS)}
    assert ThumbsEvent(response_id="r", up=True, metadata=deepest).metadata == deepest
    assert RatingEvent(response_id="r", rating=3, metadata=many).metadata == many


def test_every_feedback_kind_takes_comment_and_metadata():
    extra = {"comment": "made my day", "metadata": {"page": "checkout", "ab": {"arm": 2}}}
    for e in [ThumbsEvent(response_id="r", up=True, **extra), RatingEvent(response_id="r", rating=4, **extra),
              CorrectionEvent(response_id="r", corrected="c", **extra),
              PreferenceEvent(chosen_response_id="a", rejected_response_id="b", **extra),
              ScoreEvent(response_id="r", name="n", value=0.5, **extra)]:
        assert decode(encode_event(e), 65536) == e
    with pytest.raises(ValidationError):  # a response is not feedback
        ResponseEvent(response_id="r", prompt="p", completion="c", model="m", comment="no")


# ----------------------------------------------------------------------------------- log and views
def test_scores_comments_and_metadata_are_stored_and_joined(tmp_path):
    ev = tmp_path / "events"
    write(ev, [served("r1", "alice"),
               ScoreEvent(response_id="r1", name="helpful", value=0.9, comment="clear", metadata={"src": "web"}, ts=T0),
               ScoreEvent(response_id="r1", name="toxic", value=False),
               ScoreEvent(response_id="r1", name="tone", value="friendly"),
               ThumbsEvent(response_id="r1", up=True, comment="thanks", metadata={"n": 1.5})])
    write(ev, [ScoreEvent(response_id="r1", name="helpful", value=0.4, ts=T0 + timedelta(minutes=1))],
          at=T0 + timedelta(minutes=1))  # alice changed her mind: replaces her first "helpful"
    con = EventLog(ev).connect()
    rows = con.sql("SELECT kind, name, value_number, value_bool, value_category, comment, metadata, completion, "
                   "voter FROM feedback_joined ORDER BY kind, name, ingested_at").fetchall()
    assert rows == [
        ("score", "helpful", 0.9, None, None, "clear", '{"src":"web"}', "answer r1", "alice"),
        ("score", "helpful", 0.4, None, None, None, None, "answer r1", "alice"),
        ("score", "tone", None, None, "friendly", None, None, "answer r1", "alice"),
        ("score", "toxic", None, False, None, None, None, "answer r1", "alice"),
        ("thumbs", None, None, None, None, "thanks", '{"n":1.5}', "answer r1", "alice"),
    ]
    votes = con.sql("SELECT name, value_number FROM feedback_votes WHERE kind = 'score' ORDER BY name").fetchall()
    assert votes == [("helpful", 0.4), ("tone", None), ("toxic", None)]  # one vote per (name, voter)
    assert EventLog(ev).stats().kinds["score"].events == 4


def test_parts_written_before_comment_and_metadata_still_read(tmp_path):
    ev = tmp_path / "events"
    old_schema = pa.schema([*COMMON, pa.field("response_id", pa.string(), nullable=False),
                            pa.field("up", pa.bool_(), nullable=False)])
    assert set(SCHEMAS["thumbs"].names) - set(old_schema.names) == {"comment", "metadata"}
    old = pa.table({"event_id": ["old-1"], "kind": ["thumbs"], "schema_version": pa.array([1], pa.int16()),
                    "ts": pa.array([T0], COMMON[3].type), "user_id": ["u"], "ingested_at": pa.array([T0], COMMON[5].type),
                    "kafka_topic": ["t"], "kafka_partition": pa.array([0], pa.int32()),
                    "kafka_offset": pa.array([0], pa.int64()), "response_id": ["r1"], "up": [True]}, schema=old_schema)
    part = ev / "kind=thumbs" / "hour=2026-03-01T10" / "part-1-old-1.parquet"
    part.parent.mkdir(parents=True)
    pq.write_table(old, part)
    # every thumbs part is old: the new columns read as NULL
    assert EventLog(ev).connect().sql("SELECT event_id, comment, metadata FROM feedback").fetchall() == [
        ("old-1", None, None)]
    write(ev, [ThumbsEvent(response_id="r1", up=False, comment="new", event_id="00000000-0000-4000-8000-000000000001")],
          at=T0 + timedelta(hours=1))
    got = EventLog(ev).connect().sql("SELECT event_id, up, comment FROM feedback ORDER BY event_id").fetchall()
    assert got == [("00000000-0000-4000-8000-000000000001", False, "new"), ("old-1", True, None)]


# ------------------------------------------------------------------------------------ reward data
def test_score_events_reach_new_examples_as_labelled_points(tmp_path):
    cfg = load_config(environ={}, workspace=tmp_path / "ws", reward={"score_names": {
        "helpful": {},                                             # [0, 1], higher is better
        "stars": {"min": 1, "max": 10},
        "toxic": {"higher_is_better": False},                      # true is the bad answer
        "tone": {"categories": {"friendly": 1.0, "curt": 0.25}},
    }})
    assert cfg.reward.score_names["stars"] == ScoreSpec(min=1, max=10)
    ev = tmp_path / "events"
    answers = [served(f"r{i}", f"user{i}") for i in range(10)]
    score = {
        "helpful-0.8": ScoreEvent(response_id="r0", name="helpful", value=0.8),
        "stars-7": ScoreEvent(response_id="r1", name="stars", value=7),
        "toxic-true": ScoreEvent(response_id="r2", name="toxic", value=True),
        "toxic-false": ScoreEvent(response_id="r3", name="toxic", value=False),
        "tone-curt": ScoreEvent(response_id="r4", name="tone", value="curt"),
        "helpful-bool": ScoreEvent(response_id="r5", name="helpful", value=True),
        # stored, not trained: out of range, unmapped category, a name not listed, not resolved yet
        "stars-11": ScoreEvent(response_id="r6", name="stars", value=11),
        "tone-odd": ScoreEvent(response_id="r7", name="tone", value="sarcastic"),
        "latency": ScoreEvent(response_id="r8", name="latency_ms", value=320.0),
        "orphan": ScoreEvent(response_id="r-not-served", name="helpful", value=1.0),
    }
    write(ev, [*answers, *score.values(), ThumbsEvent(response_id="r9", up=True)])
    con = EventLog(ev).connect()
    src = FeedbackSource(con, score_names=cfg.reward.score_names)
    got = {e.event_id: e for e in src.new_examples(set())}
    labels = {k: got[str(e.event_id)].label for k, e in score.items() if str(e.event_id) in got}
    assert labels == {"helpful-0.8": 0.8, "stars-7": pytest.approx(6 / 9), "toxic-true": 0.0, "toxic-false": 1.0,
                      "tone-curt": 0.25, "helpful-bool": 1.0}
    ex = got[str(score["stars-7"].event_id)]
    assert (ex.kind, ex.completion, ex.is_pair, ex.prompt.last_user()) == ("score", "answer r1", False, "question r1")
    assert len(got) == 7  # the six scores and the thumbs
    assert src.count_new(set()) == 7  # what is not trained is not counted as waiting either
    assert {e.event_id for e in src.examples_by_id([str(score["tone-curt"].event_id)])} == {
        str(score["tone-curt"].event_id)}
    # without an allow-list no score trains; the other kinds are untouched
    assert [e.kind for e in FeedbackSource(con).new_examples(set())] == ["thumbs"]
    stored = con.sql("SELECT count(*) FROM feedback WHERE kind = 'score'").fetchall()[0][0]
    assert stored == len(score)


def test_score_spec_rejects_an_empty_range():
    with pytest.raises(Exception) as e:
        load_config(environ={}, reward={"score_names": {"x": {"min": 2, "max": 2}}})
    assert "reward.score_names.x.max" in str(e.value)
