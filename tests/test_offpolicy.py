"""Off-policy learning from labelled served answers (policy/served.py, ppo.py's importance weights):
the weights and their truncation against a hand computation, which served answers a run reads
from the event log, and the learner with and without them."""

import json
from datetime import timedelta

import duckdb
import pytest
import torch
from served_testing import T0, rating, served_response, thumb, train_prompts, write_labelled_answers

from looprl.ingest.schema import CorrectionEvent, PreferenceEvent, Sampling
from looprl.ops.core.config import load_config
from looprl.ops.sim.feedback import SimulatedLog
from looprl.ops.sim.scoring import CheerfulScorer
from looprl.policy import ppo, served
from looprl.policy.checkpoint import runs_root
from looprl.policy.model import shipped_prompts
from looprl.policy.prompts import event_log, is_heldout, traffic_prompts
from looprl.policy.trainer import train

torch.set_num_threads(1)  # 2 threads on busy shared cores spin and crawl


# ---------------------------------------------------------------- the math
def test_truncated_is_weights_and_the_weighted_surrogate_by_hand():
    old = torch.log(torch.tensor([[0.5, 0.9, 0.2], [0.3, 0.3, 0.3]]))
    behaviour = torch.log(torch.tensor([[0.1, 0.9, 0.4], [0.3, 0.3, 0.3]]))
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    w, raw = ppo.truncated_is_weights(old, behaviour, mask, cap=2.0)
    # 0.5/0.1 = 5 -> capped at 2; 0.9/0.9 = 1; 0.2/0.4 = 0.5; the padded token is 1
    torch.testing.assert_close(w, torch.tensor([[2.0, 1.0, 0.5], [1.0, 1.0, 1.0]]))
    torch.testing.assert_close(raw[0], torch.tensor([5.0, 1.0, 0.5]))

    # ratio pi/pi_old = [1.5, 1.0, 0.5] on row 0 (clip 0.2), [1, 1] on row 1
    logp = old + torch.log(torch.tensor([[1.5, 1.0, 0.5], [1.0, 1.0, 1.0]]))
    adv = torch.tensor([[1.0, -2.0, -1.0], [0.5, 0.5, 9.0]])
    zeros = torch.zeros(2, 3)
    kw = dict(values=zeros, old_values=zeros, returns=zeros, entropy=zeros, mask=mask, clip_range=0.2,
              value_clip_range=0.2, vf_coef=0.0, ent_coef=0.0)
    out = ppo.ppo_loss(logp, old, adv, is_weights=w, **kw)
    # per token max(-A r, -A clip(r)): [-1.2, 2.0, 0.8], [-0.5, -0.5]; times w: [-2.4, 2.0, 0.4], [-0.5, -0.5]
    assert out.policy_loss.item() == pytest.approx((-2.4 + 2.0 + 0.4 - 0.5 - 0.5) / 5, abs=1e-6)
    plain = ppo.ppo_loss(logp, old, adv, **kw)
    assert plain.policy_loss.item() == pytest.approx((-1.2 + 2.0 + 0.8 - 0.5 - 0.5) / 5, abs=1e-6)
    # weights of 1 are the on-policy loss, bit for bit
    ones = ppo.ppo_loss(logp, old, adv, is_weights=torch.ones(2, 3), **kw)
    assert torch.equal(ones.loss, plain.loss)


def test_labels_land_on_the_reward_models_scale():
    m = ppo.RunningMoments()
    m.update(torch.tensor([1.0, 3.0, 5.0]))  # mean 3, std 2
    got = ppo.label_scores(torch.tensor([1.0, 0.0, 0.5]), m, scale=1.5)
    torch.testing.assert_close(got, torch.tensor([6.0, 0.0, 3.0], dtype=torch.float64))
    torch.testing.assert_close(m.standardize(got), torch.tensor([1.5, -1.5, 0.0], dtype=torch.float64))


# ---------------------------------------------------------------- what a run reads
@pytest.fixture(scope="module")
def tok(tiny_base):
    return served.load_tokenizer(tiny_base)


def test_served_answers_are_filtered_and_counted_by_reason(tiny_base_cfg, tok, tmp_path):
    cfg = tiny_base_cfg(tmp_path / "ws", policy=dict(max_new_tokens=16, offpolicy_pool=4, offpolicy_max_staleness=2))
    train_p = train_prompts()
    held = next(p for p in shipped_prompts() + [f"what is a {w}?" for w in "abcdefghijklmnopqrstuvwxyz"]
                if is_heldout(p))
    answer = " the sun is warm and good."
    long_answer = " the sun" * 20
    cases = [  # (response id, prompt, version, sampling, user, extra) oldest first
        ("stale", train_p[0], "v2", None, "user-1", {}),           # 5 - 2 = 3 versions behind > 2
        ("base-stale", train_p[1], None, None, "user-1", {}),      # the base: version 0
        ("hot", train_p[2], "v3", Sampling(temperature=0.7), "user-1", {}),
        ("nucleus", train_p[2], "v3", Sampling(top_p=0.9), "user-1", {}),
        ("topk", train_p[2], "v3", Sampling(top_k=5), "user-1", {}),
        ("penalty", train_p[2], "v3", Sampling(presence_penalty=0.5), "user-1", {}),
        ("heldout", held, "v3", None, "user-1", {}),
        ("nolp", train_p[3], "v3", None, "user-1", {"logprobs": False}),
        ("eval", train_p[3], "v3", None, "eval-7-1", {}),
        ("long", train_p[3], "v4", None, "user-1", {"completion": long_answer}),
        ("weird", train_p[3], "exp-12", None, "user-1", {}),
        ("ok-old", train_p[4], "v3", Sampling(temperature=1.0, top_p=1.0, top_k=-1, max_tokens=16, seed=3),
         "user-2", {"up": True}),
        ("ok-rated", train_p[5], "v6", None, "user-3", {"rating": 4}),  # newer than the start: kept
        ("ok-new", train_p[6], "policy-v4", None, "user-4", {}),
    ]
    events = []
    for i, (rid, prompt, version, sampling, user, extra) in enumerate(cases):
        ts = T0 + timedelta(minutes=i)
        events.append(served_response(tok, prompt, extra.get("completion", answer), response_id=rid, ts=ts,
                                      user_id=user, adapter_version=version, sampling=sampling,
                                      logprobs=extra.get("logprobs", True), logprob=-0.5))
        events.append(rating(rid, extra["rating"], ts, user) if "rating" in extra else thumb(rid, extra.get("up", False), ts, user))
    events.append(served_response(tok, train_p[7], answer, response_id="unlabelled", ts=T0, user_id="user-1",
                                  adapter_version="v5"))
    SimulatedLog(cfg.events_dir).append(events)

    samples, drops = served.read_served(cfg, start_version=5, tok=tok)
    assert [s.response_id for s in samples] == ["ok-new", "ok-rated", "ok-old"]  # newest first
    assert dict(drops) == {"stale": 2, "sampling": 4, "heldout_prompt": 1, "no_logprobs": 1, "eval_user": 1,
                           "too_long": 1, "unknown_version": 1}
    ok_new, ok_rated, ok_old = samples
    assert (ok_new.version, ok_rated.version, ok_old.version) == (4, 6, 3)
    assert ok_rated.label == pytest.approx(0.75) and ok_new.label == 0.0 and ok_old.label == 1.0
    assert ok_new.token_ids == served_response(tok, train_p[6], answer, response_id="x", ts=T0).completion_token_ids
    assert ok_new.logprobs == [-0.5] * len(ok_new.token_ids)

    # counted along the run's line instead: v2 is the start's parent (1 back, v3 and v4 were published
    # in between), the base 3 generations back; v3, not on the line, by version number (2 back)
    samples, drops = served.read_served(cfg, start_version=5, tok=tok, generations={5: 0, 2: 1, 0: 3})
    assert [s.response_id for s in samples] == ["ok-new", "ok-rated", "ok-old", "stale"]
    assert drops["stale"] == 1 and drops["sampling"] == 4

    # a run's start reads the pool and the served answers through one connection (policy.prompts.event_log):
    # the same rows, in either order, and the connection stays open for the caller, which closes it
    alone = traffic_prompts(cfg, 50)[0]
    with event_log(cfg) as con:
        shared = served.read_served(cfg, start_version=5, tok=tok, generations={5: 0, 2: 1, 0: 3}, con=con)
        assert [s.response_id for s in shared[0]] == ["ok-new", "ok-rated", "ok-old", "stale"]
        assert shared[1] == drops
        assert traffic_prompts(cfg, 50, con)[0] == alone and len(alone) == 9
    with pytest.raises(duckdb.ConnectionException):
        con.sql("SELECT 1")
    with event_log(cfg, needed=False) as none:
        assert none is None

    # the pool keeps the newest: with room for 2, the 12 older answers are not even looked at
    small = cfg.model_copy(update={"policy": cfg.policy.model_copy(update={"offpolicy_pool": 2})})
    samples, drops = served.read_served(small, start_version=5, tok=tok)
    assert [s.response_id for s in samples] == ["ok-new", "ok-rated"] and dict(drops) == {"over_pool": 12}

    # a rollout batch in the sampler's layout: served tokens right after the left-padded prompt
    ro = served.ServedPool(samples, seed=0).batch(step=0, size=8)
    assert ro.input_ids.shape[0] == 2 and torch.isnan(ro.scores).all()
    for i in range(2):
        s = next(x for x in samples if x.completion == ro.completions[i] and x.prompt == ro.prompts[i])
        n = len(s.token_ids)
        assert ro.input_ids[i, ro.prompt_len:ro.prompt_len + n].tolist() == s.token_ids
        assert ro.input_ids[i, ro.prompt_len - len(s.prompt_ids):ro.prompt_len].tolist() == s.prompt_ids
        assert ro.response_mask[i].sum() == n and ro.behaviour_logprobs[i, :n].tolist() == s.logprobs


def test_comparisons_and_corrections_label_served_answers(tiny_base_cfg, tok, tmp_path):
    cfg = tiny_base_cfg(tmp_path / "ws", policy=dict(max_new_tokens=16))
    p = train_prompts()
    answers = {"a": " the sun is warm.", "b": " the sun is good.", "c": " a dog runs.", "d": " a cat sits.",
               "e": " the sea is blue.", "f": " the tree is tall.", "g": " a bird sings.", "h": " the day ends."}
    events = [served_response(tok, p[i], text, response_id=rid, ts=T0 + timedelta(minutes=i), user_id=f"user-{i}",
                              adapter_version="v2")
              for i, (rid, text) in enumerate(answers.items())]
    at = T0 + timedelta(hours=1)
    events += [
        PreferenceEvent(ts=at, user_id="user-0", chosen_response_id="a", rejected_response_id="b"),
        # a changed mind replaces the first vote on the same pair: c over d stands
        PreferenceEvent(ts=at, user_id="user-2", chosen_response_id="d", rejected_response_id="c"),
        PreferenceEvent(ts=at + timedelta(seconds=5), user_id="user-2", chosen_response_id="c",
                        rejected_response_id="d"),
        CorrectionEvent(ts=at, user_id="user-4", response_id="e", corrected=" the sea is great."),
        thumb("e", True, at, "user-4"),  # thumbs up and corrected: the mean of 1 and 0
        # a pair of texts names no served answer: nothing to sample
        PreferenceEvent(ts=at, user_id="user-5", prompt=p[5], chosen_text=" yes.", rejected_text=" no."),
        PreferenceEvent(ts=at, user_id="eval-1", chosen_response_id="g", rejected_response_id="h"),
    ]
    SimulatedLog(cfg.events_dir).append(events)

    labels = {s.response_id: s.label for s in served.read_served(cfg, start_version=2, tok=tok)[0]}
    assert labels == {"a": 1.0, "b": 0.0, "c": 1.0, "d": 0.0, "e": 0.5}  # f: unlabelled; g, h: an eval user's pair

    # policy.offpolicy_kinds picks the labels that count
    only = cfg.model_copy(update={"policy": cfg.policy.model_copy(update={"offpolicy_kinds": ["thumbs", "correction"]})})
    assert {s.response_id: s.label for s in served.read_served(only, start_version=2, tok=tok)[0]} == {"e": 0.5}
    only = cfg.model_copy(update={"policy": cfg.policy.model_copy(update={"offpolicy_kinds": ["thumbs"]})})
    assert {s.response_id: s.label for s in served.read_served(only, start_version=2, tok=tok)[0]} == {"e": 1.0}
    none = cfg.model_copy(update={"policy": cfg.policy.model_copy(update={"offpolicy_kinds": []})})
    assert "offpolicy_kinds" in served.offpolicy_disabled(none) and served.load_pool(none, 2) == []
    with pytest.raises(ValueError, match="offpolicy_kinds"):
        load_config(environ={}, workspace=tmp_path / "bad", policy=dict(offpolicy_kinds=["thumbs", "stars"]))


def test_offpolicy_is_off_unless_the_logprobs_match_the_run(tiny_base_cfg, tok, tmp_path):
    cfg = tiny_base_cfg(tmp_path / "ws", policy=dict(temperature=0.8))
    write_labelled_answers(cfg.events_dir, tok, 4)
    assert "temperature" in served.offpolicy_disabled(cfg)
    assert served.load_pool(cfg, 0) == []
    off = cfg.model_copy(update={"policy": cfg.policy.model_copy(update={"temperature": 1.0, "offpolicy": False})})
    assert served.load_pool(off, 0) == []
    on = off.model_copy(update={"policy": off.policy.model_copy(update={"offpolicy": True})})
    assert len(served.load_pool(on, 0)) == 4


# ---------------------------------------------------------------- the learner
RUN = dict(rollout_batch_size=8, minibatch_size=4, max_new_tokens=8, ppo_epochs=1, steps=2, checkpoint_every=2,
           recent_prompts=0, offpolicy_samples=4)


def test_served_answers_join_the_batch_and_the_switch_turns_them_off(tiny_base, tok, tmp_path):
    # offpolicy off with served answers in the log == the on-policy run (no log): same stats, same weights
    ran = {}
    for name, log_, on in (("off", True, False), ("on-policy", False, True), ("with-served", True, True)):
        cfg = load_config(environ={}, workspace=tmp_path / name, model={"base_path": str(tiny_base)},
                          policy=dict(RUN, offpolicy=on))
        if log_:
            write_labelled_answers(cfg.events_dir, tok, 12)
        seen = []
        train(cfg, scorer=CheerfulScorer(), use_ray=False, resume=False, publish=False,
              on_step=lambda step, stats, backend, seen=seen: seen.append((dict(stats), backend.learner.lora_state())))
        ran[name] = seen
        # the run keeps the served answers it started with (a resumed run trains on the same ones)
        (run_dir,) = runs_root(cfg.state_dir).iterdir()
        assert len(served.read_pool(run_dir)) == (12 if log_ and on else 0)

    timing = {"learn_s", "rollout_s", "score_s", "rollout_wall_s", "learn_wall_s", "step_s", "tokens_per_s"}
    for (a, wa), (b, wb) in zip(ran["off"], ran["on-policy"]):
        same = [json.dumps({k: v for k, v in x.items() if k not in timing | {"offpolicy_samples"}}, sort_keys=True)
                for x in (a, b)]  # exact float reprs, NaN included
        assert same[0] == same[1]
        assert "offpolicy_is_weight_mean" not in a and b["offpolicy_samples"] == 0
        for k in wa:
            assert torch.equal(wa[k], wb[k]), k

    for stats, _ in ran["with-served"]:
        assert stats["offpolicy_samples"] == 4
        assert 0 < stats["offpolicy_is_weight_mean"] <= 2.0 and 0 <= stats["offpolicy_truncated_fraction"] <= 1
        assert all(torch.isfinite(torch.tensor(stats[k])) for k in ("policy_loss", "value_loss", "kl", "grad_norm"))
    # the rollouts' figures describe the rollouts only: step 0 samples the same batch either way
    assert ran["with-served"][0][0]["reward_mean"] == ran["on-policy"][0][0]["reward_mean"]
    assert ran["with-served"][0][0]["tokens"] > ran["on-policy"][0][0]["tokens"]  # and trains on more
    # the served answers changed what was learned
    w_on, w_served = ran["on-policy"][-1][1], ran["with-served"][-1][1]
    assert any(not torch.equal(w_on[k], w_served[k]) for k in w_on)
