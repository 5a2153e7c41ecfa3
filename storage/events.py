"""DuckDB views over the Parquet event log (the read side of the storage contract).

``EventLog(events_dir).connect()`` returns a DuckDB connection (time zone UTC) with these views:

- ``responses``: one row per served answer: event_id, ts, ingested_at, user_id, response_id,
  prompt (chat messages flattened), messages (JSON or NULL), completion, model, adapter_version.
- ``feedback``: every feedback event (thumbs, rating, correction, preference): event_id, kind, ts,
  ingested_at, user_id, response_id, up, rating, corrected, chosen_response_id,
  rejected_response_id, prompt (text preferences only), chosen_text, rejected_text.
- ``feedback_joined``: ``feedback`` with the prompt/completion/adapter_version/model of the response
  it is about (NULL until that response is ingested): event_id, kind, ts, ingested_at, user_id,
  response_id, prompt, completion, adapter_version, model, up, rating, corrected.
- ``preferences_joined``: pairwise preferences with texts resolved from response ids or given
  directly: event_id, ts, ingested_at, user_id, prompt, chosen, rejected, chosen_response_id,
  rejected_response_id, chosen_adapter_version, rejected_adapter_version.

Each event is in the log exactly once (by event_id). A response logged twice under one
response_id (a retried log call) is joined once. Kinds with no files yet are empty typed
tables, so every view works on an empty or new log. Views read ``part-*.parquet`` by glob at
query time: a connection sees files written after it was opened (for kinds that had files when
it was opened; reconnect to pick up a first file of a new kind).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from looprl.storage.event_schema import KINDS, SCHEMAS, duckdb_type
from looprl.storage.parts import part_files

FEEDBACK_KINDS = ("thumbs", "rating", "correction", "preference")
_FEEDBACK_COLUMNS = ("event_id", "kind", "ts", "ingested_at", "user_id", "response_id", "up", "rating", "corrected",
                     "chosen_response_id", "rejected_response_id", "prompt", "chosen_text", "rejected_text")
VIEWS = ("responses", "feedback", "feedback_joined", "preferences_joined")


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


class EventLog:
    """Read access to the Parquet event log in ``events_dir`` (which may not exist yet)."""

    def __init__(self, events_dir: str | Path):
        self.events_dir = Path(events_dir)

    # ------------------------------------------------------------------ raw tables
    def files(self, kind: str | None = None) -> list[Path]:
        if kind is not None and kind not in SCHEMAS:
            raise ValueError(f"unknown event kind {kind!r}; expected one of {', '.join(KINDS)}")
        return part_files(self.events_dir, kind)

    def _kind_source(self, kind: str) -> str:
        schema = SCHEMAS[kind]
        if self.files(kind):
            pattern = str(self.events_dir / f"kind={kind}" / "hour=*" / "part-*.parquet")
            cols = ", ".join(f.name for f in schema)
            # Explicit columns: files written by a newer schema may carry more.
            return (f"SELECT {cols} FROM read_parquet({_sql_str(pattern)}, union_by_name=true, "
                    f"hive_partitioning=false)")
        cols = ", ".join(f"CAST(NULL AS {duckdb_type(f.type)}) AS {f.name}" for f in schema)
        return f"SELECT {cols} WHERE false"

    def _view_sql(self) -> list[str]:
        out = [f"CREATE OR REPLACE TEMP VIEW events_{kind} AS {self._kind_source(kind)}" for kind in KINDS]

        def proj(kind: str) -> str:
            have = {f.name for f in SCHEMAS[kind]}
            return ", ".join(c if c in have else f"NULL AS {c}" for c in _FEEDBACK_COLUMNS)

        out.append("""
CREATE OR REPLACE TEMP VIEW responses AS
SELECT event_id, ts, ingested_at, user_id, response_id, prompt, messages, completion, model, adapter_version
FROM events_response""")
        union = "\nUNION ALL BY NAME\n".join(f"SELECT {proj(k)} FROM events_{k}" for k in FEEDBACK_KINDS)
        out.append(f"CREATE OR REPLACE TEMP VIEW feedback AS\n{union}")
        out.append("""
CREATE OR REPLACE TEMP VIEW responses_by_id AS
SELECT * FROM events_response
QUALIFY row_number() OVER (PARTITION BY response_id ORDER BY ingested_at, event_id) = 1""")
        out.append("""
CREATE OR REPLACE TEMP VIEW feedback_joined AS
SELECT f.event_id, f.kind, f.ts, f.ingested_at, f.user_id, f.response_id,
       coalesce(r.prompt, f.prompt) AS prompt, r.completion, r.adapter_version, r.model,
       f.up, f.rating, f.corrected
FROM feedback f LEFT JOIN responses_by_id r ON r.response_id = f.response_id""")
        out.append("""
CREATE OR REPLACE TEMP VIEW preferences_joined AS
SELECT p.event_id, p.ts, p.ingested_at, p.user_id,
       coalesce(p.prompt, rc.prompt, rr.prompt) AS prompt,
       coalesce(p.chosen_text, rc.completion) AS chosen,
       coalesce(p.rejected_text, rr.completion) AS rejected,
       p.chosen_response_id, p.rejected_response_id,
       rc.adapter_version AS chosen_adapter_version, rr.adapter_version AS rejected_adapter_version
FROM events_preference p
LEFT JOIN responses_by_id rc ON rc.response_id = p.chosen_response_id
LEFT JOIN responses_by_id rr ON rr.response_id = p.rejected_response_id""")
        return out

    def connect(self, con: duckdb.DuckDBPyConnection | None = None) -> duckdb.DuckDBPyConnection:
        """A DuckDB connection (new, in memory, unless given) with the views of the module docstring."""
        con = con or duckdb.connect()
        con.execute("SET TimeZone='UTC'")
        for stmt in self._view_sql():
            con.execute(stmt)
        return con

    def query(self, sql: str, params: list[Any] | None = None) -> pa.Table:
        """Run one SQL statement over the views; returns an Arrow table."""
        con = self.connect()
        try:
            return con.sql(sql, params=params).to_arrow_table()
        finally:
            con.close()

    # ------------------------------------------------------------------ summary
    def stats(self) -> "LogStats":
        con = self.connect()
        try:
            kinds: dict[str, KindStats] = {}
            for kind in KINDS:
                files = self.files(kind)
                # Arrow, not fetchone(): DuckDB's own TIMESTAMPTZ -> Python conversion needs pytz.
                row = con.sql(f"SELECT count(*) AS n, min(ts) AS first, max(ts) AS last, "
                              f"max(ingested_at) AS last_ing FROM events_{kind}").to_arrow_table().to_pylist()[0]
                n, first, last, last_ing = row["n"], row["first"], row["last"], row["last_ing"]
                kinds[kind] = KindStats(kind=kind, events=int(n), files=len(files),
                                        bytes=sum(_size(p) for p in files), first_ts=first, last_ts=last,
                                        last_ingested_at=last_ing)
            joined = con.sql(
                "SELECT count(*) FILTER (WHERE completion IS NULL AND kind <> 'preference'), count(*) "
                "FROM feedback_joined").fetchall()[0]
            return LogStats(events_dir=str(self.events_dir), kinds=kinds, feedback_unresolved=int(joined[0]))
        finally:
            con.close()


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except FileNotFoundError:
        return 0


@dataclass
class KindStats:
    kind: str
    events: int
    files: int
    bytes: int
    first_ts: datetime | None
    last_ts: datetime | None
    last_ingested_at: datetime | None


@dataclass
class LogStats:
    events_dir: str
    kinds: dict[str, KindStats]
    # Feedback about a response not (yet) in the log: its prompt/completion are NULL in feedback_joined.
    feedback_unresolved: int

    @property
    def total(self) -> int:
        return sum(k.events for k in self.kinds.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "events_dir": self.events_dir, "total": self.total, "feedback_unresolved": self.feedback_unresolved,
            "kinds": {k: {"events": s.events, "files": s.files, "bytes": s.bytes,
                          "first_ts": s.first_ts.isoformat() if s.first_ts else None,
                          "last_ts": s.last_ts.isoformat() if s.last_ts else None,
                          "last_ingested_at": s.last_ingested_at.isoformat() if s.last_ingested_at else None}
                      for k, s in self.kinds.items()},
        }
