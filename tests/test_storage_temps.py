"""Temp files of the event log are removed only once their writer is gone: a consumer starting
(``clean_temp``) never deletes the part file another live consumer is writing."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from datetime import datetime, timezone

import pyarrow.parquet as pq

from looprl.ingest.decode import Columns
from looprl.ingest.schema import ThumbsEvent
from looprl.storage.parts import PartWriter, clean_temp, part_files
from looprl.storage.temps import claim, owner_lock, release, remove_abandoned

T0 = datetime(2026, 3, 1, 10, 0, tzinfo=timezone.utc)


def thumbs_table():
    cols = Columns("thumbs")
    cols.append(ThumbsEvent(response_id="r", up=True), "id-1", "t", 0, 0)
    return cols.table(T0)


def test_clean_temp_spares_a_live_writers_temp_file(tmp_path, monkeypatch):
    ev = tmp_path / "events"
    writing, go_on = threading.Event(), threading.Event()
    real_write = pq.write_table

    def slow_write(*a, **k):
        writing.set()
        assert go_on.wait(30)
        return real_write(*a, **k)

    monkeypatch.setattr(pq, "write_table", slow_write)
    paths: list = []
    writer = threading.Thread(target=lambda: paths.extend(PartWriter(ev).write_batch({"thumbs": thumbs_table()}, T0)))
    writer.start()
    assert writing.wait(30)
    (tmp,) = list(ev.glob("kind=*/hour=*/.part-*.tmp"))
    assert clean_temp(ev) == 0 and tmp.exists()  # another consumer starting: the live temp stays
    go_on.set()
    writer.join(30)
    assert part_files(ev) == paths and len(paths) == 1
    assert [p.name for p in paths[0].parent.iterdir()] == [paths[0].name]  # no temp, no lock file left


def test_clean_temp_removes_a_dead_writers_temp_file(tmp_path):
    ev = tmp_path / "events"
    hour = ev / "kind=thumbs" / "hour=2026-03-01T10"
    hour.mkdir(parents=True)
    code = textwrap.dedent(f"""
        import os, signal, pathlib
        from looprl.storage.temps import claim
        tmp = pathlib.Path({str(hour / ".part-0000000000000-abc123-000001.parquet.tmp")!r})
        claim(tmp)
        tmp.write_bytes(b"half a parquet file")
        os.kill(os.getpid(), signal.SIGKILL)  # dies mid-batch, holding its temp's lock
    """)
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == -9
    assert len(list(hour.iterdir())) == 2  # the temp and its lock file
    assert clean_temp(ev) == 1 and list(hour.iterdir()) == []


def test_remove_abandoned_clears_lock_files_without_a_temp(tmp_path):
    held, orphan = tmp_path / ".tmp-held", tmp_path / ".tmp-orphan"
    lock = claim(held)  # a writer between taking its lock and creating its temp
    owner_lock(orphan).touch()  # a writer that died there
    try:
        assert remove_abandoned(tmp_path, ".tmp-*") == 0
        assert owner_lock(held).exists() and not owner_lock(orphan).exists()
    finally:
        release(held, lock)
    assert list(tmp_path.iterdir()) == []
