"""Hidden user preferences of the simulated users (`looprl demo --preference module:function`).

A preference maps (prompt, completion) to the probability that a simulated user gives a
thumbs-up. The loop never sees this function: it only sees the feedback events that the
simulator draws from it, and must learn it through the reward model and PPO.
"""

from __future__ import annotations

import importlib
import re
from typing import Callable

from looprl.ops.sim.corpus import TIMES, TOPICS

Preference = Callable[[str, str], float]

# The default user likes cheerful answers. The base model's pre-training corpus uses these words
# in a minority of sentences, so the base policy earns a low thumbs-up rate and PPO has
# something to discover.
POSITIVE_WORDS = frozenset({"good", "great", "happy", "bright", "kind", "warm", "sunny", "love"})
_WORD = re.compile(r"[a-z]+")


def positive_word_count(text: str) -> int:
    return sum(1 for w in _WORD.findall(text.lower()) if w in POSITIVE_WORDS)


def default_preference(prompt: str, completion: str) -> float:
    """P(thumbs-up) = 0.15 + 0.3 per cheerful word, clipped to [0.05, 0.95]."""
    return min(0.95, max(0.05, 0.15 + 0.3 * positive_word_count(completion)))


def short_answers(prompt: str, completion: str) -> float:
    """An alternative user who prefers short answers (to show the preference is pluggable)."""
    n = len(_WORD.findall(completion))
    return min(0.95, max(0.05, 1.0 - n / 12))


_TOPICS = frozenset(TOPICS)
# Time phrases ("in the morning") name no topic: removed before looking for other topics.
_TIME_PHRASES = re.compile("|".join(re.escape(t) for t in sorted(TIMES, key=len, reverse=True)))


def topic_of(prompt: str) -> str:
    """The topic a question asks about: its last word that is a topic ("what is the dog like" asks
    about the dog), else its last word (a question on no known topic)."""
    words = _WORD.findall(prompt.lower())
    topics = [w for w in words if w in _TOPICS]
    return topics[-1] if topics else (words[-1] if words else "")


def on_topic(prompt: str, completion: str) -> float:
    """A user who wants the answer to stay on the topic of the question (prompt-dependent).

    Each sentence (a trailing unfinished one included) that names the asked topic and no other
    earns a share, each sentence that names another topic and not the asked one costs as much:
    P(up) = 0.05 + 0.9 * (clean - drifting) / sentences, clipped to [0.05, 0.95]. "the dog is
    big. a man walks to the dog." scores 0.95 for "tell me about the dog"; the same answer scores
    0.05 for "tell me about the cat"."""
    topic = topic_of(prompt)
    sentences = [s for s in completion.lower().split(".") if _WORD.search(s)]
    if not sentences:
        return 0.05
    clean = drifting = 0
    for s in sentences:
        names_topic = topic in _WORD.findall(s)
        others = set(_WORD.findall(_TIME_PHRASES.sub(" ", s))) & _TOPICS - {topic}
        clean += names_topic and not others
        drifting += bool(others) and not names_topic
    return min(0.95, max(0.05, 0.05 + 0.9 * (clean - drifting) / len(sentences)))


def load_preference(spec: str) -> Preference:
    """Load ``module:function``; errors name the spec."""
    if ":" not in spec:
        raise ValueError(f"preference {spec!r}: expected 'module:function'")
    mod_name, fn_name = spec.split(":", 1)
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"preference {spec!r}: cannot load: {e}") from e
    if not callable(fn):
        raise ValueError(f"preference {spec!r} is not callable")
    return fn
