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
        self.thumbs_calls, self.pref_calls = [], []
        self.sent, self.failed = {}, {}
        self._lock = threading.Lock()

    def thumbs(self, response_id, up, user, use_http):
        with self._lock:
            self.thumbs_calls.append((response_id, up, user, use_http))

    def preference(self, chosen, rejected, user, use_http):
        with self._lock:
            self.pref_calls.append((chosen, rejected, user, use_http))

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
