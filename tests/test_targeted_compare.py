"""Targeted comparisons (``looprl_compare``, looprl.serving.compare): a second candidate comes back
when the reward ensemble's members disagree, within a per-hour budget, and is logged as its own
answer (by the server, or by the gateway when it owns the log); a confident or single-head reward
model, or an empty budget, gives plain answers. The reward model is a stand-in object with
``score_members`` (it is a dependency); the decisions are the real code's."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from prometheus_client import REGISTRY

from looprl.ops.core.listen import HttpThread
from looprl.serving.app import create_app
from looprl.serving.attribution import ResponseRecorder
from looprl.serving.compare import Budget, Comparer, first_better_share
from looprl.serving.gateway import Gateway, GatewayServer
from looprl.serving.routing import ROUTING_FILE, RoutingFile, bucket

from fixtures_serving import CapturingLogger

MSGS = [{"role": "user", "content": "tell me about the river and the park"}]
BODY = {"model": "base", "messages": MSGS, "max_tokens": 6, "ignore_eos": True, "temperature": 1.5, "seed": 3}
SPLIT = [[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.5, 1.5]]  # two members for each candidate
SURE = [[2.0, 0.0], [1.0, 0.5], [3.0, 1.0], [0.7, 0.1]]  # every member prefers the first


class Ensemble:
    """Stands in for a reward model with an ensemble of heads: fixed (K, 2) member scores."""

    def __init__(self, members):
        self.members = torch.tensor(members)
        self.calls: list[tuple[list, list[str]]] = []

    def score_members(self, prompts, completions) -> torch.Tensor:
        self.calls.append((list(prompts), list(completions)))
        return self.members


class SingleHead:
    """A reward model without an ensemble: no uncertainty to go by."""

    def __init__(self):
        self.calls = 0

    def score(self, prompts, completions) -> torch.Tensor:
        self.calls += 1
        return torch.zeros(len(prompts))


def _metric(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture(scope="module")
def srv(serving_server):
    return serving_server


@pytest.fixture
def submitted(srv, monkeypatch):
    """How many generations each request queued (the answer, plus a candidate if one was generated)."""
    engine, counts = srv.service.engine, []
    real = engine.submit_many

    def spy(prompt_ids, params, adapter, sinks):
        counts.append(len(params))
        return real(prompt_ids, params, adapter, sinks)

    monkeypatch.setattr(engine, "submit_many", spy)
    return counts


@pytest.fixture
def serve(srv):
    """An app with the given comparer over the module's engine (its own logger), on a free port."""
    started = []

    def make(comparer, compare="never", log=True, **app):
        logger = CapturingLogger() if log else None
        th = HttpThread(create_app(srv.service, response_logger=logger, comparer=comparer, compare=compare,
                                   default_max_tokens=16, **app), name="compare-test", lifespan="off").start()
        started.append(th)
        return th.url, logger

    yield make
    for th in started:
        th.stop()


def _sse(raw: bytes) -> list[dict]:
    return [json.loads(e[len(b"data: "):]) for e in raw.split(b"\n\n") if e.startswith(b"data: {")]


# ---------------------------------------------------------------------- decisions
def test_share_of_members_preferring_the_first_candidate():
    assert first_better_share(torch.tensor(SPLIT)) == 0.5
    assert first_better_share(torch.tensor(SURE)) == 1.0
    assert first_better_share(torch.tensor([[1.0, 1.0], [0.0, 1.0]])) == 0.25  # a tie counts half
    with pytest.raises(ValueError, match="score_members must give"):
        first_better_share(torch.zeros(3))


def test_the_budget_caps_comparisons_per_hour():
    now = [0.0]
    comparer = Comparer(scorer=Ensemble(SPLIT), per_hour=60, clock=lambda: now[0])
    outcomes = []
    for _ in range(3600):  # one uncertain request a second for an hour
        outcomes.append(comparer.decide("q", "a", "b").outcome)
        now[0] += 1.0
    assert set(outcomes) == {"asked", "over_budget"}
    assert 60 <= outcomes.count("asked") <= 61  # the rate, plus the one the bucket starts with
    assert outcomes[:2] == ["asked", "over_budget"] and outcomes[60] == "asked"  # one a minute, evenly
    none = Comparer(scorer=Ensemble(SPLIT), per_hour=0, clock=lambda: now[0])
    assert none.decide("q", "a", "b").outcome == "over_budget"
    bucket = Budget(10, burst=3, clock=lambda: now[0])
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]


def test_confident_identical_and_single_head_never_ask():
    assert Comparer(scorer=Ensemble(SURE)).decide("q", "a", "b").outcome == "confident"
    assert Comparer(scorer=Ensemble([[0.0, 2.0]] * 4)).decide("q", "a", "b").outcome == "confident"
    assert Comparer(scorer=Ensemble(SPLIT)).decide("q", "a", "a").outcome == "identical"
    head = SingleHead()
    assert Comparer(scorer=head).decide("q", "a", "b").outcome == "no_ensemble" and head.calls == 0
    loose = Comparer(scorer=Ensemble([[1.0, 0.0]] * 3 + [[0.0, 1.0]]), max_confidence=0.8)
    assert loose.decide("q", "a", "b").ask  # 0.75 of the members: within 0.8


def test_the_newest_reward_model_is_loaded_and_a_bad_one_keeps_the_previous():
    pointer = {"v": None}
    loaded = []

    def load(version):
        loaded.append(version)
        if version == "v3":
            raise OSError("checksum mismatch")
        return Ensemble(SPLIT if version == "v1" else SURE)

    comparer = Comparer(latest=lambda: pointer["v"], load=load, reload_seconds=3600)
    assert comparer.decide("q", "a", "b").outcome == "no_reward_model"
    comparer.refresh()
    assert loaded == [] and comparer.version is None
    pointer["v"] = "v1"
    comparer.refresh()
    comparer.refresh()  # same pointer: not loaded again
    assert loaded == ["v1"] and comparer.decide("q", "a", "b").ask
    pointer["v"] = "v2"
    comparer.refresh()
    assert comparer.version == "v2" and comparer.decide("q", "a", "b").outcome == "confident"
    pointer["v"] = "v3"
    comparer.refresh()
    assert comparer.version == "v2" and loaded == ["v1", "v2", "v3"]


# ---------------------------------------------------------------------- the server
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_an_uncertain_ensemble_gets_a_second_candidate_logged_as_its_own_answer(serve, stream):
    scorer = Ensemble(SPLIT)
    url, logger = serve(Comparer(scorer=scorer))
    before = _metric("looprl_serving_comparisons_total", outcome="asked")
    r = httpx.post(f"{url}/v1/chat/completions", json={**BODY, "looprl_compare": "auto", "stream": stream},
                   timeout=60)
    assert r.status_code == 200, r.text
    if stream:
        chunks = _sse(r.content)
        rid = chunks[0]["id"]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        (extra,) = [c for c in chunks if "looprl_comparison" in c]
        assert extra["choices"] == [] and chunks[-1] is extra  # after the answer's last chunk
        assert {c["choices"][0]["index"] for c in chunks if c["choices"]} == {0}  # the candidate is not streamed
        comparison = extra["looprl_comparison"]
    else:
        doc = r.json()
        rid, text, comparison = doc["id"], doc["choices"][0]["message"]["content"], doc["looprl_comparison"]
        assert len(doc["choices"]) == 1 and doc["usage"]["completion_tokens"] == 6  # usage: the answer only
    assert comparison["response_id"] != rid and comparison["content"] != text
    assert "token_ids" not in comparison and "logprobs" not in comparison  # not asked
    assert scorer.calls == [([scorer.calls[0][0][0]] * 2, [text, comparison["content"]])]  # one batch of two
    assert _metric("looprl_serving_comparisons_total", outcome="asked") == before + 1
    by_id = {e.response_id: e for e in logger.events}
    assert set(by_id) == {rid, comparison["response_id"]}
    a, b = by_id[rid], by_id[comparison["response_id"]]
    assert (a.completion, b.completion) == (text, comparison["content"])
    assert a.messages == b.messages and a.adapter_version == b.adapter_version and a.model == b.model
    assert (a.sampling.seed, b.sampling.seed) == (3, 4)  # the candidate is choice 1 of the request
    assert len(b.completion_logprobs) == len(b.completion_token_ids) == 6


def test_a_confident_or_single_head_reward_model_gives_a_plain_answer(serve, submitted):
    url, logger = serve(Comparer(scorer=Ensemble(SURE)))
    doc = httpx.post(f"{url}/v1/chat/completions", json={**BODY, "looprl_compare": "auto"}, timeout=60).json()
    assert "looprl_comparison" not in doc and [e.response_id for e in logger.events] == [doc["id"]]

    head = SingleHead()
    url, logger = serve(Comparer(scorer=head))
    doc = httpx.post(f"{url}/v1/chat/completions", json={**BODY, "looprl_compare": "auto"}, timeout=60).json()
    assert "looprl_comparison" not in doc and head.calls == 0
    assert submitted == [2, 1]  # the confident one scored a candidate; no ensemble, no candidate generated


def test_the_config_default_applies_when_the_request_does_not_say(serve):
    url, logger = serve(Comparer(scorer=Ensemble(SPLIT), per_hour=3600), compare="auto")
    assert "looprl_comparison" in httpx.post(f"{url}/v1/chat/completions", json=BODY, timeout=60).json()
    never = httpx.post(f"{url}/v1/chat/completions", json={**BODY, "looprl_compare": "never"}, timeout=60).json()
    assert "looprl_comparison" not in never
    several = httpx.post(f"{url}/v1/chat/completions", json={**BODY, "n": 2}, timeout=60).json()
    assert "looprl_comparison" not in several and len(several["choices"]) == 2  # n > 1: the default does not apply


def test_an_empty_budget_answers_without_generating_a_candidate(serve, submitted):
    now = [0.0]
    url, logger = serve(Comparer(scorer=Ensemble(SPLIT), per_hour=1, clock=lambda: now[0]))
    first = httpx.post(f"{url}/v1/chat/completions", json={**BODY, "looprl_compare": "auto"}, timeout=60).json()
    second = httpx.post(f"{url}/v1/chat/completions", json={**BODY, "looprl_compare": "auto"}, timeout=60).json()
    assert "looprl_comparison" in first and "looprl_comparison" not in second
    assert submitted == [2, 1]  # the budget is empty: no candidate is generated for nothing
    now[0] += 3600.0
    third = httpx.post(f"{url}/v1/chat/completions", json={**BODY, "looprl_compare": "auto"}, timeout=60).json()
    assert "looprl_comparison" in third and submitted == [2, 1, 2]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_through_the_gateway_the_candidate_comes_back_and_is_logged_once(serve, tmp_path, stream):
    url, upstream_log = serve(Comparer(scorer=Ensemble(SPLIT)), log=False)  # behind the gateway: it logs
    (tmp_path / ROUTING_FILE).write_text(json.dumps({"alias": "policy", "primary": None, "canary": None, "share": 0}))
    routing = RoutingFile(tmp_path / ROUTING_FILE, alias="policy", base_name="base", poll_seconds=0.05)
    logger = CapturingLogger()
    gw = GatewayServer(Gateway([url], routing=routing, alias="policy", base_name="base",
                               recorder=ResponseRecorder(logger), health_interval=0.5)).start()
    try:
        r = httpx.post(f"{gw.url}/v1/chat/completions", json={**BODY, "looprl_compare": "auto", "stream": stream},
                       timeout=60)
        assert r.status_code == 200, r.text
        docs = _sse(r.content) if stream else [r.json()]
        (comparison,) = [d["looprl_comparison"] for d in docs if "looprl_comparison" in d]
        # the token ids and log-probs it asked for: stripped
        assert set(comparison) == {"response_id", "content", "looprl_adapter_version"}
        rid = r.headers["x-looprl-response-id"]
        by_id = {e.response_id: e for e in logger.events}
        assert set(by_id) == {rid, comparison["response_id"]} and len(logger.events) == 2
        b = by_id[comparison["response_id"]]
        assert b.completion == comparison["content"] and b.sampling.seed == 4 and b.adapter_version == "base"
        assert len(b.completion_logprobs) == len(b.completion_token_ids) == 6
    finally:
        gw.stop()


# ---------------------------------------------------------------------- "always", across a canary split
@pytest.fixture(scope="module")
def split(srv):
    """The alias ``ab`` split half and half between two adapters: (primary's version, canary's)."""
    primary, canary = srv.adapters.good[:2]
    srv.service.load("ab-primary", srv.registry_path(primary))
    srv.service.load("ab-canary", srv.registry_path(canary))
    srv.service.set_alias("ab", "ab-primary", "ab-canary", 0.5)
    return primary, canary


def _user_on(canary: bool) -> str:
    return next(u for u in (f"user-{i}" for i in range(100)) if (bucket("ab", u) < 0.5) == canary)


@pytest.mark.parametrize("arm", ["canary", "primary"])
def test_always_answers_with_the_other_arms_candidate_beside_the_users_own(serve, split, arm):
    primary, canary = split
    own, other = (canary, primary) if arm == "canary" else (primary, canary)
    url, logger = serve(None)  # "always" needs no reward model
    doc = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                     json={**BODY, "model": "ab", "user": _user_on(arm == "canary"), "looprl_compare": "always"}).json()
    b = doc["looprl_comparison"]
    assert doc["looprl_adapter_version"] == own and b["looprl_adapter_version"] == other
    by_id = {e.response_id: e for e in logger.events}
    assert by_id[doc["choices"][0]["looprl_response_id"]].adapter_version == own
    assert by_id[b["response_id"]].adapter_version == other and by_id[b["response_id"]].completion == b["content"]
    assert len(logger.events) == 2


def test_across_the_split_can_be_turned_off_and_needs_a_split(serve, split):
    primary, canary = split
    url, logger = serve(None, compare_across_canary=False)
    user = _user_on(True)
    doc = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                     json={**BODY, "model": "ab", "user": user, "looprl_compare": "always"}).json()
    assert doc["looprl_adapter_version"] == doc["looprl_comparison"]["looprl_adapter_version"] == canary
    url, logger = serve(None)
    plain = httpx.post(f"{url}/v1/chat/completions", json={**BODY, "looprl_compare": "always"}, timeout=60).json()
    assert plain["looprl_adapter_version"] == plain["looprl_comparison"]["looprl_adapter_version"] == "base"
    assert plain["looprl_comparison"]["content"] != plain["choices"][0]["message"]["content"]  # the next seed
    many = httpx.post(f"{url}/v1/chat/completions", json={**BODY, "n": 2, "looprl_compare": "always"}, timeout=60)
    assert many.status_code == 400 and "needs n = 1" in many.json()["error"]["message"]


def test_through_the_gateway_the_other_arm_answers_the_comparison(serve, split, tmp_path):
    primary, canary = split
    url, _ = serve(None, log=False)
    (tmp_path / ROUTING_FILE).write_text(json.dumps({
        "alias": "policy", "primary": "ab-primary", "primary_version": primary, "canary": "ab-canary",
        "canary_version": canary, "share": 0.5}))
    routing = RoutingFile(tmp_path / ROUTING_FILE, alias="policy", base_name="base", poll_seconds=0.05)
    logger = CapturingLogger()
    gw = GatewayServer(Gateway([url], routing=routing, alias="policy", base_name="base",
                               recorder=ResponseRecorder(logger), health_interval=0.5)).start()
    try:
        for on_canary in (True, False):
            user = next(u for u in (f"user-{i}" for i in range(100)) if (bucket("policy", u) < 0.5) == on_canary)
            doc = httpx.post(f"{gw.url}/v1/chat/completions", timeout=60,
                             json={**BODY, "model": "policy", "user": user, "looprl_compare": "always"}).json()
            own, other = (canary, primary) if on_canary else (primary, canary)
            b = doc["looprl_comparison"]
            assert doc["looprl_adapter_version"] == own and b["looprl_adapter_version"] == other
            by_id = {e.response_id: e for e in logger.events}
            assert by_id[b["response_id"]].adapter_version == other and by_id[doc["id"]].adapter_version == own
    finally:
        gw.stop()
