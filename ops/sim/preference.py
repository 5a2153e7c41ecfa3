"""Hidden user preferences of the simulated users (`looprl demo --preference module:function`).

A preference maps (prompt, completion) to the probability that a simulated user gives a
thumbs-up. The loop never sees this function: it only sees the feedback events that the
simulator draws from it, and must learn it through the reward model and PPO.
"""

from __future__ import annotations

import importlib
import re
from typing import Callable

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
