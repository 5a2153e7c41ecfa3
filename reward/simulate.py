"""Synthetic feedback from a known hidden preference, for tests and ``benchmarks/reward.py``.

``simulate_feedback`` draws product traffic the way the demo's simulated users would: a prompt
from the shipped prompt set, answers in the base model's language (``policy.model.answer``), and
feedback drawn from a hidden preference (``looprl.ops.preference.default_preference``):

- thumbs: up with probability p(prompt, completion);
- rating: 1 + 4 p, rounded, with noise;
- preference: two answers, the one with the higher p is chosen (ties are not asked);
- correction: the user rewrites the answer to be more cheerful.

``ViewsDouble`` is a stand-in for the event log's DuckDB views (``feedback_joined`` and
``preferences_joined`` with the columns of the storage contract) over Parquet part files in one
directory: appending a batch is writing one more part file, so several processes can share it.
The updater reads the real views through ``looprl.storage.events``; this double only lets the
reward stage be tested and benchmarked without a broker or an ingest process.
"""

from __future__ import annotations

import os
import random
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from looprl.ops.preference import Preference, default_preference
from looprl.policy.model import answer, prompt_set

FEEDBACK_SCHEMA = pa.schema([
    ("event_id", pa.string()), ("kind", pa.string()), ("ts", pa.timestamp("us", tz="UTC")),
    ("ingested_at", pa.timestamp("us", tz="UTC")), ("user_id", pa.string()), ("response_id", pa.string()),
    ("prompt", pa.string()), ("completion", pa.string()), ("adapter_version", pa.string()),
    ("up", pa.bool_()), ("rating", pa.int32()), ("corrected", pa.string()),
])
PREFERENCE_SCHEMA = pa.schema([
    ("event_id", pa.string()), ("ts", pa.timestamp("us", tz="UTC")), ("ingested_at", pa.timestamp("us", tz="UTC")),
    ("prompt", pa.string()), ("chosen", pa.string()), ("rejected", pa.string()),
])
DEFAULT_MIX = {"thumbs": 0.35, "rating": 0.1, "preference": 0.45, "correction": 0.1}


@dataclass
class FeedbackBatch:
    feedback: list[dict] = field(default_factory=list)
    preferences: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.feedback) + len(self.preferences)

    @property
    def event_ids(self) -> list[str]:
        return [r["event_id"] for r in self.feedback] + [r["event_id"] for r in self.preferences]


def _topic(prompt: str) -> str:
    return prompt.split()[-1]


def simulate_feedback(n: int, seed: int = 0, preference: Preference = default_preference,
                      prompts: list[str] | None = None, mix: dict[str, float] | None = None,
                      cheerful_rate: float = 0.25, start: datetime | None = None) -> FeedbackBatch:
    """``n`` feedback events drawn from the hidden ``preference`` (see module docstring)."""
    rng = random.Random(seed)
    prompts = prompts or prompt_set("train")
    mix = mix or DEFAULT_MIX
    kinds, weights = zip(*mix.items())
    t = start or datetime(2026, 1, 1, tzinfo=timezone.utc)
    out = FeedbackBatch()
    while len(out) < n:
        prompt = rng.choice(prompts)
        topic = _topic(prompt)
        kind = rng.choices(kinds, weights)[0]
        t = t + timedelta(milliseconds=rng.randint(1, 50))
        eid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        completion = answer(rng, topic, cheerful_rate)
        p = preference(prompt, completion)
        base = {"event_id": eid, "ts": t, "ingested_at": t + timedelta(milliseconds=5), "prompt": prompt}
        if kind == "preference":
            other = answer(rng, topic, cheerful_rate)
            q = preference(prompt, other)
            if p == q:
                continue  # a user with no preference between the two is not asked
            chosen, rejected = (completion, other) if p > q else (other, completion)
            out.preferences.append({**base, "chosen": chosen, "rejected": rejected})
            continue
        row = {**base, "kind": kind, "user_id": f"user-{rng.randrange(8)}", "response_id": f"resp-{eid[:8]}",
               "completion": completion, "adapter_version": None, "up": None, "rating": None, "corrected": None}
        if kind == "thumbs":
            row["up"] = rng.random() < p
        elif kind == "rating":
            row["rating"] = max(1, min(5, round(1 + 4 * p + rng.gauss(0, 0.5))))
        else:
            row["corrected"] = completion + rng.choice((" it was great.", " i love the " + topic + ".",
                                                        " the " + topic + " is happy."))
        out.feedback.append(row)
    return out


def heldout_pairs(n: int, seed: int = 1, preference: Preference = default_preference,
                  cheerful_rate: float = 0.25) -> list[tuple[str, str, str]]:
    """(prompt, better, worse) pairs on the held-out prompt templates (fresh prompts)."""
    batch = simulate_feedback(n, seed=seed, preference=preference, prompts=prompt_set("heldout"),
                              mix={"preference": 1.0}, cheerful_rate=cheerful_rate)
    return [(r["prompt"], r["chosen"], r["rejected"]) for r in batch.preferences]


class ViewsDouble:
    """``feedback_joined`` / ``preferences_joined`` views over Parquet parts in ``root``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        (self.root / "feedback").mkdir(parents=True, exist_ok=True)
        (self.root / "preferences").mkdir(parents=True, exist_ok=True)

    def append(self, batch: FeedbackBatch) -> None:
        name = f"part-{uuid.uuid4().hex}.parquet"
        for sub, rows, schema in (("feedback", batch.feedback, FEEDBACK_SCHEMA),
                                  ("preferences", batch.preferences, PREFERENCE_SCHEMA)):
            if not rows:
                continue
            tmp = self.root / sub / f".{name}.tmp"
            pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp)
            os.replace(tmp, self.root / sub / name)  # readers see whole parts only

    def connect(self):
        import duckdb

        con = duckdb.connect()
        for view, sub, schema in (("feedback_joined", "feedback", FEEDBACK_SCHEMA),
                                  ("preferences_joined", "preferences", PREFERENCE_SCHEMA)):
            if any((self.root / sub).glob("part-*.parquet")):
                con.execute(f"CREATE VIEW {view} AS SELECT * FROM read_parquet('{self.root / sub}/part-*.parquet')")
            else:  # an empty view with the contract's columns
                con.register(f"{view}_empty", pa.Table.from_pylist([], schema=schema))
                con.execute(f"CREATE VIEW {view} AS SELECT * FROM {view}_empty")
        return con
