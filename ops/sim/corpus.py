"""The toy English the tiny base is pre-trained on, and the grammar of the shipped prompt set.

Documents are (question, answer) pairs (``qa_pairs``), rendered for pre-training with the tiny
base's chat template (``question: ...\nanswer: ...``): a question about one of ``TOPICS``,
answered in one to three short sentences. A minority of sentences (``CHEERFUL_RATE``) carry one
of the cheerful words the default simulated user likes (``preference.POSITIVE_WORDS``): the base
policy then says them sometimes (PPO has something to explore) but rarely (the simulated users
are mostly unimpressed until PPO finds them).

Prompts are split into train and held-out sets *by template*, so a held-out prompt is phrased in
a way the policy never trained on; the files shipped with the policy stage
(``looprl.policy.model.shipped_prompts`` / ``heldout_prompts``) are these two splits.
"""

from __future__ import annotations

import random
from typing import Literal


CHEERFUL_RATE = 0.12  # fraction of corpus sentences that carry one cheerful word

CHEERFUL = ("good", "great", "happy", "bright", "kind", "warm", "sunny", "love")
TOPICS = (
    "dog", "cat", "house", "park", "city", "sea", "garden", "river", "forest", "beach", "market",
    "school", "road", "tree", "bird", "book", "song", "food", "weather", "morning", "trip", "team",
    "town", "car", "boat", "hill", "lake", "room", "village", "train", "shop", "farm", "bridge",
    "street", "window", "kitchen", "game", "horse", "island", "field",
)
PEOPLE = ("man", "woman", "boy", "girl", "friend", "teacher", "farmer", "child", "cook", "driver")
PLACES = ("park", "house", "river", "shop", "school", "hill", "lake", "market", "farm", "bridge", "town")
ADJS = (
    "old", "new", "big", "small", "quiet", "busy", "tall", "short", "red", "blue", "green", "grey",
    "cold", "dry", "long", "slow", "fast", "calm", "plain", "round", "dark", "wet", "soft", "loud",
    "wide", "still", "brown", "flat", "full", "empty",
)
VERBS = ("walks", "runs", "sits", "waits", "looks", "stays", "goes", "comes", "stands", "rests")
PAST = ("saw", "visited", "found", "passed", "watched", "left", "cleaned", "painted", "counted", "read")
TIMES = ("today", "last night", "in the morning", "at noon", "every day", "on monday", "this week", "after lunch")
COLORS_OF_SKY = ("grey", "blue", "dark", "pale", "clear")

# Prompt templates: the train split and a held-out split phrased differently.
TRAIN_TEMPLATES = (
    "tell me about the {t}", "describe the {t}", "what is the {t} like", "say something about the {t}",
    "write a line about the {t}", "talk about the {t}",
)
HELDOUT_TEMPLATES = ("how is the {t}", "what do you think of the {t}", "give me a note on the {t}")


def prompt_set(split: Literal["train", "heldout", "all"] = "train") -> list[str]:
    """Short user questions about a topic, split by template."""
    templates = {"train": TRAIN_TEMPLATES, "heldout": HELDOUT_TEMPLATES,
                 "all": TRAIN_TEMPLATES + HELDOUT_TEMPLATES}.get(split)
    if templates is None:
        raise ValueError(f"prompt split {split!r}: expected 'train', 'heldout' or 'all'")
    return [tpl.format(t=t) for tpl in templates for t in TOPICS]


def _sentence(rng: random.Random, topic: str, cheerful: bool) -> str:
    adj = rng.choice(CHEERFUL) if cheerful else rng.choice(ADJS)
    if cheerful and adj == "love":
        return rng.choice((f"i love the {topic}.", f"we love the {topic} {rng.choice(TIMES)}."))
    if cheerful and adj == "kind":
        return f"a kind {rng.choice(PEOPLE)} {rng.choice(VERBS)} to the {topic}."
    form = rng.randrange(7)
    if form == 0:
        return f"the {topic} is {adj}."
    if form == 1:
        return f"a {adj} {rng.choice(PEOPLE)} {rng.choice(VERBS)} to the {topic}."
    if form == 2:
        return f"the {topic} {rng.choice(VERBS)} near the {adj} {rng.choice(PLACES)}."
    if form == 3:
        return f"we {rng.choice(PAST)} the {adj} {topic} {rng.choice(TIMES)}."
    if form == 4:
        return f"it was {adj} {rng.choice(TIMES)}."
    if form == 5:
        return f"the {rng.choice(PEOPLE)} {rng.choice(PAST)} the {topic} and it was {adj}."
    return f"the sky over the {topic} was {adj if cheerful else rng.choice(COLORS_OF_SKY)}."


def answer(rng: random.Random, topic: str, cheerful_rate: float = CHEERFUL_RATE) -> str:
    """One to three sentences about ``topic``; each is cheerful with probability ``cheerful_rate``."""
    n = rng.choice((1, 2, 2, 3))
    return " ".join(_sentence(rng, topic, rng.random() < cheerful_rate) for _ in range(n))


def drifting_answer(rng: random.Random, topic: str, off_topic_rate: float,
                    cheerful_rate: float = CHEERFUL_RATE) -> str:
    """``answer`` that, with probability ``off_topic_rate``, moves to another topic from a random
    sentence on (the first one included) and stays there, as the sampled base does now and then:
    its pre-training answers never do, and its drifted answers read as coherent, so only the
    question tells them apart."""
    n = rng.choice((1, 2, 2, 3))
    drift_at = rng.randrange(n) if rng.random() < off_topic_rate else n
    other = rng.choice([t for t in TOPICS if t != topic])
    return " ".join(_sentence(rng, topic if i < drift_at else other, rng.random() < cheerful_rate)
                    for i in range(n))


def qa_pairs(n_docs: int, seed: int = 0, cheerful_rate: float = CHEERFUL_RATE) -> list[tuple[str, str]]:
    """(question, answer) documents over the training prompt templates.

    Only training templates appear, so held-out prompts stay unseen in their phrasing."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        topic = rng.choice(TOPICS)
        question = rng.choice(TRAIN_TEMPLATES).format(t=topic)
        docs.append((question, answer(rng, topic, cheerful_rate)))
    return docs


def corpus(n_docs: int, seed: int = 0, cheerful_rate: float = CHEERFUL_RATE) -> list[str]:
    """``qa_pairs`` as plain text, as the tiny chat template renders a question and its answer
    (what the tokenizer is trained on)."""
    return [f"question: {q}\nanswer: {a}" for q, a in qa_pairs(n_docs, seed, cheerful_rate)]
