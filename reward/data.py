"""Training examples for the reward model, read from the event log's DuckDB views.

Views used (built by ``looprl.storage.events.EventLog.connect()``):

- ``feedback_votes``: thumbs, ratings and corrections with the prompt and completion of the
  response they are about, one per (kind, response, voter): a user's latest vote replaces the
  earlier ones;
- ``preference_votes``: pairwise preferences with the chosen/rejected texts resolved, one per
  (pair of responses, voter).

Every event becomes one ``Example``:

- thumbs      -> pointwise, label 1.0 (up) or 0.0 (down);
- rating 1..5 -> pointwise, label (rating - 1) / 4;
- correction  -> pair: the corrected text is preferred over the served completion;
- preference  -> pair: chosen over rejected;
- score       -> pointwise, only for a name listed in ``reward.score_names`` (a ``ScoreSpec``):
  a boolean is thumbs-like (true -> 1.0, false -> 0.0); a number in [min, max] maps linearly onto
  [0, 1] (outside it: not trained); a category takes the label its spec gives it (unlisted
  categories: not trained); ``higher_is_better = false`` flips numbers and booleans (1 - label),
  never categories, whose labels are given as they are meant. Scores of other names are stored
  (the ``feedback`` views show them) but never trained on, and never counted as new events.

Feedback whose response has not been ingested yet (prompt/completion still NULL) is skipped, not
consumed: it becomes trainable once the response arrives. A fixed fraction of events, chosen by a
hash of the event id, is held out for the publish decision and is never trained on.

One user's influence is capped: at most ``max_user_share`` of a new slice's examples come from
one voter (``looprl.storage.events.cap_by_voter``); a voter's newest examples beyond the cap stay
unconsumed and fill later slices when other users' feedback makes room for them (within
``reward.consumed_window_seconds``; then the updater's consumed floor passes them). Feedback
whose voter is unknown (no user_id on it or on its response) counts as one anonymous voter; a
text-only pair, which names no served response and only trusted Kafka producers may send (the
HTTP collector refuses it), counts as its own voter.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime
from typing import Iterable, Literal, Mapping

import pyarrow as pa

from looprl.ops.core.chat import Chat, ChatError
from looprl.ops.core.config import ScoreSpec
from looprl.ops.core.log import get_logger
from looprl.storage.events import EventLog, cap_by_voter

log = get_logger(__name__)

Kind = Literal["thumbs", "rating", "correction", "preference", "score"]
POINT_KINDS = ("thumbs", "rating", "score")
PAIR_KINDS = ("correction", "preference")

# Both views projected to one schema; rows with unresolved texts are filtered out. ``voter_key``
# is whose share an example counts towards (see the module docstring).
_EXAMPLES_SQL = """
SELECT CAST(event_id AS VARCHAR) AS event_id, CAST(kind AS VARCHAR) AS kind, ingested_at,
       prompt, messages, completion AS text_a, CAST(NULL AS VARCHAR) AS text_b,
       CASE WHEN kind = 'thumbs' THEN (CASE WHEN up THEN 1.0 ELSE 0.0 END)
            ELSE (CAST(rating AS DOUBLE) - 1.0) / 4.0 END AS label,
       coalesce('user:' || voter, 'anonymous') AS voter_key
FROM feedback_votes
WHERE kind IN ('thumbs', 'rating') AND prompt IS NOT NULL AND completion IS NOT NULL
  AND ((kind = 'thumbs' AND up IS NOT NULL) OR (kind = 'rating' AND rating IS NOT NULL))
UNION ALL
SELECT CAST(event_id AS VARCHAR), 'correction', ingested_at, prompt, messages, corrected, completion, CAST(NULL AS DOUBLE),
       coalesce('user:' || voter, 'anonymous')
FROM feedback_votes
WHERE kind = 'correction' AND prompt IS NOT NULL AND completion IS NOT NULL AND corrected IS NOT NULL
UNION ALL
SELECT CAST(event_id AS VARCHAR), 'preference', ingested_at, prompt, messages, chosen, rejected, CAST(NULL AS DOUBLE),
       coalesce('user:' || voter, CASE WHEN chosen_response_id IS NULL OR rejected_response_id IS NULL
                                       THEN 'event:' || CAST(event_id AS VARCHAR) ELSE 'anonymous' END)
FROM preference_votes
WHERE prompt IS NOT NULL AND chosen IS NOT NULL AND rejected IS NOT NULL
UNION ALL
SELECT CAST(f.event_id AS VARCHAR), 'score', f.ingested_at, f.prompt, f.messages, f.completion, CAST(NULL AS VARCHAR),
       CASE WHEN f.value_bool IS NOT NULL THEN (CASE WHEN f.value_bool = s.higher_is_better THEN 1.0 ELSE 0.0 END)
            WHEN f.value_number BETWEEN s.lo AND s.hi
                 THEN (CASE WHEN s.higher_is_better THEN f.value_number - s.lo ELSE s.hi - f.value_number END)
                      / (s.hi - s.lo)
            ELSE c.label END,
       coalesce('user:' || f.voter, 'anonymous')
FROM feedback_votes f
JOIN looprl_reward_score_specs s ON s.name = f.name
LEFT JOIN looprl_reward_score_categories c ON c.name = f.name AND c.category = f.value_category
WHERE f.kind = 'score' AND f.prompt IS NOT NULL AND f.completion IS NOT NULL
  AND (f.value_bool IS NOT NULL OR f.value_number BETWEEN s.lo AND s.hi OR c.label IS NOT NULL)
"""


@dataclass(frozen=True)
class Example:
    """One feedback event as a training example: a pair (``chosen`` over ``rejected``) or a point
    (``completion`` with ``label`` in [0, 1])."""

    event_id: str
    kind: Kind
    prompt: Chat  # the conversation the answer(s) were given to
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


def _rows_to_examples(table: pa.Table) -> list[tuple[Example, str]]:
    """(example, voter key) of each usable row."""
    out, seen = [], set()
    for r in table.to_pylist():
        eid = r["event_id"]
        if eid in seen:  # the log is exactly-once, but never train one event twice in a slice
            continue
        seen.add(eid)
        kind = r["kind"]
        try:
            prompt = Chat.parse(r["prompt"], r["messages"])
        except ChatError as e:  # a malformed stored conversation: skip it, never stop training
            log.warning("skipping feedback whose conversation cannot be read", event_id=eid, error=str(e)[:200])
            continue
        if kind in PAIR_KINDS:
            if r["text_a"] == r["text_b"]:
                continue  # a "correction" identical to the answer carries no preference
            ex = Example(eid, kind, prompt, r["ingested_at"], chosen=r["text_a"], rejected=r["text_b"])
        else:
            label = float(r["label"])
            if not 0.0 <= label <= 1.0:
                continue  # out-of-range rating: the schema forbids it; never let it poison training
            ex = Example(eid, kind, prompt, r["ingested_at"], completion=r["text_a"], label=label)
        out.append((ex, r["voter_key"]))
    return out


class FeedbackSource:
    """Queries over a DuckDB connection holding the ``feedback_votes`` and ``preference_votes``
    views. ``consumed`` is the set of event ids already consumed (trained or held out); with
    ``since`` (the updater's consumed floor) only events ingested from then on are read as new.
    ``max_user_share`` caps one voter's share of a new slice (1.0: no cap). ``score_names``
    (``reward.score_names``) says which scores train and how (module docstring); none by default."""

    def __init__(self, con, max_user_share: float = 1.0, score_names: Mapping[str, ScoreSpec] | None = None):
        if not 0 < max_user_share <= 1:
            raise ValueError(f"max_user_share must be in (0, 1], got {max_user_share}")
        self.con = con
        self.max_user_share = max_user_share
        specs = dict(score_names or {})
        # The score query joins these: registered even when empty, so every query has them.
        con.register("looprl_reward_score_specs", pa.table({
            "name": pa.array(list(specs), pa.string()),
            "lo": pa.array([s.min for s in specs.values()], pa.float64()),
            "hi": pa.array([s.max for s in specs.values()], pa.float64()),
            "higher_is_better": pa.array([s.higher_is_better for s in specs.values()], pa.bool_()),
        }))
        cats = [(n, c, label) for n, s in specs.items() for c, label in s.categories.items()]
        con.register("looprl_reward_score_categories", pa.table({
            "name": pa.array([n for n, _, _ in cats], pa.string()),
            "category": pa.array([c for _, c, _ in cats], pa.string()),
            "label": pa.array([label for _, _, label in cats], pa.float64()),
        }))

    def _with_ids(self, ids: Iterable[str]) -> None:
        ids = sorted(set(ids))
        self.con.register("looprl_reward_consumed", pa.table({"event_id": pa.array(ids, pa.string())}))

    def new_examples(self, consumed: Iterable[str], limit: int | None = None,
                     since: datetime | None = None) -> list[Example]:
        """Resolved events not consumed yet, oldest ingested first (ties by event id), less each
        voter's newest ones beyond ``max_user_share`` of the slice (they wait for a later slice)."""
        self._with_ids(consumed)
        sql = (f"SELECT * FROM ({_EXAMPLES_SQL}) e WHERE e.event_id NOT IN "
               f"(SELECT event_id FROM looprl_reward_consumed){_since(since)} ORDER BY ingested_at, event_id")
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        rows = _rows_to_examples(self.con.sql(sql, params=_params(since)).to_arrow_table())
        kept = cap_by_voter(rows, lambda row: row[1], self.max_user_share)
        if len(kept) < len(rows):
            log.info("reward examples deferred by the per-user share cap", deferred=len(rows) - len(kept),
                     slice=len(rows), voters=len({v for _, v in rows}), max_user_share=self.max_user_share)
        return [e for e, _ in kept]

    def count_new(self, consumed: Iterable[str], since: datetime | None = None) -> int:
        """Resolved events not consumed yet, those deferred by the user share cap included."""
        self._with_ids(consumed)
        # Arrow, not execute().fetchone(): DuckDB keeps a half-read result open on the connection
        # and later queries on it block behind it.
        t = self.con.sql(f"SELECT count(DISTINCT e.event_id) AS n FROM ({_EXAMPLES_SQL}) e WHERE e.event_id "
                         f"NOT IN (SELECT event_id FROM looprl_reward_consumed){_since(since)}",
                         params=_params(since)).to_arrow_table()
        return int(t.column("n")[0].as_py())

    def examples_by_id(self, ids: Iterable[str]) -> list[Example]:
        """Examples for the given event ids (replay, held-out evaluation); a vote the same user has
        since replaced is no longer among them."""
        self.con.register("looprl_reward_wanted", pa.table({"event_id": pa.array(sorted(set(ids)), pa.string())}))
        sql = (f"SELECT * FROM ({_EXAMPLES_SQL}) e WHERE e.event_id IN "
               "(SELECT event_id FROM looprl_reward_wanted) ORDER BY ingested_at, event_id")
        return [e for e, _ in _rows_to_examples(self.con.sql(sql).to_arrow_table())]

    def ids_before(self, floor: datetime) -> list[str]:
        """Ids of the resolved events ingested before ``floor`` (consumed, by the updater's floor)."""
        t = self.con.sql(f"SELECT DISTINCT e.event_id FROM ({_EXAMPLES_SQL}) e WHERE e.ingested_at < ?",
                         params=[floor]).to_arrow_table()
        return t.column("event_id").to_pylist()


def _since(since: datetime | None) -> str:
    """The condition that reads only events ingested from ``since`` on (None: all)."""
    return "" if since is None else " AND e.ingested_at >= ?"


def _params(since: datetime | None) -> list[datetime] | None:
    return None if since is None else [since]


def connect_event_log(events_dir):
    """A DuckDB connection to the event log (``looprl.storage.events``)."""
    return EventLog(events_dir).connect()
