"""Log-probs of the embedded server (OpenAI's ``logprobs`` / ``top_logprobs``) and of the response
log: every served token's raw log-prob (log_softmax of the model's logits at temperature 1, before
sampling knobs) equals a plain forward pass over prompt + completion, for chat and completions,
streamed and not; refused combinations get OpenAI-shaped 400s; the log always holds the log-probs
and the effective sampling; through the gateway a client gets log-probs only if it asked."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

from looprl.ops.core.chat import Chat
from looprl.policy.model import render_prompt_ids
from looprl.serving.attribution import ResponseRecorder
from looprl.serving.gateway import Gateway, GatewayServer
from looprl.serving.routing import ROUTING_FILE, RoutingFile

from fixtures_serving import CapturingLogger

MSGS = [{"role": "user", "content": "tell me about the river and the park"}]
PROMPT = "the cat sat on the mat and the"
# Sampling knobs on: the reported log-probs must still be the model's raw ones.
KNOBS = {"temperature": 1.4, "top_k": 30, "presence_penalty": 0.5, "seed": 7, "max_tokens": 8, "ignore_eos": True}


@pytest.fixture(scope="module")
def srv(serving_server):
    return serving_server


def _reference(srv, prompt_ids: list[int], ids: list[int]) -> torch.Tensor:
    """log_softmax of one forward over prompt + completion: row k predicts completion token k."""
    engine = srv.service.engine
    x = torch.tensor([prompt_ids + ids], device=engine.device)
    with engine._model_lock, torch.no_grad():  # the engine's forwards hold this lock too
        engine._activate(None)
        logits = engine.model(input_ids=x).logits[0].float().cpu()
    return torch.log_softmax(logits[len(prompt_ids) - 1: len(prompt_ids) - 1 + len(ids)], dim=-1)


def _sse(raw: bytes) -> list[dict]:
    out = []
    for ev in raw.split(b"\n\n"):
        if ev.startswith(b"data: {"):
            out.append(json.loads(ev[len(b"data: "):]))
    return out


def _chat(srv, stream: bool, **extra) -> tuple[list[int], list[dict], dict]:
    """(token ids, logprobs content entries, the whole answer or the merged stream) of a chat answer."""
    body = {"model": "base", "messages": MSGS, "return_token_ids": True, "stream": stream, **KNOBS, **extra}
    r = httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    if not stream:
        doc = r.json()
        choice = doc["choices"][0]
        return choice["token_ids"], (choice["logprobs"] or {}).get("content"), doc
    chunks = _sse(r.content)
    ids = next(c["choices"][0]["token_ids"] for c in chunks if c["choices"] and "token_ids" in c["choices"][0])
    content = [e for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
               for e in c["choices"][0]["logprobs"]["content"]]
    return ids, content, {"id": chunks[0]["id"], "chunks": chunks}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_chat_logprobs_are_the_models_raw_logprobs_at_the_served_tokens(srv, stream):
    ids, content, doc = _chat(srv, stream, logprobs=True, top_logprobs=5)
    tok = srv.service.engine.tokenizer
    ref = _reference(srv, render_prompt_ids(tok, Chat.user(MSGS[0]["content"])), ids)
    assert len(content) == len(ids) == KNOBS["max_tokens"]
    got = torch.tensor([e["logprob"] for e in content])
    want = ref.gather(1, torch.tensor(ids).unsqueeze(1)).squeeze(1)
    assert torch.allclose(got, want, atol=1e-4), (got, want)
    # the temperature-1.4 distribution would differ: these are the raw log-probs, not the sampler's
    assert not torch.allclose(got, torch.log_softmax(_reference_logits_scaled(ref, 1.4), -1).gather(
        1, torch.tensor(ids).unsqueeze(1)).squeeze(1), atol=1e-3)
    for k, e in enumerate(content):
        assert e["token"] == tok.decode([ids[k]]) and e["bytes"] == list(e["token"].encode())
        tops = e["top_logprobs"]
        values = [t["logprob"] for t in tops]
        assert len(tops) == 5 and values == sorted(values, reverse=True)
        assert values == pytest.approx(ref[k].topk(5).values.tolist(), abs=1e-4)
        if ids[k] == int(ref[k].argmax()):  # the sampled token is the most likely: it heads the list
            assert tops[0]["token"] == e["token"] and tops[0]["logprob"] == pytest.approx(e["logprob"])
    event = next(e for e in srv.logger.events if e.response_id == doc["id"])
    assert event.completion_token_ids == ids
    assert event.completion_logprobs == pytest.approx(want.tolist(), abs=1e-4)


def _reference_logits_scaled(ref: torch.Tensor, temperature: float) -> torch.Tensor:
    return ref / temperature  # log-probs are logits up to a per-row constant


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_completion_logprobs_have_the_legacy_shape_and_values(srv, stream):
    body = {"model": "base", "prompt": PROMPT, "logprobs": 3, "return_token_ids": True, "stream": stream, **KNOBS}
    r = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    if stream:
        chunks = _sse(r.content)
        ids = next(c["choices"][0]["token_ids"] for c in chunks if c["choices"] and "token_ids" in c["choices"][0])
        parts = [c["choices"][0]["logprobs"] for c in chunks if c["choices"] and c["choices"][0]["logprobs"]]
        lp = {k: [x for p in parts for x in p[k]] for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
        rid = chunks[0]["id"]
    else:
        doc = r.json()
        ids, lp, rid = doc["choices"][0]["token_ids"], doc["choices"][0]["logprobs"], doc["id"]
    tok = srv.service.engine.tokenizer
    ref = _reference(srv, render_prompt_ids(tok, Chat.user(PROMPT)), ids)
    want = ref.gather(1, torch.tensor(ids).unsqueeze(1)).squeeze(1)
    assert lp["token_logprobs"] == pytest.approx(want.tolist(), abs=1e-4)
    assert lp["tokens"] == [tok.decode([i]) for i in ids]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:k]) for k in range(len(ids))]
    for k, alts in enumerate(lp["top_logprobs"]):  # the 3 most likely, plus the sampled token
        assert 3 <= len(alts) <= 4 and alts[lp["tokens"][k]] == pytest.approx(lp["token_logprobs"][k])
        best = sorted(alts.values(), reverse=True)[:3]
        assert best == pytest.approx(ref[k].topk(3).values.tolist(), abs=1e-4)
    event = next(e for e in srv.logger.events if e.response_id == rid)
    assert event.completion_logprobs == pytest.approx(want.tolist(), abs=1e-4)


def test_unasked_logprobs_are_not_returned_but_always_logged_with_the_effective_sampling(srv):
    body = {"model": "base", "messages": MSGS, "max_tokens": 5, "ignore_eos": True}
    doc = httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=60).json()
    assert doc["choices"][0]["logprobs"] is None
    event = next(e for e in srv.logger.events if e.response_id == doc["id"])
    assert len(event.completion_logprobs) == len(event.completion_token_ids) == 5
    assert all(x <= 0 for x in event.completion_logprobs)
    s = event.sampling  # nothing sent: the server's defaults, written out
    assert (s.temperature, s.top_p, s.top_k, s.presence_penalty, s.frequency_penalty, s.seed, s.max_tokens) == \
        (1.0, 1.0, None, 0.0, 0.0, None, 5)
    # top_logprobs 0 with logprobs: the entries carry an empty list, as OpenAI's do
    ids, content, _ = _chat(srv, False, logprobs=True, top_logprobs=0)
    assert len(content) == len(ids) and all(e["top_logprobs"] == [] for e in content)


@pytest.mark.parametrize("path,body,param", [
    ("/v1/chat/completions", {"messages": MSGS, "top_logprobs": 3}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": MSGS, "logprobs": False, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": MSGS, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"messages": MSGS, "logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ("/v1/completions", {"prompt": PROMPT, "logprobs": 6}, "logprobs"),
    ("/v1/chat/completions", {"messages": MSGS, "looprl_compare": "auto", "n": 2}, "looprl_compare"),
    ("/v1/chat/completions", {"messages": MSGS, "looprl_compare": "sometimes"}, "looprl_compare"),
    ("/v1/completions", {"prompt": PROMPT, "looprl_compare": "auto"}, "looprl_compare"),
])
def test_refused_combinations_get_openai_shaped_400s(srv, path, body, param):
    r = httpx.post(f"{srv.url}{path}", json={"model": "base", "max_tokens": 1, **body}, timeout=60)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == param and err["type"] == "invalid_request_error", r.text
    assert param in err["message"]


def test_the_openai_client_reads_the_logprobs(srv):
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=60)
    r = client.chat.completions.create(model="base", messages=MSGS, max_tokens=4, logprobs=True, top_logprobs=2,
                                       extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 4 and all(len(c.top_logprobs) == 2 for c in content)
    with pytest.raises(openai.BadRequestError, match="logprobs must be set to true") as e:
        client.chat.completions.create(model="base", messages=MSGS, max_tokens=1, top_logprobs=2)
    assert e.value.param == "top_logprobs"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_through_the_gateway_the_log_has_logprobs_the_client_did_not_ask_for(srv, tmp_path, stream):
    (tmp_path / ROUTING_FILE).write_text(json.dumps({"alias": "policy", "primary": None, "canary": None, "share": 0}))
    routing = RoutingFile(tmp_path / ROUTING_FILE, alias="policy", base_name="base", poll_seconds=0.05)
    logger = CapturingLogger()
    gw = GatewayServer(Gateway([srv.url], routing=routing, alias="policy", base_name="base",
                               recorder=ResponseRecorder(logger), health_interval=0.5)).start()
    try:
        body = {"model": "base", "messages": MSGS, "max_tokens": 6, "ignore_eos": True, "stream": stream}
        r = httpx.post(f"{gw.url}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        choices = [c for doc in (_sse(r.content) if stream else [r.json()]) for c in doc["choices"]]
        assert choices and all(c["logprobs"] is None and "token_ids" not in c for c in choices)
        rid = r.headers["x-looprl-response-id"]
        (logged,) = [e for e in logger.events if e.response_id == rid]
        served = next(e for e in srv.logger.events if e.response_id == rid)  # the server's own log
        assert len(logged.completion_logprobs) == len(logged.completion_token_ids) == 6
        assert logged.completion_token_ids == served.completion_token_ids
        assert logged.completion_logprobs == pytest.approx(served.completion_logprobs, abs=1e-6)

        asked = httpx.post(f"{gw.url}/v1/chat/completions", json={**body, "logprobs": True, "top_logprobs": 1},
                           timeout=60)
        entries = [e for doc in (_sse(asked.content) if stream else [asked.json()]) for c in doc["choices"]
                   if c["logprobs"] for e in c["logprobs"]["content"]]
        assert len(entries) == 6 and all(len(e["top_logprobs"]) == 1 for e in entries)
    finally:
        gw.stop()
