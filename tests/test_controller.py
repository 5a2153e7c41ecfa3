"""The adapter controller against embedded servers over HTTP (and a vLLM-like stub)."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from prometheus_client import REGISTRY

from looprl.serving.controller import AdapterController
from looprl.storage.registry import Registry

from fixtures_serving import ADMIN_TOKEN, make_workspace, serving_config, start_server


@pytest.fixture(scope="module")
def env(serving_base, serving_adapters, tmp_path_factory):
    """Two embedded servers on one workspace (one registry), and a third that accepts larger ranks."""
    ws = make_workspace(tmp_path_factory.mktemp("ctl-ws"), serving_adapters)
    a = start_server(ws, serving_base, serving_adapters)
    b = start_server(ws, serving_base, serving_adapters)
    big = start_server(ws, serving_base, serving_adapters, max_lora_rank=32)
    yield {"ws": ws, "a": a, "b": b, "big": big, "reg": Registry(ws / "registry"), "adapters": serving_adapters}
    for s in (a, b, big):
        s.thread.stop()


def _controller(env, urls, **serving):
    cfg = serving_config(env["ws"], env["a"].cfg.model.base_path, **serving)
    cfg = cfg.model_copy(update={"canary": cfg.canary.model_copy(update={"traffic_share": 0.25})})
    return AdapterController(cfg, endpoints=urls)


def _state(srv):
    return httpx.get(f"{srv.url}/v1/looprl/state", headers=srv.admin_headers).json()


def _served_version(srv, user="u"):
    r = httpx.post(f"{srv.url}/v1/completions", json={"model": "policy", "prompt": "hi", "max_tokens": 1, "user": user})
    assert r.status_code == 200
    return r.headers["x-looprl-adapter"]


def _set(reg, promoted, canary=None):
    reg.set_pointer("policy", "promoted", promoted)
    reg.set_pointer("policy", "canary", canary)


def test_promotion_rollout_keeps_previous_and_unloads_older(env):
    reg, (v1, v2, v3), a, b = env["reg"], env["adapters"].good, env["a"], env["b"]
    ctl = _controller(env, [a.url, b.url])
    try:
        _set(reg, None)
        rep = ctl.reconcile()
        assert rep.converged and not rep.diverged
        assert _served_version(a) == _served_version(b) == "base"

        _set(reg, v1)
        rep = ctl.reconcile()
        assert rep.converged and rep.flipped
        for s in (a, b):
            assert _served_version(s) == v1
            assert _state(s)["aliases"]["policy"]["lora_name"] == f"policy-{v1}"

        _set(reg, v2)
        assert ctl.reconcile().converged
        assert {x["name"] for x in _state(a)["adapters"]} == {f"policy-{v1}", f"policy-{v2}"}  # v1 kept for rollback

        _set(reg, v3)
        assert ctl.reconcile().converged
        for s in (a, b):
            assert _served_version(s) == v3
            assert {x["name"] for x in _state(s)["adapters"]} == {f"policy-{v2}", f"policy-{v3}"}

        # Rollback to the kept version: nothing to load, the alias flips at once.
        loads0 = REGISTRY.get_sample_value("looprl_serving_adapter_loads_total")
        _set(reg, v2)
        rep = ctl.reconcile()
        assert rep.converged and _served_version(a) == _served_version(b) == v2
        assert REGISTRY.get_sample_value("looprl_serving_adapter_loads_total") == loads0
        assert REGISTRY.get_sample_value("looprl_controller_diverged") == 0
        assert REGISTRY.get_sample_value("looprl_controller_endpoint_version",
                                         {"endpoint": a.url, "role": "primary"}) == int(v2[1:])

        routing = json.loads((env["ws"] / "state" / "serving_routing.json").read_text())
        assert routing["primary"] == f"policy-{v2}" and routing["converged"] and not routing["diverged"]
    finally:
        ctl.close()


def test_canary_pointer_sets_a_weighted_sticky_split(env):
    reg, ad, a = env["reg"], env["adapters"], env["a"]
    v2, ex = ad.good[1], ad.experts_only
    ctl = _controller(env, [a.url, env["b"].url])
    try:
        _set(reg, v2, ex)
        assert ctl.reconcile().converged
        alias = _state(a)["aliases"]["policy"]
        assert alias["version"] == v2 and alias["canary"] == {"lora_name": f"policy-{ex}", "version": ex, "share": 0.25}
        seen = {_served_version(a, user=f"user-{i}") for i in range(30)}
        assert seen == {v2, ex}
        _set(reg, v2, None)  # canary rolled back
        assert ctl.reconcile().converged
        assert _state(a)["aliases"]["policy"]["canary"] is None
        _set(reg, None, ex)  # first canary before anything was promoted: base vs canary
        assert ctl.reconcile().converged
        alias = _state(a)["aliases"]["policy"]
        assert alias["lora_name"] is None and alias["canary"]["version"] == ex
        assert {_served_version(a, user=f"user-{i}") for i in range(30)} == {"base", ex}
    finally:
        ctl.close()


def test_refused_adapter_flips_nothing_anywhere(env):
    reg, ad, a, big = env["reg"], env["adapters"], env["a"], env["big"]
    ctl = _controller(env, [a.url, big.url])
    try:
        _set(reg, ad.good[1])
        assert ctl.reconcile().converged
        fails0 = REGISTRY.get_sample_value("looprl_controller_failures_total", {"endpoint": a.url, "step": "load"}) or 0
        # rank 16: `big` can load it, `a` (max_lora_rank 8) refuses: neither may switch.
        _set(reg, ad.too_large)
        rep = ctl.reconcile()
        assert not rep.converged and not rep.flipped and any("max_lora_rank" in e for e in rep.errors)
        assert _served_version(a) == _served_version(big) == ad.good[1]
        assert REGISTRY.get_sample_value("looprl_controller_failures_total", {"endpoint": a.url, "step": "load"}) == fails0 + 1
        # A corrupted version is refused before any endpoint sees it.
        _set(reg, ad.tampered)
        rep = ctl.reconcile()
        assert not rep.converged and "checksum mismatch" in rep.errors[0]
        assert _served_version(a) == ad.good[1]
    finally:
        _set(reg, ad.good[1])
        ctl.close()


def test_unreachable_endpoint_is_reported_as_divergence(env):
    reg, ad, a = env["reg"], env["adapters"], env["a"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens after close
    ctl = _controller(env, [a.url, dead], controller_retries=2, controller_timeout_seconds=2.0)
    try:
        _set(reg, ad.good[2])
        rep = ctl.reconcile()
        assert rep.diverged and not rep.converged
        assert _served_version(a) == ad.good[2]  # the live endpoint is updated
        assert REGISTRY.get_sample_value("looprl_controller_diverged") == 1
        assert REGISTRY.get_sample_value("looprl_controller_endpoints_up") == 1
        routing = json.loads((env["ws"] / "state" / "serving_routing.json").read_text())
        down = [e for e in routing["endpoints"] if e["url"] == dead][0]
        assert routing["diverged"] and not down["reachable"] and "ConnectError" in down["error"]
    finally:
        ctl.close()


def test_watch_loop_applies_pointer_changes(env):
    reg, ad, a, b = env["reg"], env["adapters"], env["a"], env["b"]
    _set(reg, ad.good[0])
    ctl = _controller(env, [a.url, b.url])
    stop = threading.Event()
    t = threading.Thread(target=ctl.run, args=(stop,), daemon=True)
    t.start()
    try:
        for want in (ad.good[0], ad.good[1]):
            _set(reg, want)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and {_served_version(a), _served_version(b)} != {want}:
                time.sleep(0.1)
            assert _served_version(a) == _served_version(b) == want
    finally:
        stop.set()
        t.join(10)
        ctl.close()
    assert not t.is_alive()


class _FakeVllm:
    """The part of vLLM's API the controller uses: /v1/models and the runtime LoRA endpoints
    (with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True). No alias API: /v1/looprl/* is 404."""

    def __init__(self, api_key: str | None = None):
        self.loaded: dict[str, str] = {}
        self.calls: list[str] = []
        self.refuse: set[str] = set()
        self.authorizations: set[str] = set()  # every Authorization header it was sent
        app = FastAPI()

        if api_key is not None:  # vLLM --api-key: one key on every /v1 route, load/unload included
            @app.middleware("http")
            async def authenticate(request, call_next):
                given = request.headers.get("authorization", "")
                self.authorizations.add(given)
                if request.url.path.startswith("/v1") and given != f"Bearer {api_key}":
                    return JSONResponse({"error": "Unauthorized"}, status_code=401)
                return await call_next(request)

        @app.get("/v1/models")
        def models():
            data = [{"id": "base", "object": "model", "parent": None}]
            data += [{"id": n, "object": "model", "root": p, "parent": "base"} for n, p in self.loaded.items()]
            return {"object": "list", "data": data}

        @app.post("/v1/load_lora_adapter")
        def load(body: dict):
            self.calls.append(f"load {body['lora_name']}")
            if body["lora_name"] in self.refuse:
                return JSONResponse({"error": {"message": "LoRA rank 16 is greater than max_lora_rank 8"}}, 400)
            self.loaded[body["lora_name"]] = body["lora_path"]
            return "Success"

        @app.post("/v1/unload_lora_adapter")
        def unload(body: dict):
            self.calls.append(f"unload {body['lora_name']}")
            self.loaded.pop(body["lora_name"], None)
            return "Success"

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


def test_vllm_endpoint_gets_loads_and_unloads_and_routing_names_the_adapter(env):
    reg, ad = env["reg"], env["adapters"]
    vllm = _FakeVllm()
    ctl = _controller(env, [vllm.url])
    try:
        v1, v2, v3 = ad.good
        for v in (v1, v2, v3):
            _set(reg, v)
            assert ctl.reconcile().converged
        assert set(vllm.loaded) == {f"policy-{v2}", f"policy-{v3}"}
        assert vllm.loaded[f"policy-{v3}"] == str((env["ws"] / "registry" / "policy" / v3).resolve())
        assert f"unload policy-{v1}" in vllm.calls
        routing = json.loads((env["ws"] / "state" / "serving_routing.json").read_text())
        assert routing["primary"] == f"policy-{v3}" and routing["endpoints"][0]["kind"] == "vllm"
        vllm.loaded.pop(f"policy-{v3}")  # e.g. vLLM restarted: the controller notices and reloads
        assert ctl.reconcile().converged and f"policy-{v3}" in vllm.loaded
        # A version vLLM refuses is never handed to the gateway: routing stays on the last applied one.
        vllm.refuse.add(f"policy-{ad.too_large}")
        _set(reg, ad.too_large)
        rep = ctl.reconcile()
        routing = json.loads((env["ws"] / "state" / "serving_routing.json").read_text())
        assert not rep.converged and "max_lora_rank" in rep.errors[0]
        assert routing["primary"] == f"policy-{v3}" and routing["desired"]["promoted"] == ad.too_large
    finally:
        ctl.close()
        vllm.stop()


def test_a_version_leaving_the_routing_stays_loaded_until_gateways_have_moved(env):
    """A gateway routes by the routing file, re-read every gateway.routing_poll_seconds: a canary
    rolled back is unloaded only unload_grace_seconds after a routing file without it was written,
    never in the pass that flips the route (its requests would get 404)."""
    reg, ad = env["reg"], env["adapters"]
    v1, v2, _ = ad.good
    vllm = _FakeVllm()
    ctl = _controller(env, [vllm.url], unload_grace_seconds=0.6)
    routing_path = env["ws"] / "state" / "serving_routing.json"
    try:
        _set(reg, v1, v2)
        assert ctl.reconcile().converged and json.loads(routing_path.read_text())["canary"] == f"policy-{v2}"
        _set(reg, v1, None)  # the canary is rolled back
        assert ctl.reconcile().converged
        assert json.loads(routing_path.read_text())["canary"] is None  # gateways stop sending there...
        assert f"policy-{v2}" in vllm.loaded  # ...and until they have, it still answers
        ctl.reconcile()
        assert f"policy-{v2}" in vllm.loaded and f"unload policy-{v2}" not in vllm.calls
        time.sleep(0.7)
        assert ctl.reconcile().converged
        assert f"policy-{v2}" not in vllm.loaded and f"unload policy-{v2}" in vllm.calls
        assert set(vllm.loaded) == {f"policy-{v1}"}

        # A restarted controller knows what the routing file on disk routes to: no early unload.
        _set(reg, v1, v2)
        assert ctl.reconcile().converged
        ctl.close()
        ctl = _controller(env, [vllm.url], unload_grace_seconds=0.6)
        _set(reg, v1, None)
        assert ctl.reconcile().converged and f"policy-{v2}" in vllm.loaded
    finally:
        ctl.close()
        vllm.stop()


def test_vllm_gets_the_inference_key_and_never_the_admin_token(env):
    """Separate credentials: vLLM checks its one --api-key (serving.vllm_api_key, the key every
    inference client holds) on every /v1 route, its adapter load/unload included; the embedded
    server checks serving.admin_token on its admin routes. One controller drives both, and the
    admin token never reaches vLLM."""
    reg, (v1, v2, _), a = env["reg"], env["adapters"].good, env["a"]
    vllm_key = "inference-key"
    vllm = _FakeVllm(api_key=vllm_key)
    ctl = _controller(env, [a.url, vllm.url], vllm_api_key=vllm_key)
    legacy = _controller(env, [vllm.url])  # admin token only, vLLM started with a different key
    try:
        for v in (v1, v2):
            _set(reg, v)
            rep = ctl.reconcile()
            assert rep.converged, rep.errors
            assert _served_version(a) == v and f"policy-{v}" in vllm.loaded
        assert f"load policy-{v2}" in vllm.calls
        assert vllm.authorizations == {f"Bearer {vllm_key}"}

        rep = legacy.reconcile()
        assert not rep.converged and "401" in rep.errors[0] and "serving.vllm_api_key" in rep.errors[0]
    finally:
        ctl.close()
        legacy.close()
        vllm.stop()


def test_cli_controller_once(env, monkeypatch, tmp_path, capsys):
    from looprl.ops.cli import main

    reg, ad, a = env["reg"], env["adapters"], env["a"]
    _set(reg, ad.good[0])
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LOOPRL_CONFIG", raising=False)
    monkeypatch.setenv("LOOPRL_SERVING__ADMIN_TOKEN", ADMIN_TOKEN)
    rc = main(["--workspace", str(env["ws"]), "serving", "control", "--once", "--endpoint", a.url])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["converged"] and out["desired"]["promoted"] == ad.good[0]
    assert _served_version(a) == ad.good[0]
    monkeypatch.setenv("LOOPRL_SERVING__ADMIN_TOKEN", "wrong")
    rc = main(["--workspace", str(env["ws"]), "serving", "control", "--once", "--endpoint", a.url])
    out = json.loads(capsys.readouterr().out)
    assert rc == 1 and "401" in out["errors"][0]
