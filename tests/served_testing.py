"""Labelled served answers in a real Parquet event log, for the off-policy tests: responses as the
serving tier logs them (token ids of the rendered answer, behaviour log-probs, adapter version,
sampling) and the thumbs users gave them."""

from __future__ import annotations

import random
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

from looprl.ingest.schema import RatingEvent, ResponseEvent, Sampling, ThumbsEvent
from looprl.ops.sim.corpus import answer
from looprl.ops.sim.feedback import SimulatedLog
from looprl.ops.sim.preference import default_preference
from looprl.policy.model import completion_ids, end_of_turn_id, shipped_prompts
from looprl.policy.prompts import is_heldout

T0 = datetime(2026, 3, 1, tzinfo=timezone.utc)


def train_prompts() -> list[str]:
    return [p for p in shipped_prompts() if not is_heldout(p)]


def served_response(tok, prompt: str, completion: str, *, response_id: str, ts: datetime, user_id: str = "user-1",
                    adapter_version: str | None = None, sampling: Sampling | None = None, logprobs: bool = True,
                    logprob: float = -1.0) -> ResponseEvent:
    """An answer as serving logs it: its tokens are the completion's plus the end of turn."""
    ids = completion_ids(tok, completion) + [end_of_turn_id(tok)]
    return ResponseEvent(
        ts=ts, user_id=user_id, response_id=response_id, prompt=prompt, completion=completion, model="base",
        adapter_version=adapter_version, sampling=sampling,
        completion_token_ids=ids if logprobs else None, completion_logprobs=[logprob] * len(ids) if logprobs else None)


def thumb(response_id: str, up: bool, ts: datetime, user_id: str = "user-1") -> ThumbsEvent:
    return ThumbsEvent(ts=ts + timedelta(seconds=1), user_id=user_id, response_id=response_id, up=up)


def rating(response_id: str, stars: int, ts: datetime, user_id: str = "user-1") -> RatingEvent:
    return RatingEvent(ts=ts + timedelta(seconds=1), user_id=user_id, response_id=response_id, rating=stars)


def write_labelled_answers(events_dir: Path, tok, n: int, seed: int = 0, adapter_version: str | None = None,
                           max_tokens: int = 8) -> None:
    """``n`` thumbed answers to training prompts, written in the base's language (cut to fewer than
    ``max_tokens`` tokens, plus the end of turn) and labelled by the default hidden preference
    (cheerful words), one user per answer among 8."""
    rng = random.Random(seed)
    prompts = train_prompts()
    events = []
    for i in range(n):
        prompt = rng.choice(prompts)
        completion = " " + answer(rng, prompt.split()[-1], 0.4)
        while len(completion_ids(tok, completion)) >= max_tokens:  # served with max_tokens, as the demo asks
            completion = completion.rsplit(" ", 1)[0]
        ts = T0 + timedelta(seconds=10 * i)
        rid = f"served-{seed}-{i}-{uuid.UUID(int=rng.getrandbits(128))}"
        user = f"user-{rng.randrange(8)}"
        logprob = -rng.uniform(0.2, 3.0)
        events.append(served_response(tok, prompt, completion, response_id=rid, ts=ts, user_id=user,
                                      adapter_version=adapter_version, logprob=logprob))
        events.append(thumb(rid, rng.random() < default_preference(prompt, completion), ts, user))
    SimulatedLog(events_dir).append(events)
