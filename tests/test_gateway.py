"""`looprl gateway` (looprl.serving.gateway) in front of stub upstreams, the real embedded server
and a real Kafka: event-for-event SSE passthrough, failover, mid-stream failure, canary routing from
the controller's routing file, response logging through a Kafka outage, auth, the openai client."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter

import httpx
import openai
import pytest
from prometheus_client import REGISTRY

from looprl.ingest.broker import EmbeddedBroker, free_port
from looprl.ingest.schema import parse_event
from looprl.ops.core.config import load_config
from looprl.serving.attribution import ResponseRecorder
from looprl.serving.controller import AdapterController
from looprl.serving.gateway import Gateway, GatewayServer, build_gateway, kafka_recorder
from looprl.serving.routing import ROUTING_FILE, RoutingFile
from looprl.storage.registry import Registry

from fixtures_serving import CapturingLogger, make_workspace, serving_config, start_server
from releases_testing import publish_version
from upstream_stub import StubUpstream

CHAT = {"model": "policy", "messages": [{"role": "user", "content": "hi"}]}


def _routing(tmp_path, primary="policy-v3", canary=None, share=0.0) -> RoutingFile:
    doc = {"alias": "policy", "primary": primary, "primary_version": primary.split("-")[-1], "canary": canary,
           "canary_version": canary.split("-")[-1] if canary else None, "share": share}
    (tmp_path / ROUTING_FILE).write_text(json.dumps(doc))
    return RoutingFile(tmp_path / ROUTING_FILE, alias="policy", base_name="base", poll_seconds=0.05)


def _gateway(upstreams, routing, *, recorder=None, **kw) -> GatewayServer:
    kw.setdefault("health_interval", 0.2)
    kw.setdefault("request_token_ids", False)
    return GatewayServer(Gateway([u.url for u in upstreams], routing=routing, alias="policy", base_name="base",
                                 recorder=recorder, **kw)).start()


def _metric(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _events(raw: bytes) -> list[bytes]:
    return [e for e in raw.split(b"\n\n") if e]


@pytest.fixture
def stubs():
    started: list[StubUpstream] = []

    def make(**kw) -> StubUpstream:
        s = StubUpstream(**kw).start()
        started.append(s)
        return s

    yield make
    for s in started:
        s.stop()


# ---------------------------------------------------------------- streaming
@pytest.mark.parametrize("looprl_upstream", [True, False], ids=["looprl-upstream", "vllm-upstream"])
def test_sse_passes_through_event_for_event_as_it_arrives(stubs, tmp_path, looprl_upstream):
    up = stubs(looprl=looprl_upstream, version="v3")
    with _gateway([up], _routing(tmp_path)) as gw:
        body = {**CHAT, "stream": True, "user": "u1"}
        direct = httpx.post(f"{up.url}/v1/chat/completions", json={**body, "model": "policy-v3"}).content

        up.gate = threading.Event()  # the upstream holds the stream after its first token
        received: list[bytes] = []
        with httpx.stream("POST", f"{gw.url}/v1/chat/completions", json=body, timeout=30) as r:
            assert r.headers["x-looprl-adapter"] == "v3" and r.headers["x-looprl-response-id"] == "chatcmpl-u1"
            chunks = r.iter_raw()
            while len(_events(b"".join(received))) < 2:  # the role chunk and the first token, held upstream
                received.append(next(chunks))
            assert not up.gate.is_set()
            up.gate.set()
            received.extend(chunks)
    through = _events(b"".join(received))
    assert len(through) == len(_events(direct)) == 7 and through[-1] == b"data: [DONE]"
    if looprl_upstream:  # the upstream already names the version: nothing changes, byte for byte
        assert through == _events(direct)
    else:  # vLLM: the version field is added to every chunk, the rest is unchanged
        for ours, theirs in zip(through[:-1], _events(direct)[:-1]):
            obj = json.loads(ours[len(b"data: "):])
            assert obj.pop("looprl_adapter_version") == "v3"
            assert obj == json.loads(theirs[len(b"data: "):])


def test_an_upstream_dying_mid_stream_ends_the_stream_with_an_error_event(stubs, tmp_path):
    up = stubs()
    up.die_after = 3  # role chunk + 2 tokens, then the connection drops
    logger = CapturingLogger()
    with _gateway([up], _routing(tmp_path), recorder=ResponseRecorder(logger)) as gw:
        before = _metric("looprl_gateway_errors_total", upstream=up.url, adapter_version="v3", reason="upstream_died")
        r = httpx.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "stream": True, "user": "u-dies"}, timeout=30)
        events = _events(r.content)
        assert r.status_code == 200 and len(events) == 4
        err = json.loads(events[-1][len(b"data: "):])["error"]
        assert err["code"] == "upstream_disconnected" and err["type"] == "server_error"
        assert _metric("looprl_gateway_errors_total", upstream=up.url, adapter_version="v3",
                       reason="upstream_died") == before + 1
        assert logger.events == []  # an incomplete answer is not logged as an answer

        # the official client surfaces it as an API error, not as a truncated answer
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIError, match="failed mid-stream"):
            for _ in client.chat.completions.create(model="policy", messages=CHAT["messages"], stream=True):
                pass


def test_a_dead_upstream_is_skipped_and_the_second_takes_new_requests(stubs, tmp_path):
    a, b = stubs(), stubs()
    # no health check during the test: the requests themselves find `a` dead
    with _gateway([a, b], _routing(tmp_path), health_interval=60) as gw:
        for i in range(4):  # both in rotation
            assert httpx.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "user": f"w{i}"}).status_code == 200
        assert len(a.bodies) == len(b.bodies) == 2
        a.stop()
        retried = _metric("looprl_gateway_retries_total", upstream=b.url)
        answers = [httpx.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "user": f"x{i}", "stream": i % 2 == 0})
                   for i in range(8)]
        assert [r.status_code for r in answers] == [200] * 8 and len(b.bodies) == 10
        assert all(r.content.endswith(b"data: [DONE]\n\n") for r in answers[::2])
        # the first request sent to `a` found it dead and moved on; from then on `a` is marked down
        assert _metric("looprl_gateway_retries_total", upstream=b.url) == retried + 1
        health = httpx.get(f"{gw.url}/health").json()
        assert health["upstreams"][a.url]["healthy"] is False and health["upstreams"][b.url]["healthy"] is True
        b.status = 503  # the last replica overloaded: an OpenAI error, not a hang
        r = httpx.post(f"{gw.url}/v1/chat/completions", json=CHAT)
        assert r.status_code == 503 and r.json()["error"]["code"] == "upstream_unavailable"


def test_a_replica_without_the_routed_version_hands_the_request_to_one_that_has_it(stubs, tmp_path):
    """A replica that just restarted answers 404 for `policy-vN` until the controller reloads it:
    the alias's requests go to another replica; with none left, the 404 itself is the answer."""
    fresh, loaded = stubs(), stubs()
    fresh.status = 404
    with _gateway([fresh, loaded], _routing(tmp_path)) as gw:
        answers = [httpx.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "user": f"r{i}"}) for i in range(4)]
        assert [r.status_code for r in answers] == [200] * 4 and len(loaded.bodies) == 4
        assert {r.headers["x-looprl-adapter"] for r in answers} == {"v3"}
        loaded.status = 404
        r = httpx.post(f"{gw.url}/v1/chat/completions", json=CHAT)
        assert r.status_code == 404 and r.json()["error"]["message"] == "stub refuses"


# ---------------------------------------------------------------- routing
def test_canary_split_from_the_controllers_routing_file_is_sticky_and_near_the_share(stubs, tmp_path):
    ws = tmp_path / "ws"
    reg = Registry(ws / "registry")
    v1, v2 = publish_version(reg, tmp_path), publish_version(reg, tmp_path)
    reg.set_pointer("policy", "promoted", v1)
    reg.set_pointer("policy", "canary", v2)
    cfg = load_config(environ={}, workspace=ws, canary={"traffic_share": 0.2},
                      gateway={"routing_poll_seconds": 0.05, "health_interval_seconds": 0.2,
                               "request_token_ids": False})
    up = stubs()  # vLLM-like: no alias API; the controller only loads, its routing file is the contract
    assert AdapterController(cfg, endpoints=[up.url]).reconcile().converged
    assert set(up.loaded) == {f"policy-{v1}", f"policy-{v2}"}
    gw = GatewayServer(build_gateway(cfg, recorder=None, upstreams=[up.url], seed=0)).start()
    try:
        async def served(users: list[str]) -> list[str]:
            async with httpx.AsyncClient(base_url=gw.url, timeout=30) as c:
                sem = asyncio.Semaphore(32)

                async def one(u: str) -> str:
                    async with sem:
                        r = await c.post("/v1/completions", json={"model": "policy", "prompt": "p", "user": u})
                        assert r.json()["model"] == f"policy-{r.headers['x-looprl-adapter']}"
                        return r.headers["x-looprl-adapter"]

                return await asyncio.gather(*(one(u) for u in users))

        users = [f"user-{i}" for i in range(2000)]
        first = asyncio.run(served(users))
        share = Counter(first)[v2] / len(users)
        assert set(first) == {v1, v2} and abs(share - 0.2) <= 0.05, share
        again = asyncio.run(served(users[:300]))
        assert again == first[:300]  # sticky: the same user, the same side
    finally:
        gw.stop()


# ---------------------------------------------------------------- logging and Kafka
class _FlakyKafka:
    """A ResponseLogger stand-in whose deliveries fail until ``up``: like librdkafka, ``log``
    enqueues at once and the failure comes back later through ``on_error``."""

    def __init__(self) -> None:
        self.on_error = None
        self.up = False
        self.delivered: list = []
        self.inflight: list = []

    @property
    def pending(self) -> int:
        return len(self.inflight)

    def log(self, event) -> None:
        self.inflight.append(event)

    def settle(self) -> None:
        events, self.inflight = self.inflight, []
        for e in events:
            self.delivered.append(e) if self.up else self.on_error(e, ConnectionError("broker down"))


def test_undelivered_answers_are_sent_again_within_the_bound():
    kafka = _FlakyKafka()
    rec = ResponseRecorder(kafka, max_buffered=3, retry_seconds=0.05)
    from looprl.serving.attribution import response_event

    events = [response_event(response_id=f"r{i}", model="policy", completion="c", version="v1", prompt="p")
              for i in range(5)]
    assert [rec.record(e) for e in events] == [True, True, True, False, False]  # 3 in flight, 2 over the bound
    kafka.settle()  # all 3 fail: back into the buffer, retried later
    assert rec.pending == 3 and rec.dropped == 2 and not kafka.delivered
    kafka.up = True
    deadline = time.monotonic() + 10
    while len(kafka.delivered) < 3 and time.monotonic() < deadline:
        kafka.settle()
        time.sleep(0.02)
    assert sorted(e.response_id for e in kafka.delivered) == ["r0", "r1", "r2"] and rec.pending == 0
    rec.close()


def test_kafka_down_answers_still_flow_logs_wait_then_arrive(stubs, tmp_path):
    """Kafka is down when the gateway starts: every request is answered at once, the answers wait
    (up to the bound, the rest counted as dropped), and reach the topic once Kafka is up."""
    from kafka import KafkaConsumer, TopicPartition

    from looprl.ingest.transport import ensure_topics

    port = free_port()
    topic = f"test.gateway.responses.{port}"
    cfg = load_config(environ={}, workspace=tmp_path / "ws",
                      kafka={"bootstrap_servers": f"127.0.0.1:{port}", "topic_responses": topic},
                      gateway={"max_buffered_logs": 5, "request_token_ids": False})
    up = stubs()
    recorder = kafka_recorder(cfg)
    gw = GatewayServer(build_gateway(cfg, recorder=recorder, upstreams=[up.url])).start()
    broker = None
    try:
        dropped = _metric("looprl_gateway_response_logs_dropped_total")
        ids, slowest = [], 0.0
        for i in range(8):
            t0 = time.perf_counter()
            r = httpx.post(f"{gw.url}/v1/chat/completions", json={**CHAT, "user": f"k{i}", "stream": i % 2 == 1})
            slowest = max(slowest, time.perf_counter() - t0)
            assert r.status_code == 200
            ids.append(f"chatcmpl-k{i}")
        assert slowest < 1.0  # never waits on Kafka
        assert recorder.dropped == 3 and recorder.pending == 5
        assert _metric("looprl_gateway_response_logs_dropped_total") == dropped + 3

        broker = EmbeddedBroker(port=port).start(timeout=60)
        ensure_topics(broker.bootstrap, {topic: 1})
        deadline = time.monotonic() + 60
        while recorder.pending and time.monotonic() < deadline:
            time.sleep(0.1)
        assert recorder.pending == 0
        consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=None, auto_offset_reset="earliest",
                                 consumer_timeout_ms=1000)
        try:
            consumer.assign([TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)])
            got = []
            while len(got) < 5 and time.monotonic() < deadline:
                got += [parse_event(m.value) for m in consumer]
        finally:
            consumer.close()
        assert sorted(e.response_id for e in got) == sorted(ids[:5])  # the first five, each once
        # no routing file yet (no controller ran): the alias serves the base model
        assert {e.adapter_version for e in got} == {"base"} and all(e.messages[0].content == "hi" for e in got)
    finally:
        gw.stop()
        if broker is not None:
            broker.stop()


# ---------------------------------------------------------------- auth and surface
def test_client_tokens_guard_inference_and_admin_routes_are_not_forwarded(stubs, tmp_path):
    up = stubs()
    with _gateway([up], _routing(tmp_path), client_tokens=["client-secret"]) as gw:
        assert httpx.post(f"{gw.url}/v1/chat/completions", json=CHAT).status_code == 401
        assert httpx.post(f"{gw.url}/v1/chat/completions", json=CHAT,
                          headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = httpx.post(f"{gw.url}/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer client-secret"})
        assert ok.status_code == 200
        for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/looprl/alias"):
            r = httpx.post(f"{gw.url}{path}", json={"lora_name": "x", "lora_path": "/etc"},
                           headers={"Authorization": "Bearer client-secret"})
            assert r.status_code == 404
        assert len(up.bodies) == 1
        big = httpx.post(f"{gw.url}/v1/completions", content=b"x" * (2 << 20),
                         headers={"Authorization": "Bearer client-secret", "Content-Type": "application/json"})
        assert big.status_code == 413


def test_the_gateway_refuses_a_public_address_without_client_tokens(tmp_path):
    from looprl.ops.cli import main

    rc = main(["--workspace", str(tmp_path / "ws"), "gateway", "--host", "0.0.0.0", "--port", "0"])
    assert rc == 2


# ---------------------------------------------------------------- end to end, real server
def test_openai_client_through_the_gateway_to_looprl_serve(serving_base, serving_adapters, tmp_path):
    """The official client, streaming and not, against the gateway in front of the embedded server,
    routed by a real controller pass; answers are attributed and logged with their token ids."""
    ws = make_workspace(tmp_path / "ws", serving_adapters)
    srv = start_server(ws, serving_base, serving_adapters, logger=None)
    version = serving_adapters.good[0]
    Registry(ws / "registry").set_pointer("policy", "promoted", version)
    cfg = serving_config(ws, serving_base, endpoints=[srv.url])
    assert AdapterController(cfg, endpoints=[srv.url]).reconcile().converged
    logger = CapturingLogger()
    gw = GatewayServer(build_gateway(cfg, recorder=ResponseRecorder(logger))).start()
    try:
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)
        msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "tell me about rain"}]
        whole = client.chat.completions.with_raw_response.create(model="policy", messages=msgs, max_tokens=6,
                                                                 temperature=0.0, user="alice")
        answer = whole.parse()
        assert whole.headers["x-looprl-adapter"] == version and answer.model_extra["looprl_adapter_version"] == version
        assert answer.model == f"policy-{version}" and whole.headers["x-looprl-response-id"] == answer.id
        chunks = list(client.chat.completions.create(model="policy", messages=msgs, max_tokens=6, temperature=0.0,
                                                     user="alice", stream=True))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == answer.choices[0].message.content  # greedy: the same answer both ways
        assert {c.model_extra["looprl_adapter_version"] for c in chunks} == {version}
        text = client.completions.create(model="base", prompt="hello", max_tokens=4, user="bob")
        assert text.model_extra["looprl_adapter_version"] == "base"
        pair = list(client.chat.completions.create(model="policy", messages=msgs, max_tokens=4, temperature=1.5,
                                                   seed=3, n=2, stream=True, extra_body={"ignore_eos": True}))
        pair_text = {i: "".join(c.choices[0].delta.content or "" for c in pair if c.choices and c.choices[0].index == i)
                     for i in (0, 1)}
        models = {m.id for m in client.models.list()}
        assert {"base", "policy", f"policy-{version}"} <= models

        by_id = {e.response_id: e for e in logger.events}
        pair_id = pair[0].id
        assert set(by_id) == {answer.id, chunks[0].id, text.id, pair_id, f"{pair_id}-1"}  # each choice its own id
        assert {i: by_id[rid].completion for i, rid in ((0, pair_id), (1, f"{pair_id}-1"))} == pair_text
        assert (by_id[pair_id].sampling.seed, by_id[f"{pair_id}-1"].sampling.seed) == (3, 4)  # seed + index
        e = by_id[answer.id]
        assert (e.adapter_version, e.user_id, e.model, e.completion) == (version, "alice", "policy",
                                                                          answer.choices[0].message.content)
        assert [m.role for m in e.messages] == ["system", "user"] and e.sampling.temperature == 0.0
        assert e.sampling.max_tokens == 6 and len(e.completion_token_ids) == answer.usage.completion_tokens
        assert by_id[chunks[0].id].completion_token_ids == e.completion_token_ids
        assert by_id[text.id].prompt == "hello" and by_id[text.id].adapter_version == "base"
    finally:
        gw.stop()
        srv.thread.stop()
