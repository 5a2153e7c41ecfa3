"""The product simulator against a real embedded server: OpenAI client traffic attributed by
adapter version, feedback drawn from a pluggable hidden preference, eval traffic on held-out
prompts that sends no feedback."""

from __future__ import annotations

import json
import threading

import pytest

from looprl.ops.sim.preference import load_preference


def likes_the(prompt: str, completion: str) -> float:
    """A user who always likes answers containing 'the' (used through --preference)."""
    return 1.0 if " the " in f" {completion} " else 0.0


class RecordingChannels:
    """Stands in for FeedbackChannels (SDK + HTTP collector)."""

    def __init__(self):
        self.thumbs_calls, self.pref_calls, self.correction_calls = [], [], []
        self.sent, self.failed = {}, {}
        self._lock = threading.Lock()

    def thumbs(self, response_id, up, user, use_http):
        with self._lock:
            self.thumbs_calls.append((response_id, up, user, use_http))
        return True

    def preference(self, chosen, rejected, user, use_http):
        with self._lock:
            self.pref_calls.append((chosen, rejected, user, use_http))
        return True

    def correction(self, response_id, corrected, user, use_http):
        with self._lock:
            self.correction_calls.append((response_id, corrected, user, use_http))
        return True

    def flush(self):
        pass

    def close(self):
        pass


@pytest.fixture(scope="module")
def server(tiny_base, tmp_path_factory):
    import torch

    from fixtures_serving import CapturingLogger
    from looprl.ops.core.config import load_config
    from looprl.serving.server import ServerThread, build_service

    torch.set_num_threads(1)
    ws = tmp_path_factory.mktemp("sim-ws")
    cfg = load_config(environ={}, workspace=ws, model={"base_path": str(tiny_base)},
                      serving={"torch_threads": 1, "max_batch_size": 8})
    logger = CapturingLogger()
    th = ServerThread(build_service(cfg), admin_token=None, response_logger=logger,
                      default_max_tokens=cfg.serving.default_max_tokens).start()
    yield th.url, logger
    th.stop()


def run_sim(tmp_path, url, preference, **demo):
    from looprl.ops.core.config import load_config
    from looprl.ops.sim.records import read_interactions, read_status
    from looprl.ops.sim.simulator import Simulator

    cfg = load_config(environ={}, workspace=tmp_path / "ws",
                      demo={"users": 3, "max_requests_per_second": 30, "max_tokens": 8, **demo})
    ch = RecordingChannels()
    sim = Simulator(cfg, url, preference, ch, seed=1)
    stop = threading.Event()
    sim.run(stop, duration_s=6)
    sim.close()
    return cfg, sim, ch, read_interactions(cfg), read_status(cfg)


def test_simulated_users_use_the_openai_api_and_follow_the_hidden_preference(tmp_path, server):
    url, logger = server
    pref = load_preference("test_demo_simulator:likes_the")  # pluggable, like `--preference`
    cfg, sim, ch, rows, status = run_sim(tmp_path, url, pref, eval_fraction=0.3, preference_fraction=0.3,
                                         collector_fraction=0.5, thumbs_fraction=1.0)
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert len(train) >= 10 and len(evals) >= 3
    # every answer came from the server and is attributed to the version that produced it
    assert {r["version"] for r in rows} == {"base"}
    logged = {e.response_id: e for e in logger.events}
    # train users get feedback from the hidden preference (deterministic here: 1 iff 'the')
    assert len(ch.thumbs_calls) == len(train)
    for rid, up, user, _ in ch.thumbs_calls:
        event = logged[rid]
        assert event.user_id == user and user.startswith("user-")
        assert up == (" the " in f" {event.completion} ")
    assert {http for *_, http in ch.thumbs_calls} == {True, False}  # both SDK and HTTP collector used
    # pairwise preferences compare two answers to the same prompt, preferring the liked one
    assert ch.pref_calls
    for chosen, rejected, user, _ in ch.pref_calls:
        c, r = logged[chosen], logged[rejected]
        assert c.prompt == r.prompt and c.user_id == r.user_id == user
        assert likes_the(c.prompt, c.completion) >= likes_the(r.prompt, r.completion)
    assert status["train_requests"] == len(train) and status["eval_requests"] == len(evals)


def test_eval_traffic_is_held_out_and_sends_no_feedback(tmp_path, server):
    from looprl.ops.core.chat import Chat
    from looprl.ops.sim.simulator import prompt_sets
    from looprl.policy.prompts import is_heldout

    url, logger = server
    cfg, sim, ch, rows, _ = run_sim(tmp_path, url, lambda p, c: 0.5, eval_fraction=0.5, preference_fraction=0.0,
                                    base_eval_fraction=0.5)
    train_prompts, eval_prompts = prompt_sets(cfg)
    assert not set(train_prompts) & set(eval_prompts)
    assert all(is_heldout(p) for p in eval_prompts)  # PPO's sampler never draws them
    evals = [r for r in rows if r["kind"] == "eval"]
    assert evals and all(r["user"].startswith(cfg.demo.eval_user_prefix) for r in evals)
    assert all(Chat.user(r["prompt"]) in eval_prompts for r in evals)
    assert {r["model"] for r in evals} == {cfg.serving.alias, cfg.serving.served_model_name}
    eval_ids = {e.response_id for e in logger.events if (e.user_id or "").startswith(cfg.demo.eval_user_prefix)}
    assert eval_ids and not eval_ids & {rid for rid, *_ in ch.thumbs_calls}
    assert all(not u.startswith("eval-") for *_, u, _ in ch.thumbs_calls)
    # the hidden probability is recorded with each eval answer
    assert all(r["p"] == 0.5 for r in evals)


def test_status_is_written_for_the_live_view(tmp_path, server):
    url, _ = server
    cfg, sim, ch, rows, status = run_sim(tmp_path, url, lambda p, c: 1.0, eval_fraction=0.0, preference_fraction=0.0,
                                         thumbs_fraction=0.5)
    by = status["by_version"]["train"]["base"]
    assert by["n"] == len(rows) and by["ups"] == len(rows) and by["p_mean"] == 1.0
    # about half the users clicked a thumb (thumbs_fraction=0.5)
    assert 0.25 * len(rows) < len(ch.thumbs_calls) < 0.75 * len(rows)
    assert json.loads((cfg.state_dir / "simulator/status.json").read_text())["train_requests"] == len(rows)
    # every request to the serving tier is counted, as its users see it (one per interaction here)
    assert status["serving_requests"] == len(rows) and status.get("serving_failed", 0) == 0


def test_requests_the_serving_tier_did_not_answer_are_counted_as_failed(tmp_path):
    from looprl.ops.supervisor import free_port

    port = free_port()  # nothing listens there
    cfg, sim, ch, rows, status = run_sim(tmp_path, f"http://127.0.0.1:{port}", lambda p, c: 1.0)
    assert rows == [] and status["serving_failed"] == status["serving_requests"] >= 3
    assert status["errors"] >= 3  # failed interactions, each after the client's own retries


def test_bad_preference_spec_names_the_spec():
    with pytest.raises(ValueError, match="nope:missing"):
        load_preference("nope:missing")


def test_collector_feedback_is_retried_on_5xx_with_the_same_event_and_not_on_4xx(tmp_path):
    import httpx

    from looprl.ingest.schema import ThumbsEvent, parse_event
    from looprl.ops.core.config import load_config
    from looprl.ops.sim.simulator import FeedbackChannels

    answers, bodies = [503, 502, 202, 400], []

    def collector(request: httpx.Request) -> httpx.Response:
        bodies.append(request.content)
        return httpx.Response(answers[len(bodies) - 1], text="no")

    ch = FeedbackChannels(load_config(environ={}, workspace=tmp_path / "ws"), None, "http://collector")
    ch.http = httpx.Client(transport=httpx.MockTransport(collector))
    ch.thumbs("r1", True, "user-1", use_http=True)  # two restarts of the collector, then accepted
    assert len(bodies) == 3 and len(set(bodies)) == 1  # the same event (same event_id) every time
    assert isinstance(parse_event(bodies[0]), ThumbsEvent) and ch.sent["thumbs"] == 1
    ch.thumbs("r2", False, "user-1", use_http=True)  # refused: the event's fault, not retried
    assert len(bodies) == 4 and ch.sent["thumbs"] == 1 and ch.failed["thumbs"] == 1
    ch.close()


# --------------------------------------------------------------------------- feedback profiles
def topic_mentions(prompt: str, completion: str) -> float:
    """A prompt-dependent user: likes answers that keep naming the question's topic."""
    from looprl.ops.sim.corpus import TOPICS

    topic = next(w for w in reversed(prompt.split()) if w in TOPICS)
    return min(1.0, completion.replace(".", " ").split().count(topic) / 3)


class StubServing:
    """An OpenAI-compatible chat endpoint (httpx transport) answering from a script: each answer is
    (content, comparison) where comparison is None or (response id, content) of a second candidate."""

    def __init__(self, answers):
        self.answers, self.requests = list(answers), []

    def __call__(self, request):
        import httpx

        body = json.loads(request.content)
        self.requests.append(body)
        content, comparison = self.answers[(len(self.requests) - 1) % len(self.answers)]
        out = {"id": f"resp-{len(self.requests)}", "object": "chat.completion", "created": 0, "model": body["model"],
               "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                            "finish_reason": "stop"}],
               "looprl_adapter_version": "v1"}
        if comparison is not None:
            out["looprl_comparison"] = {"response_id": comparison[0], "content": comparison[1]}
        return httpx.Response(200, json=out)


def stub_simulator(tmp_path, preference, answers, environ=None, **demo):
    import httpx
    from openai import OpenAI

    from looprl.ops.core.config import load_config
    from looprl.ops.sim.simulator import Simulator

    cfg = load_config(environ=environ or {}, workspace=tmp_path / "ws", demo=demo)
    stub, ch = StubServing(answers), RecordingChannels()
    sim = Simulator(cfg, "http://stub", preference, ch, seed=3)
    sim.client = OpenAI(base_url="http://stub/v1", api_key="x", max_retries=0,
                        http_client=httpx.Client(transport=httpx.MockTransport(stub)))
    return sim, stub, ch


def test_corrections_keep_the_users_favourite_of_the_candidates_and_only_when_it_beats_the_answer(
        tmp_path, monkeypatch):
    from looprl.ops.sim import simulator

    drafts = iter(["the dog is old.", "the dog saw the dog near the dog.", "a cat sits.", "the dog runs."] * 100)
    topics = []

    def candidate(rng, topic):
        topics.append(topic)
        return next(drafts)

    monkeypatch.setattr(simulator, "topic_answer", candidate)
    # served answers: one the user barely likes, one they already like most (nothing to correct)
    sim, _, ch = stub_simulator(tmp_path, topic_mentions, [(" it was calm.", None), (" dog dog dog.", None)],
                                thumbs_fraction=0.0, preference_fraction=0.0, correction_fraction=1.0,
                                correction_candidates=4)
    sim.train_prompts = [simulator.Chat.user("tell me about the dog")]
    sim._train(0)
    sim._train(1)
    sim.close()
    assert topics == ["dog"] * 8  # each correcting user wrote 4 drafts on the question's topic
    # the best draft, where the served answer started (after one space), for the first answer only
    assert [(rid, text) for rid, text, *_ in ch.correction_calls] == [("resp-1", " the dog saw the dog near the dog.")]
    rows = [json.loads(line) for line in (sim.out_dir / "interactions.jsonl").read_text().splitlines()]
    assert [r["labels"] for r in rows] == [{"correction": 1}, {}]


def test_sparse_users_correct_answers_into_ones_their_preference_scores_higher(tmp_path):
    from looprl.ops.sim.corpus import TOPICS, TRAIN_TEMPLATES

    served = [(" it was grey.", None), (" the sky was dark.", None), (" a man walks to the park.", None)]
    sim, stub, ch = stub_simulator(tmp_path, topic_mentions, served, feedback="sparse",
                                   environ={"LOOPRL_DEMO__CORRECTION_FRACTION": "0.5"})
    assert (sim.d.thumbs_fraction, sim.d.preference_fraction, sim.d.correction_fraction) == (0.05, 0.05, 0.5)
    for i in range(60):
        sim._train(i % 8)
    sim.close()
    assert 15 <= len(ch.correction_calls) <= 45  # about half the answers (correction_fraction from the env)
    by_id = {f"resp-{i + 1}": body for i, body in enumerate(stub.requests)}
    for rid, corrected, user, _ in ch.correction_calls:
        question = by_id[rid]["messages"][-1]["content"]
        assert any(question == t.format(t=topic) for t in TRAIN_TEMPLATES for topic in TOPICS)
        served_text = served[(int(rid.split("-")[1]) - 1) % len(served)][0]
        assert topic_mentions(question, corrected) > topic_mentions(question, served_text)
        assert corrected.startswith(" ") and not corrected.startswith("  ")
    # sparse: no targeted comparisons; a comparison asked for on its 5% share, else nothing
    assert {body.get("looprl_compare") for body in stub.requests} <= {None, "always"}


def test_targeted_users_answer_the_comparisons_serving_offers(tmp_path):
    answers = [(" it was calm.", ("cmp-1", " the dog and the dog.")),  # the second candidate is better
               (" dog dog dog.", ("cmp-2", " it was calm.")),  # the served one is better
               (" it was calm.", ("cmp-3", " it was wet.")),  # the user likes both the same: not asked
               (" it was calm.", None)]  # serving did not ask
    sim, stub, ch = stub_simulator(tmp_path, topic_mentions, answers, feedback="targeted", thumbs_fraction=0.0,
                                   correction_fraction=0.0)
    sim.train_prompts = [sim.train_prompts[0]]  # "... the dog"
    for i in range(4):
        sim._train(i)
    status = sim.status()
    sim.close()
    assert all(body.get("looprl_compare") == "auto" for body in stub.requests) and len(stub.requests) == 4
    assert [(c, r) for c, r, *_ in ch.pref_calls] == [("cmp-1", "resp-1"), ("resp-2", "cmp-2")]
    assert status["comparisons_offered"] == 3 and status["pairs"] == 2
    assert status["feedback"]["profile"] == "targeted" and status["feedback"]["comparisons_per_hour"] > 0
    rows = [json.loads(line) for line in (sim.out_dir / "interactions.jsonl").read_text().splitlines()]
    assert [r["labels"] for r in rows] == [{"preference": 1}, {"preference": 1}, {}, {}]


def test_users_who_compare_ask_for_two_answers_in_one_request(tmp_path):
    """A comparison is asked for (looprl_compare "always"): the second answer comes in the same
    response (from the canary's other arm, while one runs); a serving tier that sends none gets a
    second request, as a "regenerate" click would."""
    answers = [(" it was calm.", ("cmp-1", " the dog and the dog.")),  # the second answer is better
               (" dog dog dog.", None),  # no second answer: regenerate...
               (" it was calm.", None)]  # ... which is this one, worse
    sim, stub, ch = stub_simulator(tmp_path, topic_mentions, answers, thumbs_fraction=0.0, preference_fraction=1.0)
    sim.train_prompts = [sim.train_prompts[0]]  # "... the dog"
    sim._train(0)
    sim._train(1)
    status = sim.status()
    sim.close()
    assert [body.get("looprl_compare") for body in stub.requests] == ["always", "always", None]
    assert [(c, r) for c, r, *_ in ch.pref_calls] == [("cmp-1", "resp-1"), ("resp-2", "resp-3")]
    assert status["pairs"] == 2 and status.get("comparisons_offered", 0) == 0  # asked for, not offered


def test_channels_send_corrections_to_the_collector(tmp_path):
    import httpx

    from looprl.ingest.schema import CorrectionEvent, parse_event
    from looprl.ops.core.config import load_config
    from looprl.ops.sim.simulator import FeedbackChannels

    bodies = []
    ch = FeedbackChannels(load_config(environ={}, workspace=tmp_path / "ws"), None, "http://collector")
    ch.http = httpx.Client(transport=httpx.MockTransport(lambda r: bodies.append(r.content) or httpx.Response(202)))
    assert ch.correction("r1", " the dog is kind.", "user-1", use_http=True)
    event = parse_event(bodies[0])
    assert isinstance(event, CorrectionEvent) and event.response_id == "r1" and event.corrected == " the dog is kind."
    assert ch.sent["correction"] == 1
    ch.close()


def test_each_simulator_draws_its_own_users_unless_demo_seed_is_set(tmp_path):
    from looprl.ops.core.config import load_config
    from looprl.ops.sim.simulator import Simulator

    def draws(**demo):
        cfg = load_config(environ={}, workspace=tmp_path / "ws", demo=demo)
        sim = Simulator(cfg, "http://stub", likes_the, RecordingChannels())
        out = (sim.status()["seed"], [sim._random() for _ in range(8)],
               [sim._choice(sim.eval_prompts) for _ in range(8)])
        sim.close()
        return out

    # the default: two starts are two samples of users (one fixed seed made every fresh demo's eval
    # arms flip the same coins); the seed each drew is in its status, for the report
    (seed_a, coins_a, asks_a), (seed_b, coins_b, asks_b) = draws(), draws()
    assert seed_a != seed_b and coins_a != coins_b and asks_a != asks_b
    # a configured seed replays the draws, and so does the one a run reported
    assert draws(seed=7) == draws(seed=7) and draws(seed=7)[0] == 7
    assert draws(seed=seed_a)[1:] == (coins_a, asks_a)
