"""The Parquet event log's write side (atomic part files) and read side (DuckDB views, CLI)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from looprl.ingest.decode import Columns
from looprl.ingest.schema import (
    ChatMessage, CorrectionEvent, PreferenceEvent, RatingEvent, ResponseEvent, ThumbsEvent,
)
from looprl.storage.event_schema import SCHEMAS
from looprl.storage.events import VIEWS, EventLog
from looprl.storage.parts import PartWriter, clean_temp, part_files, recent_event_ids

T0 = datetime(2026, 3, 1, 10, 30, tzinfo=timezone.utc)


def write(events_dir, events, at=T0):
    """Write ``events`` the way ingest does (one part per kind); returns the part paths."""
    cols: dict[str, Columns] = {}
    for i, e in enumerate(events):
        cols.setdefault(e.kind, Columns(e.kind)).append(e, str(e.event_id), "topic", 0, i)
    return PartWriter(events_dir).write_batch({k: c.table(at) for k, c in cols.items()}, at)


def test_every_view_works_on_an_empty_log(tmp_path):
    log = EventLog(tmp_path / "events")  # does not even exist
    con = log.connect()
    for view in VIEWS:
        assert con.sql(f"SELECT count(*) FROM {view}").fetchall()[0][0] == 0
    # typed columns, so queries that filter or aggregate work before the first event arrives
    t = con.sql("SELECT * FROM feedback_joined WHERE up AND rating > 3 AND epoch(ts) > 0").to_arrow_table()
    assert {"event_id", "kind", "ts", "ingested_at", "user_id", "response_id", "prompt", "completion",
            "adapter_version", "up", "rating", "corrected"} <= set(t.column_names)
    assert t.schema.field("ts").type == pa.timestamp("us", tz="UTC")
    p = con.sql("SELECT * FROM preferences_joined").to_arrow_table()
    assert {"event_id", "ts", "ingested_at", "prompt", "chosen", "rejected"} <= set(p.column_names)
    assert log.stats().total == 0


def test_views_join_feedback_to_the_responses(tmp_path):
    ev = tmp_path / "events"
    r1 = ResponseEvent(response_id="r1", prompt="tell me", completion="sunny!", model="policy", adapter_version="v3")
    r2 = ResponseEvent(response_id="r2", messages=[ChatMessage(role="user", content="hi")], completion="meh",
                       model="policy", adapter_version="v4")
    r1_again = ResponseEvent(response_id="r1", prompt="tell me", completion="sunny!", model="policy",
                             adapter_version="v3")  # a retried log call: new event id, same response
    fb = [ThumbsEvent(response_id="r1", up=True, user_id="u1"), RatingEvent(response_id="r2", rating=2),
          CorrectionEvent(response_id="r2", corrected="great!"), ThumbsEvent(response_id="r-missing", up=False)]
    prefs = [PreferenceEvent(chosen_response_id="r1", rejected_response_id="r2"),
             PreferenceEvent(prompt="p", chosen_text="a", rejected_text="b"),
             PreferenceEvent(chosen_response_id="r1", rejected_response_id="r-missing")]
    write(ev, [r1, r2, *fb, prefs[0]])
    write(ev, [r1_again, *prefs[1:]], at=T0 + timedelta(hours=1))  # another hour directory
    log = EventLog(ev)

    assert log.query("SELECT count(*) AS n FROM responses").column("n")[0].as_py() == 3
    assert log.query("SELECT count(*) AS n FROM feedback").column("n")[0].as_py() == len(fb) + len(prefs)
    rows = {r["event_id"]: r for r in log.query("SELECT * FROM feedback_joined").to_pylist()}
    assert len(rows) == len(fb) + len(prefs)  # the duplicated response did not multiply rows
    up = rows[str(fb[0].event_id)]
    assert (up["prompt"], up["completion"], up["adapter_version"], up["up"], up["user_id"]) == \
        ("tell me", "sunny!", "v3", True, "u1")
    rating = rows[str(fb[1].event_id)]
    assert (rating["prompt"], rating["rating"], rating["adapter_version"]) == ("user: hi", 2, "v4")
    assert rows[str(fb[2].event_id)]["corrected"] == "great!"
    missing = rows[str(fb[3].event_id)]
    assert missing["prompt"] is None and missing["completion"] is None
    assert all(r["ingested_at"] in (T0, T0 + timedelta(hours=1)) for r in rows.values())

    pj = {r["event_id"]: r for r in log.query("SELECT * FROM preferences_joined").to_pylist()}
    assert (pj[str(prefs[0].event_id)]["prompt"], pj[str(prefs[0].event_id)]["chosen"],
            pj[str(prefs[0].event_id)]["rejected"]) == ("tell me", "sunny!", "meh")
    assert pj[str(prefs[0].event_id)]["chosen_adapter_version"] == "v3"
    assert (pj[str(prefs[1].event_id)]["prompt"], pj[str(prefs[1].event_id)]["chosen"],
            pj[str(prefs[1].event_id)]["rejected"]) == ("p", "a", "b")
    assert pj[str(prefs[2].event_id)]["rejected"] is None  # resolved once that response arrives

    st = log.stats()
    assert st.kinds["response"].events == 3 and st.kinds["response"].files == 2
    assert st.kinds["preference"].events == 3 and st.feedback_unresolved == 1
    assert st.kinds["thumbs"].last_ingested_at == T0


def test_pinned_labelled_responses_give_the_same_votes(tmp_path):
    """pin_labelled_responses: the vote views read the same rows from the snapshot of the responses
    feedback names; responses nobody labelled are not in it."""
    ev = tmp_path / "events"
    rs = [ResponseEvent(response_id=f"r{i}", prompt=f"q{i}", completion=f"a{i}", model="policy",
                        adapter_version="v1", user_id=f"u{i}") for i in range(6)]
    again = ResponseEvent(response_id="r1", prompt="q1", completion="a1", model="policy", adapter_version="v1",
                          user_id="u1")
    fb = [ThumbsEvent(response_id="r0", up=True), ThumbsEvent(response_id="r0", up=False, user_id="x"),
          RatingEvent(response_id="r1", rating=5), CorrectionEvent(response_id="r2", corrected="better"),
          ThumbsEvent(response_id="r-missing", up=True)]
    prefs = [PreferenceEvent(chosen_response_id="r3", rejected_response_id="r4"),
             PreferenceEvent(chosen_response_id="r4", rejected_response_id="r3"),
             PreferenceEvent(prompt="p", chosen_text="a", rejected_text="b")]
    write(ev, [*rs, *fb, prefs[0]])
    write(ev, [again, *prefs[1:]], at=T0 + timedelta(hours=1))
    log = EventLog(ev)

    def read(con):
        out = {v: sorted(map(str, con.sql(f"SELECT * EXCLUDE (ingested_at) FROM {v}").fetchall()))
               for v in ("feedback_votes", "preference_votes", "feedback_joined", "preferences_joined")}
        return out, sorted(r[0] for r in con.sql("SELECT response_id FROM responses_by_id").fetchall())

    plain, all_ids = read(log.connect())
    pinned_con = log.connect()
    EventLog.pin_labelled_responses(pinned_con)
    pinned, pinned_ids = read(pinned_con)
    assert pinned == plain
    assert all_ids == [f"r{i}" for i in range(6)] and pinned_ids == ["r0", "r1", "r2", "r3", "r4"]
    assert len(plain["preference_votes"]) == 2  # one vote for the pair (the latest), one text pair


def test_layout_and_atomic_parts(tmp_path):
    ev = tmp_path / "events"
    paths = write(ev, [ThumbsEvent(response_id="r", up=True), RatingEvent(response_id="r", rating=3)])
    rel = sorted(str(p.relative_to(ev).parent) for p in paths)
    assert rel == ["kind=rating/hour=2026-03-01T10", "kind=thumbs/hour=2026-03-01T10"]
    t = pq.read_table(paths[0])
    assert t.schema.equals(SCHEMAS[t.column("kind")[0].as_py()])
    # a crashed writer's temp file is invisible to readers and removed by clean_temp
    tmp = paths[0].parent / ".part-0000000000000-dead00-000001.parquet.tmp"
    tmp.write_bytes(b"half a parquet file")
    log = EventLog(ev)
    assert log.query("SELECT count(*) AS n FROM feedback").column("n")[0].as_py() == 2
    assert tmp not in part_files(ev)
    assert clean_temp(ev) == 1 and not tmp.exists()


def test_a_failed_write_leaves_nothing_visible(tmp_path):
    ev = tmp_path / "events"
    good = Columns("thumbs")
    good.append(ThumbsEvent(response_id="r", up=True), "id-1", "t", 0, 0)
    bad = pa.table({"oops": [1]})  # cannot be cast to the rating schema
    with pytest.raises(Exception):
        PartWriter(ev).write_batch({"thumbs": good.table(T0), "rating": bad}, T0)
    assert part_files(ev) == [] and not list(ev.rglob("*.tmp"))


def test_open_connection_sees_new_files_and_newer_schemas(tmp_path):
    ev = tmp_path / "events"
    write(ev, [ThumbsEvent(response_id="r", up=True)])
    con = EventLog(ev).connect()
    assert con.sql("SELECT count(*) FROM feedback").fetchall()[0][0] == 1
    write(ev, [ThumbsEvent(response_id="r", up=False)], at=T0 + timedelta(minutes=1))
    assert con.sql("SELECT count(*) FROM feedback").fetchall()[0][0] == 2
    # a file from a future schema version with an extra optional column is read by name
    extra = Columns("thumbs")
    extra.append(ThumbsEvent(response_id="r", up=True), "id-x", "t", 0, 9)
    table = extra.table(T0).append_column("reason", pa.array(["liked it"]))
    (ev / "kind=thumbs" / "hour=2026-03-01T11").mkdir(parents=True)
    pq.write_table(table, ev / "kind=thumbs" / "hour=2026-03-01T11" / "part-9999999999999-future-000001.parquet")
    assert con.sql("SELECT count(*) FROM feedback WHERE up").fetchall()[0][0] == 2


def test_recent_event_ids_newest_first(tmp_path):
    ev = tmp_path / "events"
    a = write(ev, [ThumbsEvent(response_id="r", up=True) for _ in range(3)])
    import os
    import time

    os.utime(a[0], (time.time() - 100, time.time() - 100))
    b = write(ev, [ThumbsEvent(response_id="r", up=True) for _ in range(2)], at=T0 + timedelta(seconds=1))
    got = list(recent_event_ids(ev, limit=1))
    assert [p for p, _ in got] == b and len(got[0][1]) == 2  # stops once the limit is reached
    assert [p for p, _ in recent_event_ids(ev, limit=100, skip=set(b))] == a


def test_events_cli(tmp_path, capsys):
    from looprl.ops.cli import main

    ws = tmp_path / "ws"
    write(ws / "events", [ResponseEvent(response_id="r1", prompt="p", completion="c", model="m"),
                          ThumbsEvent(response_id="r1", up=True), ThumbsEvent(response_id="r1", up=False)])
    assert main(["--workspace", str(ws), "events", "stats", "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["total"] == 3 and st["kinds"]["thumbs"]["events"] == 2 and st["kinds"]["rating"]["events"] == 0
    assert main(["--workspace", str(ws), "events", "query", "--format", "json",
                 "select kind, count(*) as n from feedback_joined where prompt = 'p' group by kind"]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == [{"kind": "thumbs", "n": 2}]
    assert main(["--workspace", str(ws), "events", "query", "select nope from feedback"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "feedback_joined" in err
