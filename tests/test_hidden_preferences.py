"""The reward model learns hidden preferences of its own kind, not only the shipped ones: one that
depends on the question (which kind of question wants which kind of answer) and one that does not.
Each is learned from simulated pairs to well above chance on prompts never trained on, and a model
trained on the other preference stays near chance on it, so a reward model that ignored the
prompt (or the answer) fails here. A third, decided by the question alone (does the answer open
on the topic asked about?), is learned on topics never trained on with the default "echo" features."""

from __future__ import annotations

import json
import re

import pytest
import torch

from looprl.ops.sim.corpus import PEOPLE, TIMES, TOPICS, TRAIN_TEMPLATES
from looprl.ops.sim.feedback import heldout_pairs, simulate_feedback
from looprl.ops.sim.preference import topic_of
from looprl.reward.data import Example
from looprl.reward.model import (
    ANSWER_TOKEN, CONFIG_FILE, PROMPT_TOKEN, SUM_TOKENS, RewardModel, RewardModelError, _decoder, load_from_dir,
)
from looprl.reward.train import evaluate, train

torch.set_num_threads(1)

_WORD = re.compile(r"[a-z]+")
_PEOPLE = frozenset(PEOPLE)
# Questions that open with these words want to hear about someone; the others do not.
_PERSON_QUESTIONS = ("tell", "describe", "talk")
_TIME = re.compile("|".join(re.escape(t) for t in TIMES))
_TOPICS = frozenset(TOPICS)


def wants_a_person_when_asked(prompt: str, completion: str) -> float:
    """Prompt-dependent: "tell/describe/talk about" questions like answers with a person in them,
    the other question forms like answers without one."""
    has_person = any(w in _PEOPLE for w in _WORD.findall(completion.lower()))
    wants_person = prompt.split()[0] in _PERSON_QUESTIONS
    return 0.85 if has_person == wants_person else 0.15


def opens_on_the_asked_topic(prompt: str, completion: str) -> float:
    """Prompt-dependent, and only the question tells the answers apart: the first sentence names
    the topic asked about and no other (the shipped ``on_topic`` weighs every sentence)."""
    topic = topic_of(prompt)  # "what is the dog like" asks about the dog
    words = set(_WORD.findall(completion.lower().split(".")[0]))
    return 0.85 if topic in words and not words & (_TOPICS - {topic}) else 0.15


def says_when(prompt: str, completion: str) -> float:
    """Prompt-independent: answers that say when (a time phrase: today, last night, ...)."""
    return 0.85 if _TIME.search(completion.lower()) else 0.15


# Fresh prompts: every training template (both kinds of question) on topics never trained on.
TRAIN_TOPICS, FRESH_TOPICS = TOPICS[:30], TOPICS[30:]
TRAIN_PROMPTS = [t.format(t=x) for t in TRAIN_TEMPLATES for x in TRAIN_TOPICS]
FRESH_PROMPTS = [t.format(t=x) for t in TRAIN_TEMPLATES for x in FRESH_TOPICS]
PREFERENCES = {"person-when-asked": wants_a_person_when_asked, "says-when": says_when}
N_PAIRS, N_TEST = 400, 200


@pytest.fixture(scope="module")
def trained(tiny_base_cfg):
    """One fresh reward model per preference, trained on simulated pairs over TRAIN_PROMPTS."""
    cfg = tiny_base_cfg(reward={"max_seq_len": 48, "features": "echo"})
    rc = cfg.reward
    models = {}
    for i, (name, pref) in enumerate(PREFERENCES.items()):
        batch = simulate_feedback(N_PAIRS, seed=100 + i, preference=pref, prompts=TRAIN_PROMPTS,
                                  mix={"preference": 1.0})
        examples = [Example(str(e.event_id), "preference", e.prompt, None, chosen=e.chosen_text,
                            rejected=e.rejected_text) for e in batch.feedback]
        rm = RewardModel.fresh(cfg)
        train(rm, examples, lr=rc.learning_rate, batch_size=rc.batch_size, epochs=rc.epochs_per_update, seed=rc.seed)
        models[name] = rm
    return models


def _accuracy(rm: RewardModel, name: str) -> float:
    pairs = heldout_pairs(N_TEST, seed=7, preference=PREFERENCES[name], prompts=FRESH_PROMPTS)
    test = [Example(f"t{i}", "preference", p, None, chosen=c, rejected=r) for i, (p, c, r) in enumerate(pairs)]
    return evaluate(rm, test).pair_accuracy


def test_the_preferences_are_what_they_say():
    answer = " a tall man walks to the dog. it was cold today."
    assert wants_a_person_when_asked("describe the dog", answer) > wants_a_person_when_asked("what is the dog like", answer)
    assert wants_a_person_when_asked("what is the dog like", " the dog is big.") == 0.85
    assert says_when("describe the dog", answer) == says_when("what is the dog like", answer) == 0.85
    assert says_when("describe the dog", " the dog is big.") == 0.15
    answer = " the dog is big. the cat is old."
    assert opens_on_the_asked_topic("describe the dog", answer) == 0.85
    assert opens_on_the_asked_topic("describe the cat", answer) == 0.15  # same answer, other question
    assert opens_on_the_asked_topic("what is the dog like", answer) == 0.85
    # half the fresh questions want a person, half do not: a prompt-blind model is at chance
    assert sum(p.split()[0] in _PERSON_QUESTIONS for p in FRESH_PROMPTS) * 2 == len(FRESH_PROMPTS)


@pytest.mark.parametrize("name", list(PREFERENCES))
def test_each_hidden_preference_is_learned_and_the_other_is_not(trained, name):
    other = next(n for n in PREFERENCES if n != name)
    own = _accuracy(trained[name], name)
    crossed = _accuracy(trained[other], name)
    assert own >= 0.8, f"{name}: held-out pair accuracy {own:.2f} on fresh prompts"
    assert crossed <= 0.65, f"a model trained on {other} scores {crossed:.2f} on {name}"


def test_a_version_keeps_the_features_it_was_trained_with(tiny_base_cfg, tmp_path):
    """A version saved with last-token features (or before versions named theirs) still loads and
    scores as saved under a config whose default reads more; an unknown kind is refused by name."""
    prompts, answers = ["describe the dog", "what is the cat like"], [" the dog is big.", " a man walks to the cat."]
    old = RewardModel.fresh(tiny_base_cfg(reward={"features": "last"}))
    out = old.save(tmp_path / "v")
    conf = json.loads((out / CONFIG_FILE).read_text())
    assert conf["features"] == "last" and old.feature_dim == conf["hidden_size"]
    del conf["features"]  # as saved before the entry existed
    (out / CONFIG_FILE).write_text(json.dumps(conf))
    cfg = tiny_base_cfg()
    assert cfg.reward.features == "echo" and RewardModel.fresh(cfg).feature_dim == 4 * old.feature_dim
    loaded = load_from_dir(cfg, out, "v1")
    assert loaded.feature_kind == "last"
    assert torch.allclose(loaded.score(prompts, answers), old.score(prompts, answers), atol=1e-5)
    conf["features"] = "attention_pool"
    (out / CONFIG_FILE).write_text(json.dumps(conf))
    with pytest.raises(RewardModelError, match=r"reward_config.json: features: unknown reward features 'attention_pool'"):
        load_from_dir(cfg, out, "v1")


def test_echo_features_split_the_answer_by_what_the_question_said(tiny_base_cfg):
    """"echo" features: last_match's, then the answer's hidden states summed over its tokens whose
    id occurs in the prompt and over the others, each divided by the answer's length."""
    rm = RewardModel.fresh(tiny_base_cfg(reward={"features": "echo"}))
    x, mask = rm.encode(["tell me about the dog", "tell me about the dog"], [" the dog is big.", " a cat walks."])
    with torch.no_grad():
        feats = rm.features(x, mask)
        hidden = _decoder(rm.backbone)(input_ids=x, attention_mask=(mask > 0).long()).last_hidden_state.float()
    h = hidden.shape[-1]
    assert feats.shape == (2, 4 * h) and rm.feature_dim == 4 * h
    last_match = RewardModel.fresh(tiny_base_cfg(reward={"features": "last_match"}))
    last_match.backbone = rm.backbone
    with torch.no_grad():
        assert torch.allclose(feats[:, : 2 * h], last_match.features(x, mask), atol=1e-5)
    for row in range(2):
        prompt_ids = set(x[row][mask[row] == PROMPT_TOKEN].tolist())
        answer = (mask[row] == ANSWER_TOKEN).nonzero().flatten().tolist()
        echoed = [i for i in answer if x[row, i].item() in prompt_ids]
        others = [i for i in answer if i not in echoed]
        want = [hidden[row, idx].sum(dim=0) / len(answer) if idx else torch.zeros(h) for idx in (echoed, others)]
        assert torch.allclose(feats[row, 2 * h: 3 * h], want[0], atol=1e-5)
        assert torch.allclose(feats[row, 3 * h:], want[1], atol=1e-5)
    ids = rm.tokenizer.convert_ids_to_tokens(x[0][mask[0] == ANSWER_TOKEN].tolist())
    assert "Ġdog" in ids and "Ġbig" in ids  # " dog" echoes the question, " big" does not
    assert feats[1, 2 * h: 3 * h].abs().sum() < feats[0, 2 * h: 3 * h].abs().sum()  # " a cat walks." echoes less


def test_echo_sum_features_say_how_much_an_answer_says_not_how_dense(tiny_base_cfg):
    """"echo_sum" is "echo" with the two answer sums divided by SUM_TOKENS, not the answer's length:
    on one backbone the features agree up to that factor, and a second sentence grows the sums where
    it leaves echo's means about where they were."""
    rm = RewardModel.fresh(tiny_base_cfg(reward={"features": "echo"}))
    sums = RewardModel.fresh(tiny_base_cfg(reward={"features": "echo_sum"}))
    sums.backbone = rm.backbone
    one, two = " the dog is big.", " the dog is big. the dog is big."
    x, mask = rm.encode(["tell me about the dog"] * 2, [one, two])
    with torch.no_grad():
        mean_feats, sum_feats = rm.features(x, mask), sums.features(x, mask)
    h = rm.feature_dim // 4
    assert sums.feature_dim == rm.feature_dim
    length = (mask == ANSWER_TOKEN).sum(dim=1, keepdim=True).float()
    assert torch.allclose(sum_feats[:, : 2 * h], mean_feats[:, : 2 * h], atol=1e-5)
    assert torch.allclose(sum_feats[:, 2 * h:] * SUM_TOKENS / length, mean_feats[:, 2 * h:], atol=1e-4)
    grow = sum_feats[1, 2 * h:].norm() / sum_feats[0, 2 * h:].norm()
    stay = mean_feats[1, 2 * h:].norm() / mean_feats[0, 2 * h:].norm()
    assert grow > 1.6 and 0.7 < stay < 1.3, (grow, stay)


def test_a_preference_only_the_question_decides_is_learned_on_fresh_topics(tiny_base_cfg):
    """Pairs whose answers differ only in which topic the first sentence is about (coherent either
    way): "echo" ranks them on topics never trained on; "last_match", which meets question and
    answer only through their mean states, does worse."""
    accuracy = {}
    for features in ("last_match", "echo"):
        cfg = tiny_base_cfg(reward={"max_seq_len": 48, "features": features})
        rc = cfg.reward
        batch = simulate_feedback(N_PAIRS, seed=103, preference=opens_on_the_asked_topic, prompts=TRAIN_PROMPTS,
                                  mix={"preference": 1.0}, off_topic_rate=0.5)
        examples = [Example(str(e.event_id), "preference", e.prompt, None, chosen=e.chosen_text,
                            rejected=e.rejected_text) for e in batch.feedback]
        rm = RewardModel.fresh(cfg)
        train(rm, examples, lr=rc.learning_rate, batch_size=rc.batch_size, epochs=rc.epochs_per_update, seed=rc.seed)
        pairs = heldout_pairs(N_TEST, seed=7, preference=opens_on_the_asked_topic, prompts=FRESH_PROMPTS,
                              off_topic_rate=0.5)
        test = [Example(f"t{i}", "preference", p, None, chosen=c, rejected=r) for i, (p, c, r) in enumerate(pairs)]
        accuracy[features] = evaluate(rm, test).pair_accuracy
    # measured: echo 0.97-1.0, last_match 0.73-0.78 (simulated data seeds 103-105)
    assert accuracy["echo"] >= 0.9 and accuracy["echo"] > accuracy["last_match"] + 0.05, accuracy
