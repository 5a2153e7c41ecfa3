"""Far-future timestamps (issue 30, finding 4). ``ts: 9999-12-31T23:59:59-23:59`` is year 10000
in UTC: it was accepted and stored, and from then on `looprl events stats` and the policy prompt
pool (``traffic_prompts``, used by the trainer and the gate) raised ``OverflowError`` on every run.
Now ingest bounds ``ts`` to a window around ingest time (``ingest.ts_max_past_s`` /
``ts_max_future_s``), recency is ``ingested_at``, and a log that already holds such a row still
reads."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pytest
from fastapi.testclient import TestClient

from fixtures_kafka import ingest_config
from looprl.ingest.collector import create_app
from looprl.ingest.decode import Columns
from looprl.ingest.schema import InvalidEvent, ResponseEvent, TsWindow, encode_event, validate_event
from looprl.ops.core.config import load_config
from looprl.policy.prompts import traffic_prompts
from looprl.storage.event_schema import TS
from looprl.storage.events import EventLog
from looprl.storage.parts import PartWriter

from test_ingest_collector import RecordingProducer
from test_ingest_consumer import ingest_until_idle, produce, read_topic

FAR_FUTURE = "9999-12-31T23:59:59-23:59"  # the value of the report
THUMBS = {"kind": "thumbs", "response_id": "r1", "up": True}
WINDOW = TsWindow(max_past_s=30 * 86400, max_future_s=3600)


def iso(dt: datetime) -> str:
    return dt.isoformat()


def test_ts_beyond_utc_range_is_refused_even_without_a_window():
    for ts in (FAR_FUTURE, "0001-01-01T00:00:00+23:59"):  # year 10000 / year 0 in UTC
        with pytest.raises(InvalidEvent) as err:
            validate_event({**THUMBS, "ts": ts})
        assert err.value.reason == "ts_out_of_range" and ts in err.value.detail


def test_ts_window_around_ingest_time():
    now = datetime.now(timezone.utc)
    for ok in (now, now + timedelta(minutes=50), now - timedelta(days=29), (now - timedelta(hours=1)).replace(tzinfo=None)):
        validate_event({**THUMBS, "ts": iso(ok)}, ts_window=WINDOW)
    for bad, limit in ((now + timedelta(hours=2), "ingest.ts_max_future_s"), (now - timedelta(days=40), "ingest.ts_max_past_s"),
                       (datetime(9999, 12, 31, tzinfo=timezone.utc), "ingest.ts_max_future_s")):
        with pytest.raises(InvalidEvent) as err:
            validate_event({**THUMBS, "ts": iso(bad)}, ts_window=WINDOW)
        assert err.value.reason == "ts_out_of_range" and limit in err.value.detail


def test_the_consumer_dead_letters_out_of_window_ts_and_stores_the_rest(tmp_path, kafka_bootstrap, kafka_topics):
    cfg = ingest_config(tmp_path, kafka_bootstrap, kafka_topics)
    now = datetime.now(timezone.utc)
    good = [ResponseEvent(response_id=f"r{i}", prompt=f"prompt {i}", completion="c", model="m") for i in range(3)]
    bad_ts = [FAR_FUTURE, iso(now + timedelta(hours=2)), iso(now - timedelta(days=40)), "0001-01-01T00:00:00+23:59"]
    bad = [json.dumps({"kind": "response", "response_id": f"x{i}", "prompt": "forged", "completion": "c", "model": "m",
                       "ts": ts}).encode() for i, ts in enumerate(bad_ts)]
    produce(kafka_bootstrap, cfg.kafka.topic_responses,
            [encode_event(good[0]), *bad[:2], encode_event(good[1]), *bad[2:], encode_event(good[2])])

    _ic, totals = ingest_until_idle(cfg, kafka_bootstrap)
    assert (totals.stored, totals.dead) == (3, 4)
    dlq = read_topic(kafka_bootstrap, cfg.kafka.topic_dlq, 4)
    assert sorted(m.value() for m in dlq) == sorted(bad)
    assert {dict(m.headers())["looprl-reason"] for m in dlq} == {b"ts_out_of_range"}
    st = EventLog(cfg.events_dir).stats()
    assert st.kinds["response"].events == 3 and st.kinds["response"].last_ts <= datetime.now(timezone.utc)
    prompts, watermark = traffic_prompts(cfg, 10)
    assert sorted(p.key() for p in prompts) == ["prompt 0", "prompt 1", "prompt 2"] and watermark


def test_a_log_already_holding_a_year_10000_ts_still_reads(tmp_path):
    """Written before ingest bounded ts: stats leaves it out of first/last, the prompt pool orders by
    ingested_at; neither overflows."""
    cfg = load_config(environ={}, workspace=tmp_path / "ws")
    writer = PartWriter(cfg.events_dir)
    t0 = datetime(2026, 3, 1, tzinfo=timezone.utc)
    for i, prompt in enumerate(["poisoned prompt", "later prompt"]):
        c = Columns("response")
        c.append(ResponseEvent(response_id=f"r{i}", prompt=prompt, completion="c", model="m", ts=t0), f"e{i}",
                 "looprl.responses", 0, i)
        table = c.table(t0 + timedelta(minutes=i))
        if i == 0:  # 10000-01-01T23:58:59Z, as pyarrow stored the reported value
            us = (int(datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc).timestamp()) + 23 * 3600 + 59 * 60) * 10**6
            table = table.set_column(table.schema.get_field_index("ts"), "ts", pa.array([us], type=TS))
        writer.write_batch({"response": table}, t0 + timedelta(minutes=i))

    st = EventLog(cfg.events_dir).stats()
    assert st.kinds["response"].events == 2
    assert st.kinds["response"].first_ts == st.kinds["response"].last_ts == t0
    assert json.dumps(st.as_dict())
    prompts, watermark = traffic_prompts(cfg, 10)
    assert [p.key() for p in prompts] == ["later prompt", "poisoned prompt"]
    assert watermark["responses_max_ingested_at"].startswith("2026-03-01 00:01:00")


def test_the_collector_refuses_out_of_window_ts(tmp_path):
    cfg = load_config(environ={}, workspace=tmp_path / "ws", ingest={"ts_max_future_s": 60})
    rec = RecordingProducer()
    c = TestClient(create_app(cfg, rec))
    soon = iso(datetime.now(timezone.utc) + timedelta(minutes=5))
    r = c.post("/v1/feedback", json=[THUMBS, {**THUMBS, "ts": soon}, {**THUMBS, "ts": FAR_FUTURE}])
    assert r.status_code == 400
    assert [(e["index"], e["reason"]) for e in r.json()["errors"]] == [(1, "ts_out_of_range"), (2, "ts_out_of_range")]
    assert "ingest.ts_max_future_s=60" in r.json()["errors"][0]["detail"]
    assert rec.sent == []
    assert c.post("/v1/feedback", json=THUMBS).status_code == 202
