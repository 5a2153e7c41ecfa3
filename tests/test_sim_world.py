"""The simulated world (looprl.ops.sim) stays out of the product: no stage imports it, and the
feedback it simulates goes through the real event log's write and read sides."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from looprl.ops.sim.corpus import TOPICS, prompt_set
from looprl.ops.sim.feedback import SimulatedLog, heldout_pairs, simulate_feedback
from looprl.ops.sim.preference import default_preference, on_topic, topic_of

ROOT = Path(__file__).parents[1]
STAGES = ("ingest", "storage", "reward", "policy", "serving", "kernels")


def imported_modules(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.update([node.module, *(f"{node.module}.{a.name}" for a in node.names)])
    return out


@pytest.mark.parametrize("stage", STAGES)
def test_no_stage_imports_the_simulated_world(stage):
    offenders = {str(p.relative_to(ROOT)): sorted(m for m in imported_modules(p) if m.startswith("looprl.ops.sim"))
                 for p in (ROOT / stage).rglob("*.py")}
    assert not {p: m for p, m in offenders.items() if m}


def test_simulated_feedback_is_read_back_through_the_storage_views(tmp_path):
    batch = simulate_feedback(40, seed=3)
    assert len(batch) == 40 and len(set(batch.event_ids)) == 40
    log = SimulatedLog(tmp_path / "events")
    log.append(batch)
    con = log.connect()
    try:
        joined = con.sql("SELECT event_id, prompt, completion FROM feedback_joined "
                         "WHERE kind <> 'preference'").to_arrow_table().to_pylist()
        pairs = con.sql("SELECT event_id, prompt, chosen, rejected FROM preferences_joined").to_arrow_table().to_pylist()
    finally:
        con.close()
    assert {r["event_id"] for r in joined} | {r["event_id"] for r in pairs} == set(batch.event_ids)
    by_id = {str(e.event_id): e for e in batch.feedback}
    for r in joined:  # every thumbs/rating/correction is joined to the response it is about
        response = batch.responses[by_id[r["event_id"]].response_id]
        assert (r["prompt"], r["completion"]) == (response.prompt, response.completion)
    for r in pairs:  # the hidden preference chose, and it is never indifferent
        assert default_preference(r["prompt"], r["chosen"]) > default_preference(r["prompt"], r["rejected"])


def test_heldout_pairs_use_fresh_prompt_templates():
    pairs = heldout_pairs(20, seed=1)
    assert len(pairs) == 20 and {p for p, _, _ in pairs} <= set(prompt_set("heldout"))
    assert simulate_feedback(10, seed=5).event_ids == simulate_feedback(10, seed=5).event_ids  # seeded


def test_on_topic_reads_the_topic_of_every_question_form():
    """Every shipped question form, train and held-out: an answer on the asked topic is liked, the
    same answer about another topic is not ("what is the dog like" asks about the dog, not "like")."""
    for prompt in prompt_set("all"):
        asked = topic_of(prompt)
        assert asked in TOPICS and asked in prompt.split(), prompt
        elsewhere = next(t for t in TOPICS if t != asked)
        assert on_topic(prompt, f"the {asked} is old. we saw the {asked} today.") == 0.95, prompt
        assert on_topic(prompt, f"the {elsewhere} is old.") == 0.05, prompt
        assert on_topic(prompt, f"the {asked} is old. it was cold today.") == 0.5, prompt  # half the sentences


def test_a_preference_scores_as_a_reward_in_its_own_order():
    """The oracle reward of benchmarks/transfer.py: the log-odds of the hidden P, so PPO ranks answers
    as the users would; a preference that says 0 or 1 still gives a finite reward."""
    from looprl.ops.core.chat import Chat
    from looprl.ops.sim.scoring import PreferenceScorer

    scorer = PreferenceScorer(on_topic, "on_topic")
    answers = ["the dog is old.", "the dog is old. it was cold today.", "the cat is old."]
    r = scorer.score([Chat.user("how is the dog")] * 3, answers)
    assert r[0] > r[1] > r[2] and abs(r[1]) < 1e-6  # P 0.95, 0.5, 0.05
    assert scorer.score(["how is the cat"], ["the cat is old."])[0] == r[0]  # plain prompts too
    sure = PreferenceScorer(lambda prompt, completion: float("dog" in completion), "dog")
    s = sure.score(["x", "x"], ["a dog", "a cat"])
    assert s.isfinite().all() and s[0] > 0 > s[1]
