"""Training examples for the reward model, read from the event log's DuckDB views.

Views used (built by ``looprl.storage.events.EventLog.connect()``):

- ``feedback_joined``: thumbs, ratings and corrections with the prompt and completion of the
  response they are about;
- ``preferences_joined``: pairwise preferences with the chosen/rejected texts resolved.

Every event becomes one ``Example``:

- thumbs      -> pointwise, label 1.0 (up) or 0.0 (down);
- rating 1..5 -> pointwise, label (rating - 1) / 4;
- correction  -> pair: the corrected text is preferred over the served completion;
- preference  -> pair: chosen over rejected.

Feedback whose response has not been ingested yet (prompt/completion still NULL) is skipped, not
consumed: it becomes trainable once the response arrives. A fixed fraction of events, chosen by a
hash of the event id, is held out for the publish decision and is never trained on.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Iterable, Literal

import pyarrow as pa

from looprl.storage.events import EventLog

Kind = Literal["thumbs", "rating", "correction", "preference"]
POINT_KINDS = ("thumbs", "rating")
PAIR_KINDS = ("correction", "preference")

# Both views projected to one schema; rows with unresolved texts are filtered out.
_EXAMPLES_SQL = """
SELECT CAST(event_id AS VARCHAR) AS event_id, CAST(kind AS VARCHAR) AS kind, ingested_at,
       prompt, completion AS text_a, CAST(NULL AS VARCHAR) AS text_b,
       CASE WHEN kind = 'thumbs' THEN (CASE WHEN up THEN 1.0 ELSE 0.0 END)
            ELSE (CAST(rating AS DOUBLE) - 1.0) / 4.0 END AS label
FROM feedback_joined
WHERE kind IN ('thumbs', 'rating') AND prompt IS NOT NULL AND completion IS NOT NULL
  AND ((kind = 'thumbs' AND up IS NOT NULL) OR (kind = 'rating' AND rating IS NOT NULL))
UNION ALL
SELECT CAST(event_id AS VARCHAR), 'correction', ingested_at, prompt, corrected, completion, CAST(NULL AS DOUBLE)
FROM feedback_joined
WHERE kind = 'correction' AND prompt IS NOT NULL AND completion IS NOT NULL AND corrected IS NOT NULL
UNION ALL
SELECT CAST(event_id AS VARCHAR), 'preference', ingested_at, prompt, chosen, rejected, CAST(NULL AS DOUBLE)
FROM preferences_joined
WHERE prompt IS NOT NULL AND chosen IS NOT NULL AND rejected IS NOT NULL
"""


@dataclass(frozen=True)
class Example:
    """One feedback event as a training example: a pair (``chosen`` over ``rejected``) or a point
    (``completion`` with ``label`` in [0, 1])."""

    event_id: str
    kind: Kind
    prompt: str
    ingested_at: datetime | None
    chosen: str | None = None
    rejected: str | None = None
    completion: str | None = None
    label: float | None = None

    @property
    def is_pair(self) -> bool:
        return self.kind in PAIR_KINDS


def is_holdout(event_id: str, fraction: float) -> bool:
    """Deterministic held-out assignment by event id (the same in every process and restart)."""
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.sha256(("holdout:" + str(event_id)).encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def _rows_to_examples(table: pa.Table) -> list[Example]:
    out, seen = [], set()
    for r in table.to_pylist():
        eid = r["event_id"]
        if eid in seen:  # the log is exactly-once, but never train one event twice in a slice
            continue
        seen.add(eid)
        kind = r["kind"]
        if kind in PAIR_KINDS:
            if r["text_a"] == r["text_b"]:
                continue  # a "correction" identical to the answer carries no preference
            out.append(Example(eid, kind, r["prompt"], r["ingested_at"], chosen=r["text_a"], rejected=r["text_b"]))
        else:
            label = float(r["label"])
            if not 0.0 <= label <= 1.0:
                continue  # out-of-range rating: the schema forbids it; never let it poison training
            out.append(Example(eid, kind, r["prompt"], r["ingested_at"], completion=r["text_a"], label=label))
    return out


class FeedbackSource:
    """Queries over a DuckDB connection holding the ``feedback_joined`` and ``preferences_joined``
    views. ``trained`` is the set of event ids already consumed (trained or held out)."""

    def __init__(self, con):
        self.con = con

    def _with_ids(self, ids: Iterable[str]) -> None:
        ids = sorted(set(ids))
        self.con.register("looprl_reward_consumed", pa.table({"event_id": pa.array(ids, pa.string())}))

    def new_examples(self, consumed: set[str], limit: int | None = None) -> list[Example]:
        """Resolved events not consumed yet, oldest ingested first (ties by event id)."""
        self._with_ids(consumed)
        sql = (f"SELECT * FROM ({_EXAMPLES_SQL}) e WHERE e.event_id NOT IN "
               "(SELECT event_id FROM looprl_reward_consumed) ORDER BY ingested_at, event_id")
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return _rows_to_examples(self.con.sql(sql).to_arrow_table())

    def count_new(self, consumed: set[str]) -> int:
        self._with_ids(consumed)
        # Arrow, not execute().fetchone(): DuckDB keeps a half-read result open on the connection
        # and later queries on it block behind it.
        t = self.con.sql(f"SELECT count(DISTINCT e.event_id) AS n FROM ({_EXAMPLES_SQL}) e WHERE e.event_id "
                         "NOT IN (SELECT event_id FROM looprl_reward_consumed)").to_arrow_table()
        return int(t.column("n")[0].as_py())

    def examples_by_id(self, ids: Iterable[str]) -> list[Example]:
        """Examples for the given event ids (replay, held-out evaluation)."""
        self.con.register("looprl_reward_wanted", pa.table({"event_id": pa.array(sorted(set(ids)), pa.string())}))
        sql = (f"SELECT * FROM ({_EXAMPLES_SQL}) e WHERE e.event_id IN "
               "(SELECT event_id FROM looprl_reward_wanted) ORDER BY ingested_at, event_id")
        return _rows_to_examples(self.con.sql(sql).to_arrow_table())


def connect_event_log(events_dir):
    """A DuckDB connection to the event log (``looprl.storage.events``)."""
    return EventLog(events_dir).connect()
