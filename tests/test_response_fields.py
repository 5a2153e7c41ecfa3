"""The optional fields a served answer's log carries since the gateway (sampling parameters, the
served token ids and their log-probs): validated, stored, read back, and NULL in parts written
before them (backward compatible: same schema_version)."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pyarrow.parquet as pq
import pytest

from looprl.ingest.decode import Columns, decode
from looprl.ingest.schema import InvalidEvent, ResponseEvent, Sampling, encode_event, parse_event
from looprl.serving.attribution import response_event, sampling_of
from looprl.storage.events import EventLog
from looprl.storage.parts import PartWriter

T0 = datetime(2026, 3, 1, 10, 30, tzinfo=timezone.utc)
NEW_COLUMNS = ("sampling", "completion_token_ids", "completion_logprobs")


def _write(events_dir, events, old_schema=False):
    """Parts as ingest writes them; ``old_schema``: as it wrote them before the new columns."""
    cols = Columns("response")
    for i, e in enumerate(events):
        cols.append(e, str(e.event_id), "topic", 0, i)
    table = cols.table(T0)
    if not old_schema:
        return PartWriter(events_dir).write_batch({"response": table}, T0)
    d = events_dir / "kind=response" / "hour=2026-03-01T10"
    d.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.drop_columns(list(NEW_COLUMNS)), d / "part-0-old-0.parquet")


def test_new_fields_round_trip_and_old_parts_read_as_null(tmp_path):
    full = response_event(response_id="r-new", model="policy", completion="a b", version="v2", prompt="p",
                          sampling=sampling_of({"temperature": 0.7, "max_completion_tokens": 8, "stop": "\n"}),
                          token_ids=[5, 9], logprobs=[-0.25, float("-inf")])
    assert full.completion_logprobs == [-0.25, -1e4]  # -inf is not JSON: clamped to a floor
    assert decode(encode_event(full), 1 << 20) == full == parse_event(encode_event(full))
    old = ResponseEvent(response_id="r-old", prompt="p", completion="c", model="policy", adapter_version="v1")
    _write(tmp_path / "events", [old], old_schema=True)
    rows = EventLog(tmp_path / "events").query("SELECT * FROM responses").to_pylist()
    assert [(r["response_id"], r["sampling"], r["completion_token_ids"]) for r in rows] == [("r-old", None, None)]

    _write(tmp_path / "events", [full])
    schemas = [set(pq.read_schema(f).names) for f in (tmp_path / "events").rglob("part-*.parquet")]
    assert sorted(set(NEW_COLUMNS) <= s for s in schemas) == [False, True]  # one old part, one new
    rows = {r["response_id"]: r for r in EventLog(tmp_path / "events").query("SELECT * FROM responses").to_pylist()}
    new = rows["r-new"]
    assert json.loads(new["sampling"]) == {"temperature": 0.7, "max_tokens": 8, "stop": ["\n"]}
    assert new["completion_token_ids"] == [5, 9] and new["completion_logprobs"] == pytest.approx([-0.25, -1e4])
    assert rows["r-old"]["completion_token_ids"] is None


def test_bad_optional_fields_are_refused_by_name():
    base = {"kind": "response", "response_id": "r", "prompt": "p", "completion": "c", "model": "m"}
    for extra, field in (({"completion_token_ids": [1, 2], "completion_logprobs": [-1.0]}, "completion_logprobs"),
                         ({"completion_token_ids": [-3]}, "completion_token_ids"),
                         ({"completion_logprobs": [0.5]}, "completion_logprobs"),
                         ({"sampling": {"temperature": -1}}, "sampling.temperature"),
                         ({"sampling": {"bogus": 1}}, "sampling.bogus")):
        with pytest.raises(InvalidEvent, match=field.replace(".", r"\.")):
            parse_event(json.dumps({**base, **extra}).encode())


def test_partial_token_information_is_left_out_rather_than_misaligned():
    ev = response_event(response_id="r", model="m", completion="c", version="v1", prompt="p",
                        token_ids=[1, 2, 3], logprobs=[-0.1, -0.2])
    assert ev.completion_token_ids == [1, 2, 3] and ev.completion_logprobs is None
    assert response_event(response_id="r", model="m", completion="", version="v1", prompt="p",
                          token_ids=[]).completion_token_ids is None
    assert sampling_of({"temperature": "hot"}) is None and sampling_of({"user": "u"}) is None
    assert sampling_of({"temperature": 0, "seed": 3}) == Sampling(temperature=0.0, seed=3)
