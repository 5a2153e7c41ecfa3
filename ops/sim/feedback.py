"""Synthetic product feedback from a known hidden preference, for the reward stage's tests and
``benchmarks/reward.py``.

``simulate_feedback`` draws traffic the way the demo's simulated users would, as the events of
the public contract (``looprl.ingest.schema``): a prompt from the shipped prompt grammar, an answer
in the base model's language (``corpus.answer``) served as a ``ResponseEvent``, and feedback drawn
from a hidden preference (``preference.default_preference``):

- thumbs: up with probability p(prompt, completion);
- rating: 1 + 4 p, rounded, with noise;
- preference: two answers (by text), the one with the higher p is chosen (ties are not asked);
- correction: the user rewrites the answer to be more cheerful.

``SimulatedLog`` writes such events into a real Parquet event log (the part files ingest writes)
and reads it through the storage views (``looprl.storage.events``), so the reward stage can be
tested and benchmarked on the real read side without a broker or an ingest process.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterable, Union

import duckdb
import pyarrow as pa

from looprl.ingest.decode import Columns
from looprl.ingest.schema import CorrectionEvent, PreferenceEvent, RatingEvent, ResponseEvent, ThumbsEvent
from looprl.ops.sim.corpus import answer as corpus_answer, drifting_answer, prompt_set
from looprl.ops.sim.preference import Preference, default_preference
from looprl.storage.events import EventLog
from looprl.storage.parts import PartWriter

DEFAULT_MIX = {"thumbs": 0.35, "rating": 0.1, "preference": 0.45, "correction": 0.1}
INGEST_DELAY = timedelta(milliseconds=5)
SIMULATED_MODEL = "simulated-base"

Feedback = Union[ThumbsEvent, RatingEvent, CorrectionEvent, PreferenceEvent]


@dataclass
class FeedbackBatch:
    """Feedback events and the served responses they are about (thumbs, ratings and corrections
    name a response by id; preferences carry their texts)."""

    feedback: list[Feedback] = field(default_factory=list)
    responses: dict[str, ResponseEvent] = field(default_factory=dict)  # by response_id

    def __len__(self) -> int:
        return len(self.feedback)

    @property
    def event_ids(self) -> list[str]:
        return [str(e.event_id) for e in self.feedback]

    def events(self) -> list[ResponseEvent | Feedback]:
        return [*self.responses.values(), *self.feedback]


def _topic(prompt: str) -> str:
    return prompt.split()[-1]


def simulate_feedback(n: int, seed: int = 0, preference: Preference = default_preference,
                      prompts: list[str] | None = None, mix: dict[str, float] | None = None,
                      cheerful_rate: float = 0.25, start: datetime | None = None,
                      off_topic_rate: float = 0.0) -> FeedbackBatch:
    """``n`` feedback events drawn from the hidden ``preference`` (see module docstring). With
    ``off_topic_rate`` > 0 each answer sentence drifts to another topic with that probability
    (``corpus.drifting_answer``), so answers differ in how well they stay on the question's topic."""
    rng = random.Random(seed)

    def answer(rng: random.Random, topic: str, cheerful_rate: float) -> str:
        if off_topic_rate > 0:
            return drifting_answer(rng, topic, off_topic_rate, cheerful_rate)
        return corpus_answer(rng, topic, cheerful_rate)

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
        eid = uuid.UUID(int=rng.getrandbits(128), version=4)
        # An answer as the base writes it after its chat template's "answer:": one leading space.
        completion = " " + answer(rng, topic, cheerful_rate)
        p = preference(prompt, completion)
        if kind == "preference":
            other = " " + answer(rng, topic, cheerful_rate)
            q = preference(prompt, other)
            if p == q:
                continue  # a user with no preference between the two is not asked
            chosen, rejected = (completion, other) if p > q else (other, completion)
            out.feedback.append(PreferenceEvent(event_id=eid, ts=t, prompt=prompt, chosen_text=chosen,
                                                rejected_text=rejected))
            continue
        user, rid = f"user-{rng.randrange(8)}", f"resp-{eid}"
        out.responses[rid] = ResponseEvent(event_id=uuid.uuid5(eid, "response"), ts=t, user_id=user, response_id=rid,
                                           prompt=prompt, completion=completion, model=SIMULATED_MODEL)
        common = dict(event_id=eid, ts=t, user_id=user, response_id=rid)
        if kind == "thumbs":
            out.feedback.append(ThumbsEvent(**common, up=rng.random() < p))
        elif kind == "rating":
            out.feedback.append(RatingEvent(**common, rating=max(1, min(5, round(1 + 4 * p + rng.gauss(0, 0.5))))))
        else:
            corrected = completion + rng.choice((" it was great.", " i love the " + topic + ".",
                                                 " the " + topic + " is happy."))
            out.feedback.append(CorrectionEvent(**common, corrected=corrected))
    return out


def heldout_pairs(n: int, seed: int = 1, preference: Preference = default_preference,
                  cheerful_rate: float = 0.25, off_topic_rate: float = 0.0,
                  prompts: list[str] | None = None) -> list[tuple[str, str, str]]:
    """(prompt, better, worse) pairs on the held-out prompt templates (fresh prompts), or on
    ``prompts``."""
    batch = simulate_feedback(n, seed=seed, preference=preference, prompts=prompts or prompt_set("heldout"),
                              mix={"preference": 1.0}, cheerful_rate=cheerful_rate,
                              off_topic_rate=off_topic_rate)
    return [(e.prompt, e.chosen_text, e.rejected_text) for e in batch.feedback]


class SimulatedLog:
    """A Parquet event log in ``events_dir`` that simulated events are appended to directly."""

    def __init__(self, events_dir: str | Path):
        self.events_dir = Path(events_dir)
        self.writer = PartWriter(self.events_dir)
        self.log = EventLog(self.events_dir)

    def append(self, events: FeedbackBatch | Iterable[ResponseEvent | Feedback]) -> None:
        """Write ``events`` as one batch (one part file per kind, as ingest writes them).

        Each event is stamped as ingested ``INGEST_DELAY`` after it happened, in simulated time,
        so the reward updater reads a slice in the order its events happened."""
        if isinstance(events, FeedbackBatch):
            events = events.events()
        cols: dict[str, Columns] = {}
        arrivals: dict[str, list[datetime]] = {}
        for e in events:
            if e.kind not in cols:
                cols[e.kind], arrivals[e.kind] = Columns(e.kind), []
            cols[e.kind].append(e, str(e.event_id), topic=None, partition=None, offset=None)  # not read from Kafka
            arrivals[e.kind].append(e.ts + INGEST_DELAY)
        if not cols:
            return
        tables = {}
        for kind, c in cols.items():
            t = c.table(max(arrivals[kind]))
            i = t.schema.get_field_index("ingested_at")
            tables[kind] = t.set_column(i, t.schema.field(i), pa.array(arrivals[kind], t.schema.field(i).type))
        self.writer.write_batch(tables, max(max(a) for a in arrivals.values()))

    def connect(self) -> duckdb.DuckDBPyConnection:
        """A connection with the storage views (``feedback_joined``, ``preferences_joined``, ...)."""
        return self.log.connect()
