"""The embedded server over HTTP, driven by the official ``openai`` client and by httpx."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import re
import threading
import time

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from looprl.ops.core.config import ConfigError
from looprl.policy.model import render_prompt
from looprl.serving.app import _BodyLimit, create_app
from looprl.serving.routing import Route, bucket
from looprl.serving.sampling import SamplingParams
from looprl.serving.server import admin_token_of

from fixtures_serving import make_workspace, start_server

PROMPT = "hello world, what a"


@pytest.fixture(scope="module")
def srv(serving_server):
    s = serving_server
    v1, v2 = s.adapters.good[0], s.adapters.good[1]
    for v in (v1, v2):
        r = httpx.post(f"{s.url}/v1/load_lora_adapter", json={"lora_name": f"policy-{v}", "lora_path": s.registry_path(v)},
                       headers=s.admin_headers)
        assert r.status_code == 200, r.text
    r = httpx.post(f"{s.url}/v1/looprl/alias", json={"alias": "policy", "lora_name": f"policy-{v1}"}, headers=s.admin_headers)
    assert r.status_code == 200, r.text
    return s


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_lists_base_adapters_and_alias(client, srv):
    ids = {m.id for m in client.models.list().data}
    v1, v2 = srv.adapters.good[:2]
    assert {"base", "policy", f"policy-{v1}", f"policy-{v2}"} <= ids


def test_completions_plain_and_streamed_agree_and_name_the_version(client, srv):
    v1 = srv.adapters.good[0]
    raw = client.completions.with_raw_response.create(model="policy", prompt=PROMPT, max_tokens=8, temperature=0)
    r = raw.parse()
    assert raw.headers["x-looprl-adapter"] == v1
    assert r.model_extra["looprl_adapter_version"] == v1
    assert r.model == f"policy-{v1}" and r.id.startswith("cmpl-")
    assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0
    chunks = list(client.completions.create(model="policy", prompt=PROMPT, max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    assert {c.model_extra["looprl_adapter_version"] for c in chunks} == {v1}
    direct = client.completions.create(model=f"policy-{v1}", prompt=PROMPT, max_tokens=8, temperature=0)
    base = client.completions.create(model="base", prompt=PROMPT, max_tokens=8, temperature=0)
    assert direct.choices[0].text == r.choices[0].text
    assert base.model_extra["looprl_adapter_version"] == "base"


def test_chat_completions_plain_and_streamed(client, srv):
    msgs = [{"role": "user", "content": "tell me a story"}]
    r = client.chat.completions.create(model="policy", messages=msgs, max_tokens=8, temperature=0, user="alice")
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="policy", messages=msgs, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_prompts_are_rendered_like_the_trainer_renders_them(client, srv):
    text = "how is the weather in the park"
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    tok = srv.service.engine.tokenizer
    want = srv.service.engine.generate(render_prompt(tok, text), greedy).text
    raw = srv.service.engine.generate(text, greedy).text
    comp = client.completions.create(model="base", prompt=text, max_tokens=8, temperature=0)
    chat = client.chat.completions.create(model="base", messages=[{"role": "user", "content": text}],
                                          max_tokens=8, temperature=0)
    assert comp.choices[0].text == chat.choices[0].message.content == want
    assert render_prompt(tok, text) != text and (want != raw or want == "")  # rendering really happened


def test_admin_endpoints_are_never_open_beyond_loopback(srv):
    cfg = srv.cfg
    open_cfg = cfg.model_copy(update={"serving": cfg.serving.model_copy(update={"admin_token": None})})
    assert admin_token_of(open_cfg) is None  # loopback: allowed (with a warning at start)
    public = open_cfg.model_copy(update={"serving": open_cfg.serving.model_copy(update={"host": "0.0.0.0"})})
    with pytest.raises(ConfigError, match="serving.admin_token"):
        admin_token_of(public)


def test_every_answer_is_logged_with_its_id_and_version(client, srv):
    srv.logger.events.clear()
    a = client.completions.create(model="policy", prompt="log me", max_tokens=4, user="u-1")
    b = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "and me"}], max_tokens=4)
    s = list(client.completions.create(model="policy", prompt="stream me", max_tokens=4, stream=True))
    by_id = {e.response_id: e for e in srv.logger.events}
    assert set(by_id) == {a.id, b.id, s[0].id}
    ea, eb, es = by_id[a.id], by_id[b.id], by_id[s[0].id]
    assert (ea.prompt, ea.completion, ea.user_id, ea.model) == ("log me", a.choices[0].text, "u-1", "policy")
    assert ea.adapter_version == srv.adapters.good[0] and eb.adapter_version == "base"
    assert eb.prompt == "and me" and eb.messages[0].content == "and me"
    assert es.completion == "".join(c.choices[0].text for c in s)


def test_serving_survives_a_failing_response_logger(serving_base, serving_adapters, tmp_path):
    class Broken:
        def log(self, event):
            raise ConnectionError("kafka is down")

    s = start_server(make_workspace(tmp_path, serving_adapters), serving_base, serving_adapters, logger=Broken())
    try:
        before = _metric(s.url, "looprl_serving_response_log_failures_total")
        r = httpx.post(f"{s.url}/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
        assert _metric(s.url, "looprl_serving_response_log_failures_total") == before + 1
    finally:
        s.thread.stop()


def test_bad_requests_name_the_field(client, srv):
    with pytest.raises(openai.NotFoundError, match="model 'nope' does not exist"):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="n: must be <= 128"):
        client.completions.create(model="base", prompt="x", n=129)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="base", messages=[{"role": "user", "content": "x"}], temperature=5)
    r = httpx.post(f"{srv.url}/v1/chat/completions", json={"model": "base", "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_admin_requires_the_token(srv):
    body = {"lora_name": "x", "lora_path": srv.registry_path(srv.adapters.good[2])}
    assert httpx.post(f"{srv.url}/v1/load_lora_adapter", json=body).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert httpx.post(f"{srv.url}/v1/load_lora_adapter", json=body, headers=wrong).status_code == 401
    assert httpx.get(f"{srv.url}/v1/looprl/state").status_code == 401


@pytest.mark.parametrize("case,status,message", [
    ("traversal", 403, "outside the registry root"),
    ("absolute", 403, "outside the registry root"),
    ("not_version", 400, "not a published registry version"),
    ("too_large", 400, "max_lora_rank"),
    ("incompatible", 400, "missing_proj"),
    ("tampered", 400, "checksum mismatch"),
    ("bad_name", 400, "lora_name"),
    ("alias_name", 400, "reserved"),
])
def test_bad_adapters_are_refused_and_serving_is_unchanged(srv, client, case, status, message):
    a = srv.adapters
    paths = {
        "traversal": "policy/../../..", "absolute": "/etc", "not_version": "policy",
        "too_large": srv.registry_path(a.too_large), "incompatible": srv.registry_path(a.incompatible),
        "tampered": srv.registry_path(a.tampered),
        "bad_name": srv.registry_path(a.good[2]), "alias_name": srv.registry_path(a.good[2]),
    }
    name = {"bad_name": "../x", "alias_name": "policy"}.get(case, f"bad-{case}")
    state0 = httpx.get(f"{srv.url}/v1/looprl/state", headers=srv.admin_headers).json()
    failures0 = _metric(srv.url, "looprl_serving_adapter_load_failures_total")
    r = httpx.post(f"{srv.url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": paths[case]},
                   headers=srv.admin_headers)
    assert r.status_code == status and message in r.json()["error"]["message"], r.text
    state1 = httpx.get(f"{srv.url}/v1/looprl/state", headers=srv.admin_headers).json()
    assert state1["adapters"] == state0["adapters"] and state1["aliases"] == state0["aliases"]
    assert _metric(srv.url, "looprl_serving_adapter_load_failures_total") == failures0 + 1
    ok = client.completions.create(model="policy", prompt="still fine", max_tokens=3)
    assert ok.model_extra["looprl_adapter_version"] == a.good[0]


def test_unloading_an_aliased_adapter_is_refused(srv):
    v1 = srv.adapters.good[0]
    r = httpx.post(f"{srv.url}/v1/unload_lora_adapter", json={"lora_name": f"policy-{v1}"}, headers=srv.admin_headers)
    assert r.status_code == 409 and "in use by alias 'policy'" in r.json()["error"]["message"]
    r = httpx.post(f"{srv.url}/v1/unload_lora_adapter", json={"lora_name": "never-loaded"}, headers=srv.admin_headers)
    assert r.status_code == 404


def test_canary_split_is_sticky_per_user_and_near_the_share(srv):
    v1, v2 = srv.adapters.good[:2]
    r = httpx.post(f"{srv.url}/v1/looprl/alias", headers=srv.admin_headers,
                   json={"alias": "policy", "lora_name": f"policy-{v1}", "canary": {"lora_name": f"policy-{v2}", "share": 0.3}})
    assert r.status_code == 200, r.text
    try:
        users = [f"user-{i}" for i in range(40)]

        def version(user):
            r = httpx.post(f"{srv.url}/v1/completions", timeout=60,
                           json={"model": "policy", "prompt": "hi", "max_tokens": 1, "user": user})
            return r.headers["x-looprl-adapter"]

        with cf.ThreadPoolExecutor(8) as ex:
            first = list(ex.map(version, users))
            again = list(ex.map(version, users))
        assert first == again  # sticky
        expected = [v2 if bucket("policy", u) < 0.3 else v1 for u in users]
        assert first == expected
        assert 4 <= first.count(v2) <= 20
        assert Route(f"policy-{v1}", f"policy-{v2}", 0.3).choose("policy", "user-0")[0] == f"policy-{expected[0]}"
    finally:
        httpx.post(f"{srv.url}/v1/looprl/alias", headers=srv.admin_headers, json={"alias": "policy", "lora_name": f"policy-{v1}"})


def test_concurrent_requests_are_batched(srv):
    count0, sum0 = _metric(srv.url, "looprl_serving_batch_size_count"), _metric(srv.url, "looprl_serving_batch_size_sum")

    def one(i):
        r = httpx.post(f"{srv.url}/v1/completions", timeout=60,
                       json={"model": "policy", "prompt": f"request {i}", "max_tokens": 12, "temperature": 0})
        return r.status_code

    with cf.ThreadPoolExecutor(16) as ex:
        assert set(ex.map(one, range(16))) == {200}
    steps = _metric(srv.url, "looprl_serving_batch_size_count") - count0
    rows = _metric(srv.url, "looprl_serving_batch_size_sum") - sum0
    assert rows / steps > 2.0  # several sequences per decode step, not one at a time


def test_metrics_cover_requests_latency_tokens_adapters(srv, client):
    client.completions.create(model="policy", prompt="m", max_tokens=2)
    text = httpx.get(f"{srv.url}/metrics").text
    for name in ("looprl_serving_requests_total", "looprl_serving_request_seconds_bucket",
                 "looprl_serving_time_to_first_token_seconds_bucket", "looprl_serving_generated_tokens_total",
                 "looprl_serving_batch_size_bucket", "looprl_serving_loaded_adapters",
                 'looprl_serving_active_version{alias="policy",role="primary"}', "looprl_serving_adapter_swaps_total"):
        assert name in text, name
    v1 = int(srv.adapters.good[0][1:])
    assert _metric(srv.url, 'looprl_serving_active_version{alias="policy",role="primary"}') == v1


def test_metrics_is_prometheus_text_at_exactly_its_path_and_counted(srv):
    name = 'looprl_serving_requests_total{endpoint="metrics",status="200"}'
    before = _metric(srv.url, name)
    r = httpx.get(f"{srv.url}/metrics")
    assert r.status_code == 200 and not r.history  # served at /metrics itself, not by a redirect
    assert r.headers["content-type"].startswith("text/plain; version=")
    assert "# TYPE looprl_serving_requests_total counter" in r.text
    assert _metric(srv.url, name) == before + 2  # every scrape passes through the request metrics


def test_settings_come_from_the_app_not_the_routes(srv):
    """Routes are module-level: a second app over the same service answers with its own settings."""
    other = TestClient(create_app(srv.service, admin_token="other-token", default_max_tokens=2))
    r = other.post("/v1/completions", json={"model": "base", "prompt": "hi", "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    assert r.headers["x-looprl-adapter"] == "base"
    assert other.get("/v1/looprl/state", headers=srv.admin_headers).status_code == 401
    assert other.get("/v1/looprl/state", headers={"Authorization": "Bearer other-token"}).status_code == 200
    r = httpx.post(f"{srv.url}/v1/completions", json={"model": "base", "prompt": "hi", "ignore_eos": True})
    assert r.json()["usage"]["completion_tokens"] == srv.cfg.serving.default_max_tokens != 2


def test_sampled_streams_with_stop_strings_match_the_plain_answer(client):
    msgs = [{"role": "user", "content": "tell me about the river"}]
    for seed in (1, 2, 3):
        kw = dict(model="base", messages=msgs, max_tokens=24, temperature=1.5, seed=seed, extra_body={"ignore_eos": True})
        full = client.chat.completions.create(**kw).choices[0].message.content
        stop = full[len(full) // 2:len(full) // 2 + 2]
        plain = client.chat.completions.create(**kw, stop=[stop])
        chunks = list(client.chat.completions.create(**kw, stop=[stop], stream=True))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert plain.choices[0].finish_reason == chunks[-1].choices[0].finish_reason == "stop"
        assert streamed == plain.choices[0].message.content == full[: full.index(stop)]


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    total = 0.0
    pat = re.compile(rf"^{re.escape(name)}(\{{[^}}]*\}})? ([0-9.e+-]+)$") if "{" not in name else \
        re.compile(rf"^{re.escape(name)} ([0-9.e+-]+)$")
    for line in text.splitlines():
        mm = pat.match(line)
        if mm:
            total += float(mm.groups()[-1])
    return total


def test_client_disconnect_mid_stream_stops_generation_and_releases_the_adapter(srv):
    v1 = srv.adapters.good[0]
    engine = srv.service.engine
    tokens0 = _metric(srv.url, "looprl_serving_generated_tokens_total")
    with httpx.Client(base_url=srv.url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json={"model": "policy", "prompt": "go on", "max_tokens": 200,
                                                          "ignore_eos": True, "stream": True}) as r:
            assert r.status_code == 200
            next(r.iter_lines())  # first chunk arrived: the request is running
            assert engine.resolve(f"policy-{v1}").in_flight >= 1
        # leaving the block closed the connection
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (engine.resolve(f"policy-{v1}").in_flight or engine.stats()["running"]):
        time.sleep(0.05)
    assert engine.resolve(f"policy-{v1}").in_flight == 0 and engine.stats()["running"] == 0
    assert _metric(srv.url, "looprl_serving_generated_tokens_total") - tokens0 < 150  # stopped early, not at 200


@pytest.mark.parametrize("path,field,value", [
    ("/v1/completions", "seed", 2**64),  # torch raised on it after the adapter's in-flight count went up
    ("/v1/completions", "seed", -(2**63) - 1),
    ("/v1/completions", "max_tokens", 2**40),
    ("/v1/completions", "temperature", float("nan")),
    ("/v1/completions", "top_p", float("inf")),
    ("/v1/completions", "stop", ["x" * 257]),
    ("/v1/chat/completions", "max_completion_tokens", 2**40),
    ("/v1/chat/completions", "seed", 2**70),
    ("/v1/completions", "frequency_penalty", float("nan")),
    ("/v1/completions", "top_k", 2**40),
    ("/v1/chat/completions", "top_k", -2),
    ("/v1/completions", "logit_bias", {"1": float("inf")}),
    ("/v1/chat/completions", "n", 10**6),
])
def test_every_number_a_client_sends_is_bounded(srv, path, field, value):
    v1 = srv.adapters.good[0]
    body = {"model": f"policy-{v1}", "max_tokens": 2, "temperature": 1.0, field: value,
            **({"prompt": "x"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]})}
    # json.dumps writes NaN and Infinity (httpx refuses to), and the server's JSON parser reads them.
    r = httpx.post(f"{srv.url}{path}", content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    assert srv.service.engine.resolve(f"policy-{v1}").in_flight == 0


def test_the_seed_range_ends_are_served(srv):
    for seed in (-(2**63), 2**63 - 1):
        r = httpx.post(f"{srv.url}/v1/completions", timeout=60,
                       json={"model": "base", "prompt": "x", "max_tokens": 2, "temperature": 1.0, "seed": seed})
        assert r.status_code == 200, r.text
    r = httpx.post(f"{srv.url}/v1/unload_lora_adapter", json={"lora_name": "x", "lora_int_id": -1},
                   headers=srv.admin_headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_int_id"


def test_models_name_versions_never_paths(srv):
    data = httpx.get(f"{srv.url}/v1/models").json()["data"]
    text = json.dumps(data)
    for path in (srv.cfg.workspace, srv.cfg.registry_dir, srv.cfg.model.base_path):
        assert str(path) not in text
    by_id = {d["id"]: d for d in data}
    v1 = srv.adapters.good[0]
    assert by_id["base"]["root"] == "base" and by_id["base"]["parent"] is None
    # What the controller reads of a vLLM-style list (adapters: "parent" set) stays as it was.
    assert by_id[f"policy-{v1}"]["root"] == v1 and by_id[f"policy-{v1}"]["parent"] == "base"
    assert by_id["policy"]["root"] == f"policy-{v1}"
    # The admin state keeps the paths, for operators.
    state = httpx.get(f"{srv.url}/v1/looprl/state", headers=srv.admin_headers).json()
    assert any(a["path"] == str(srv.cfg.registry_dir / "policy" / v1) for a in state["adapters"])


def test_bodies_and_prompts_over_the_limits_are_refused_before_parsing_or_tokenizing(srv, monkeypatch):
    engine = srv.service.engine
    import looprl.serving.app as app_module

    encoded: list = []
    real = app_module.render_prompt_ids
    monkeypatch.setattr(app_module, "render_prompt_ids", lambda tok, chat: encoded.append(chat) or real(tok, chat))
    monkeypatch.setattr(engine, "encode", lambda text: encoded.append(text) or pytest.fail("prompt not rendered"))
    c = TestClient(create_app(srv.service, max_body_bytes=4096, max_prompt_chars=100))
    too_large = 'looprl_serving_request_errors_total{endpoint="completions",reason="too_large"}'
    before = _metric(srv.url, too_large)

    r = c.post("/v1/completions", content=b'{"model": "base", "prompt": "' + b"x" * 5000 + b'"}',
               headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large", r.text
    assert "over the limit of 4096 bytes" in r.json()["error"]["message"]
    assert _metric(srv.url, too_large) == before + 1

    r = c.post("/v1/completions", json={"model": "base", "prompt": "x" * 101, "max_tokens": 1})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "prompt" and "101 characters" in err["message"]
    msgs = [{"role": "system", "content": "s" * 60}, {"role": "user", "content": "u" * 41}]
    r = c.post("/v1/chat/completions", json={"model": "base", "messages": msgs, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert encoded == []  # refused before any tokenizing

    r = c.post("/v1/completions", json={"model": "base", "prompt": "x" * 100, "max_tokens": 1})
    assert r.status_code == 200 and len(encoded) == 1  # at the cap: served


def _asgi_run(app, chunks: list[bytes], headers: list[tuple[bytes, bytes]] = ()) -> tuple[list[dict], int]:
    """Run one POST through an ASGI app with its body in ``chunks``; (messages sent, chunks read)."""
    read = [0]

    async def receive():
        if read[0] < len(chunks):
            read[0] += 1
            return {"type": "http.request", "body": chunks[read[0] - 1], "more_body": read[0] < len(chunks)}
        return {"type": "http.disconnect"}

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": list(headers),
             "query_string": b"", "asgi": {"version": "3.0"}, "http_version": "1.1", "scheme": "http",
             "server": ("test", 80), "client": ("test", 1), "root_path": ""}
    asyncio.run(app(scope, receive, send))
    return sent, read[0]


def test_a_chunked_body_is_cut_off_at_the_limit():
    got: list = []

    async def app(scope, receive, send):
        got.append(await receive())
        got.append(await receive())  # later reads pass through (a streaming response waits on them)

    sent, read = _asgi_run(_BodyLimit(app, 4096), [b"x" * 1000] * 10)  # no Content-Length: chunked
    assert not got and read == 5  # stopped reading as soon as the body passed the limit
    assert sent[0]["status"] == 413 and b"too_large" in sent[1]["body"]

    sent, read = _asgi_run(_BodyLimit(app, 4096), [b"a" * 1000, b"b" * 1000])
    assert got == [{"type": "http.request", "body": b"a" * 1000 + b"b" * 1000, "more_body": False},
                   {"type": "http.disconnect"}] and sent == []


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_tokenizing_never_blocks_the_event_loop(srv, monkeypatch, path):
    import looprl.serving.app as app_module

    real, started = app_module.render_prompt_ids, threading.Event()

    def slow(tok, chat):  # a prompt that takes long to render and tokenize (a 4 MB prompt took 2.4 s)
        started.set()
        time.sleep(1.5)
        return real(tok, chat)

    monkeypatch.setattr(app_module, "render_prompt_ids", slow)
    body = {"model": "base", "max_tokens": 1,
            **({"prompt": "x"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]})}
    with cf.ThreadPoolExecutor(1) as ex:
        answer = ex.submit(httpx.post, f"{srv.url}{path}", json=body, timeout=60)
        assert started.wait(10)
        t0 = time.perf_counter()
        assert httpx.get(f"{srv.url}/health", timeout=10).status_code == 200
        assert time.perf_counter() - t0 < 0.5  # answered while the prompt is being tokenized
        assert answer.result().status_code == 200
