"""Durable, atomic part files of the Parquet event log.

A batch is written as one file per kind: into a hidden temp file in the target directory, fsynced,
renamed to ``part-*.parquet`` (atomic on POSIX), then the directory is fsynced. Readers glob
``part-*.parquet`` only, so they never see a half-written file; a crash leaves at most hidden
``.part-*.tmp`` files, removed by ``clean_temp``. A writer holds a lock on each of its temp files
while it exists (``looprl.storage.temps``), so ``clean_temp`` at one consumer's start never
deletes the temp file of another consumer writing into the same log.

The files of one batch are renamed one after the other, so a crash can leave a batch partly
visible. Exactly-once therefore comes from the consumer's event-id dedupe (``recent_event_ids``
reloads it from the newest files after a restart), not from the renames alone.
"""

from __future__ import annotations

import os
import secrets
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from looprl.storage.event_schema import SCHEMAS
from looprl.storage.registry import fsync_dir
from looprl.storage.temps import claim, release, remove_abandoned

PART_GLOB = "kind=*/hour=*/part-*.parquet"
TEMP_GLOB = "kind=*/hour=*/.part-*.tmp"


def hour_dir(events_dir: Path, kind: str, at: datetime) -> Path:
    return events_dir / f"kind={kind}" / f"hour={at.astimezone(timezone.utc):%Y-%m-%dT%H}"


class PartWriter:
    """Writes batches of per-kind Arrow tables as atomic, fsynced part files."""

    def __init__(self, events_dir: str | Path, compression: str = "zstd"):
        self.events_dir = Path(events_dir)
        self.compression = compression
        # Part names sort by time; the writer id keeps concurrent writers (scaled-out ingest) apart.
        self.writer_id = secrets.token_hex(3)
        self._seq = 0

    def write_batch(self, tables: dict[str, pa.Table], ingested_at: datetime) -> list[Path]:
        """Write each non-empty table as one part file; returns the final paths once all are durable."""
        self._seq += 1
        stamp = int(ingested_at.timestamp() * 1000)
        staged: list[tuple[Path, Path]] = []
        dirs: set[Path] = set()
        with ExitStack() as owners:  # each temp's owner lock, let go of once the temp is renamed or removed
            try:
                for kind, table in tables.items():
                    if table.num_rows == 0:
                        continue
                    if table.schema != SCHEMAS[kind]:
                        table = table.cast(SCHEMAS[kind])
                    d = hour_dir(self.events_dir, kind, ingested_at)
                    new_dir = not d.exists()
                    d.mkdir(parents=True, exist_ok=True)
                    if new_dir:
                        dirs.update({d.parent, d.parent.parent})
                    name = f"part-{stamp:013d}-{self.writer_id}-{self._seq:06d}.parquet"
                    tmp = d / f".{name}.tmp"
                    owners.callback(release, tmp, claim(tmp))
                    staged.append((tmp, d / name))
                    with open(tmp, "wb") as f:
                        pq.write_table(table, f, compression=self.compression)
                        f.flush()
                        os.fsync(f.fileno())
                    dirs.add(d)
                for tmp, final in staged:
                    os.replace(tmp, final)
                for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
                    fsync_dir(d)
            except BaseException:
                for tmp, _final in staged:
                    tmp.unlink(missing_ok=True)
                raise
        return [final for _tmp, final in staged]


def part_files(events_dir: str | Path, kind: str | None = None) -> list[Path]:
    root = Path(events_dir)
    pattern = f"kind={kind}/hour=*/part-*.parquet" if kind else PART_GLOB
    return sorted(root.glob(pattern))


def clean_temp(events_dir: str | Path) -> int:
    """Remove temp files whose writer is gone (crashed); a live writer's are left alone, however
    old. Returns how many were removed."""
    return remove_abandoned(Path(events_dir), TEMP_GLOB)


def recent_event_ids(events_dir: str | Path, limit: int, skip: set[Path] | None = None
                     ) -> Iterator[tuple[Path, list[str]]]:
    """(file, event ids) of the newest part files (by modification time), newest first, until
    about ``limit`` ids were yielded. Files in ``skip`` are not read (already known)."""
    files = []
    for p in Path(events_dir).glob(PART_GLOB):
        try:
            files.append((p.stat().st_mtime, p))
        except FileNotFoundError:
            continue
    files.sort(reverse=True)
    total = 0
    for _mtime, p in files:
        if total >= limit:
            return
        if skip is not None and p in skip:
            continue
        try:
            ids = pq.read_table(p, columns=["event_id"]).column("event_id").to_pylist()
        except (OSError, pa.ArrowInvalid):
            continue  # removed or unreadable: nothing to dedupe against
        total += len(ids)
        yield p, ids
