"""DuckDB views over the Parquet event log (the read side of the storage contract).

``EventLog(events_dir).connect()`` returns a DuckDB connection (time zone UTC) with these views:

- ``responses``: one row per served answer: event_id, ts, ingested_at, user_id, response_id,
  prompt (chat messages flattened), messages (JSON or NULL), completion, model, adapter_version,
  sampling (JSON or NULL), completion_token_ids and completion_logprobs (lists, NULL unless the
  server reported the served tokens).
- ``feedback``: every feedback event (thumbs, rating, correction, preference, score): event_id, kind,
  ts, ingested_at, user_id, response_id, up, rating, corrected, chosen_response_id,
  rejected_response_id, prompt (text preferences only), chosen_text, rejected_text, name,
  value_number, value_bool, value_category (a score's name and value: one of the three is set),
  comment, metadata (JSON text; both NULL when not sent, and in parts written before they existed).
- ``feedback_joined``: ``feedback`` with the prompt/completion/adapter_version/model of the response
  it is about (NULL until that response is ingested): event_id, kind, ts, ingested_at, user_id,
  response_id, prompt, completion, adapter_version, model, up, rating, corrected, name,
  value_number, value_bool, value_category, comment, metadata, voter.
- ``preferences_joined``: pairwise preferences with texts resolved from response ids or given
  directly: event_id, ts, ingested_at, user_id, prompt, chosen, rejected, chosen_response_id,
  rejected_response_id, chosen_adapter_version, rejected_adapter_version, comment, metadata, voter. A pair that names
  both responses takes its texts from them (texts sent along are ignored: only serving writes
  answers); only a pair naming no responses uses its own prompt/chosen_text/rejected_text.
- ``feedback_votes``: the thumbs, ratings, corrections and scores of ``feedback_joined`` that count:
  one per (kind, score name, response_id, voter), the latest by ``ts`` (then ``ingested_at``,
  ``event_id``): a voter's scores of different names on one answer all count.
- ``preference_votes``: the pairs of ``preferences_joined`` that count: one per (the two response
  ids in either order, voter), the latest; a text-only pair always counts.

``voter`` is who a vote counts for: the user the answer was served to (the response's ``user_id``,
which only the serving tier writes), else the feedback's own ``user_id``, else NULL (one anonymous
voter per response). So an answer gets one vote however many user ids a sender invents for it;
the flip side: two people rating the same served answer count once.

Read votes (the canary's thumbs, the reward model's examples) from the ``*_votes`` views, and cap
each voter's share with ``cap_by_voter``.

Each event is in the log exactly once (by event_id). A response logged twice under one
response_id (a retried log call) is joined once. Kinds with no files yet are empty typed
tables, so every view works on an empty or new log. Views read ``part-*.parquet`` by glob at
query time: a connection sees files written after it was opened (for kinds that had files when
it was opened; reconnect to pick up a first file of a new kind).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Sequence, TypeVar

import duckdb
import pyarrow as pa

from looprl.storage.event_schema import KINDS, SCHEMAS, duckdb_type
from looprl.storage.parts import part_files

FEEDBACK_KINDS = ("thumbs", "rating", "correction", "preference", "score")
_FEEDBACK_COLUMNS = ("event_id", "kind", "ts", "ingested_at", "user_id", "response_id", "up", "rating", "corrected",
                     "chosen_response_id", "rejected_response_id", "prompt", "chosen_text", "rejected_text",
                     "name", "value_number", "value_bool", "value_category", "comment", "metadata")
VIEWS = ("responses", "feedback", "feedback_joined", "preferences_joined", "feedback_votes", "preference_votes")
T = TypeVar("T")
# Latest vote first: the user's own time, then arrival, then a fixed tie-break.
_LATEST = "ORDER BY ts DESC, ingested_at DESC, event_id DESC"
# Producer timestamps Python's datetime can hold. Ingest bounds ts now; a log written before it
# did may hold one past year 9999 in UTC, which stats leaves out of first/last instead of failing.
_TS_IN_RANGE = "ts BETWEEN TIMESTAMPTZ '0001-01-01 00:00:00+00' AND TIMESTAMPTZ '9999-12-31 23:59:59.999999+00'"


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

    def _kind_source(self, kind: str, con: duckdb.DuckDBPyConnection) -> str:
        schema = SCHEMAS[kind]
        if self.files(kind):
            pattern = str(self.events_dir / f"kind={kind}" / "hour=*" / "part-*.parquet")
            source = f"read_parquet({_sql_str(pattern)}, union_by_name=true, hive_partitioning=false)"
            # Explicit columns: files written by a newer schema may carry more; a column newer than
            # every file (an optional field added since) reads as NULL.
            present = {row[0] for row in con.sql(f"DESCRIBE SELECT * FROM {source}").fetchall()}
            cols = ", ".join(f.name if f.name in present else f"CAST(NULL AS {duckdb_type(f.type)}) AS {f.name}"
                             for f in schema)
            return f"SELECT {cols} FROM {source}"
        cols = ", ".join(f"CAST(NULL AS {duckdb_type(f.type)}) AS {f.name}" for f in schema)
        return f"SELECT {cols} WHERE false"

    def _view_sql(self, con: duckdb.DuckDBPyConnection) -> list[str]:
        out = [f"CREATE OR REPLACE TEMP VIEW events_{kind} AS {self._kind_source(kind, con)}" for kind in KINDS]

        def proj(kind: str) -> str:
            have = {f.name for f in SCHEMAS[kind]}
            return ", ".join(c if c in have else f"NULL AS {c}" for c in _FEEDBACK_COLUMNS)

        out.append("""
CREATE OR REPLACE TEMP VIEW responses AS
SELECT event_id, ts, ingested_at, user_id, response_id, prompt, messages, completion, model, adapter_version,
       sampling, completion_token_ids, completion_logprobs
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
       coalesce(r.prompt, f.prompt) AS prompt, CASE WHEN r.prompt IS NOT NULL THEN r.messages END AS messages,
       r.completion, r.adapter_version, r.model,
       f.up, f.rating, f.corrected, f.name, f.value_number, f.value_bool, f.value_category, f.comment, f.metadata,
       coalesce(r.user_id, f.user_id) AS voter
FROM feedback f LEFT JOIN responses_by_id r ON r.response_id = f.response_id""")
        by_ids = "p.chosen_response_id IS NOT NULL AND p.rejected_response_id IS NOT NULL"
        # The voter of a pair is the same whichever answer was chosen, so a changed mind replaces
        # the first vote: the user the lower-id answer was served to, else the other's, else the sender.
        out.append(f"""
CREATE OR REPLACE TEMP VIEW preferences_joined AS
SELECT p.event_id, p.ts, p.ingested_at, p.user_id,
       CASE WHEN {by_ids} THEN coalesce(rc.prompt, rr.prompt) ELSE p.prompt END AS prompt,
       CASE WHEN {by_ids} THEN CASE WHEN rc.prompt IS NOT NULL THEN rc.messages ELSE rr.messages END END AS messages,
       CASE WHEN {by_ids} THEN rc.completion ELSE p.chosen_text END AS chosen,
       CASE WHEN {by_ids} THEN rr.completion ELSE p.rejected_text END AS rejected,
       p.chosen_response_id, p.rejected_response_id,
       rc.adapter_version AS chosen_adapter_version, rr.adapter_version AS rejected_adapter_version,
       p.comment, p.metadata,
       coalesce(CASE WHEN p.chosen_response_id < p.rejected_response_id THEN coalesce(rc.user_id, rr.user_id)
                     ELSE coalesce(rr.user_id, rc.user_id) END, p.user_id) AS voter
FROM events_preference p
LEFT JOIN responses_by_id rc ON rc.response_id = p.chosen_response_id
LEFT JOIN responses_by_id rr ON rr.response_id = p.rejected_response_id""")
        out.append(f"""
CREATE OR REPLACE TEMP VIEW feedback_votes AS
SELECT * FROM feedback_joined WHERE kind <> 'preference'
QUALIFY row_number() OVER (PARTITION BY kind, name, response_id, voter {_LATEST}) = 1""")
        # A text-only pair names no response to vote on: partitioned by its own event id.
        out.append(f"""
CREATE OR REPLACE TEMP VIEW preference_votes AS
SELECT * FROM preferences_joined
QUALIFY row_number() OVER (
    PARTITION BY CASE WHEN chosen_response_id IS NULL OR rejected_response_id IS NULL THEN event_id END,
                 least(chosen_response_id, rejected_response_id), greatest(chosen_response_id, rejected_response_id),
                 voter
    {_LATEST}) = 1""")
        return out

    def connect(self, con: duckdb.DuckDBPyConnection | None = None) -> duckdb.DuckDBPyConnection:
        """A DuckDB connection (new, in memory, unless given) with the views of the module docstring."""
        con = con or duckdb.connect()
        con.execute("SET TimeZone='UTC'")
        for stmt in self._view_sql(con):
            con.execute(stmt)
        return con

    @staticmethod
    def pin_labelled_responses(con: duckdb.DuckDBPyConnection) -> None:
        """Make ``con``'s ``responses_by_id`` a snapshot of the responses that feedback names, read
        from the Parquet files once. The vote views and a query that joins labelled answers read
        ``responses_by_id`` several times each; over a log of many small part files, reading it once
        is the difference. Only for a connection that reads labelled answers: the others are gone
        from it, and files written afterwards are not seen."""
        con.execute("""
CREATE OR REPLACE TEMP TABLE labelled_responses AS
SELECT * FROM responses_by_id WHERE response_id IN (
    SELECT response_id FROM feedback WHERE response_id IS NOT NULL
    UNION SELECT chosen_response_id FROM events_preference WHERE chosen_response_id IS NOT NULL
    UNION SELECT rejected_response_id FROM events_preference WHERE rejected_response_id IS NOT NULL)""")
        con.execute("CREATE OR REPLACE TEMP VIEW responses_by_id AS SELECT * FROM labelled_responses")

    def query(self, sql: str, params: list[Any] | None = None) -> pa.Table:
        """Run one SQL statement over the views; returns an Arrow table."""
        con = self.connect()
        try:
            return con.sql(sql, params=params).to_arrow_table()
        finally:
            con.close()

    def orphans(self, after: datetime | None, until: datetime) -> list[dict[str, Any]]:
        """Feedback ingested in (``after``, ``until``] that names a response the log does not hold:
        every stored column of the event, plus ``missing`` (which ids, e.g. ``response_id 'r1'``)."""
        con = self.connect()
        try:
            rows: list[dict[str, Any]] = []
            for kind in FEEDBACK_KINDS:
                have = {f.name for f in SCHEMAS[kind]}
                ids = [c for c in ("response_id", "chosen_response_id", "rejected_response_id") if c in have]
                missing = "nullif(concat_ws(', ', " + ", ".join(
                    f"CASE WHEN f.{c} IS NOT NULL AND NOT EXISTS (SELECT 1 FROM events_response r "
                    f"WHERE r.response_id = f.{c}) THEN '{c}=' || f.{c} END" for c in ids) + "), '')"
                window = "f.ingested_at <= $until" + ("" if after is None else " AND f.ingested_at > $after")
                params = {"until": until} if after is None else {"until": until, "after": after}
                rows += con.sql(f"SELECT * FROM (SELECT f.*, {missing} AS missing FROM events_{kind} f WHERE {window}) "
                                "WHERE missing IS NOT NULL ORDER BY ingested_at, event_id",
                                params=params).to_arrow_table().to_pylist()
            return rows
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
                row = con.sql(f"SELECT count(*) AS n, min(ts) FILTER (WHERE {_TS_IN_RANGE}) AS first, "
                              f"max(ts) FILTER (WHERE {_TS_IN_RANGE}) AS last, "
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


def voter_cap(counts: Iterable[int], max_share: float) -> int:
    """The most votes each voter may keep so that none holds more than ``max_share`` of the votes
    kept: the largest m with m <= max_share * sum(min(c, m)). So votes count only from at least
    1/max_share voters (when max_share < 1): a lone voter keeps nothing."""
    cs = [c for c in counts if c > 0]
    if not cs:
        return 0
    if max_share >= 1:
        return max(cs)

    def fits(m: int) -> bool:  # 1e-9: 0.29 * 100 is 28.999999999999996 in floating point
        return m <= max_share * sum(min(c, m) for c in cs) + 1e-9

    # max_share * sum(min(c, m)) - m is concave in m and 0 at m = 0: the m that fit are 0..cap.
    lo, hi = 0, max(cs)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def cap_by_voter(items: Sequence[T], voter: Callable[[T], Hashable], max_share: float) -> list[T]:
    """``items`` (in priority order), each voter keeping only its first ``voter_cap`` of them."""
    m = voter_cap(Counter(voter(i) for i in items).values(), max_share)
    seen: Counter = Counter()
    out = []
    for i in items:
        k = voter(i)
        seen[k] += 1
        if seen[k] <= m:
            out.append(i)
    return out


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
