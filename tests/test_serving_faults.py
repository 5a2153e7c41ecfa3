"""One broken adapter never takes the serving tier down.

An adapter whose forward raises (its LoRA module monkeypatched) fails only its own requests, with
a clean OpenAI-shaped error; base traffic and the other adapters keep answering exactly as before;
after ``unhealthy_after`` failures it is reported unhealthy, and the controller rolls it back."""

from __future__ import annotations

import json
import queue

import httpx
import pytest
import torch
from prometheus_client import REGISTRY

from looprl.policy.model import load_base
from looprl.serving.adapters import read_adapter
from looprl.serving.controller import AdapterController
from looprl.serving.engine import Engine
from looprl.serving.routing import bucket
from looprl.serving.sampling import SamplingParams
from looprl.storage.registry import Registry
from looprl.storage.releases import read_decisions

from fixtures_serving import MAX_LORA_RANK, make_workspace, serving_config, start_server

PROMPTS = ["hello world", "the cat sat on the mat", "question: what is", "I love"]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def _break(monkeypatch, model, key: str, when=lambda x: True) -> None:
    """Make adapter ``key`` raise inside its first attention LoRA module (when ``when(input)``)."""
    mod = model.model.layers[0].self_attn.q_proj.lora_A[key]
    real = mod.forward

    def forward(x):
        if when(x):
            raise RuntimeError("injected adapter fault")
        return real(x)

    monkeypatch.setattr(mod, "forward", forward)


def _failed(adapter: str) -> float:
    return sum(REGISTRY.get_sample_value("looprl_serving_requests_failed_total", {"adapter": adapter, "reason": r}) or 0.0
               for r in ("forward_error", "engine_error"))


def _run_all(eng: Engine, jobs: list[tuple[str, str | None]]):
    boxes = []
    for prompt, adapter in jobs:  # all queued before the engine admits them: they share batches
        box: queue.Queue = queue.Queue()
        eng.submit(eng.encode(prompt), GREEDY, adapter, box.put)
        boxes.append(box)
    out = []
    for box in boxes:
        while True:
            kind, payload = box.get(timeout=60)
            if kind == "done":
                out.append(payload)
                break
    return out


@pytest.fixture(scope="module", params=["mixed", "grouped"])
def engine(request, serving_base, serving_adapters):
    torch.set_num_threads(1)
    model, tok = load_base(serving_base)
    eng = Engine(model, tok, max_batch_size=16, max_lora_rank=MAX_LORA_RANK, base_checksum=serving_adapters.checksum,
                 mixed=request.param == "mixed", unhealthy_after=3).start()
    for name, v in (("good", serving_adapters.good[0]), ("bad", serving_adapters.good[1])):
        eng.load_adapter(read_adapter(name, f"policy/{v}", serving_adapters.registry, eng.inventory, MAX_LORA_RANK))
    yield eng
    eng.stop()


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_a_raising_adapter_fails_only_its_own_requests(engine, monkeypatch, phase):
    jobs = [(p, a) for p in PROMPTS for a in (None, "good", "bad")]
    want = {(p, a): f.text for (p, a), f in zip(jobs, _run_all(engine, jobs))}
    engine.generate("x", GREEDY, adapter="bad")  # resets the bad adapter's consecutive failures
    base_failed, good_failed = _failed("base"), _failed("good")

    # prefill: every forward of the adapter raises; decode: only one-token steps do, so the
    # failure comes half way through a batched step whose KV cache must be restored.
    _break(monkeypatch, engine.model, engine.resolve("bad").key,
           when=(lambda x: True) if phase == "prefill" else (lambda x: x.shape[-2] == 1))
    got = dict(zip(jobs, _run_all(engine, jobs)))

    for (prompt, adapter), fin in got.items():
        if adapter == "bad":
            assert fin.finish_reason == "error" and fin.fault == "forward_error"
            assert "adapter 'bad'" in fin.error and "injected adapter fault" in fin.error
            assert "Traceback" not in fin.error
        else:  # the same answers as before the fault, token for token
            assert fin.finish_reason == "length" and fin.error is None
            assert fin.text == want[(prompt, adapter)]
    health = engine.health()
    assert not health["bad"]["healthy"] and health["bad"]["consecutive_failures"] >= 3
    assert health["base"]["healthy"] and health["good"]["healthy"]
    assert _failed("base") == base_failed and _failed("good") == good_failed
    assert engine.resolve("bad").in_flight == 0

    monkeypatch.undo()  # a success makes it healthy again
    assert engine.generate(PROMPTS[0], GREEDY, adapter="bad").text == want[(PROMPTS[0], "bad")]
    assert engine.health()["bad"]["healthy"]


def test_unhealthy_versions_are_rolled_back_over_http(serving_base, serving_adapters, tmp_path, monkeypatch):
    ws = make_workspace(tmp_path / "ws", serving_adapters)
    reg = Registry(ws / "registry")
    v1, v2, v3 = serving_adapters.good
    for v in (v1, v2):
        reg.set_status("policy", v, "promoted", "test")
    srv = start_server(ws, serving_base, serving_adapters, unhealthy_after=3)
    ctl = AdapterController(serving_config(ws, serving_base), endpoints=[srv.url])
    eng = srv.service.engine

    def ask(model: str, user: str = "u"):
        return httpx.post(f"{srv.url}/v1/chat/completions", timeout=60, json={
            "model": model, "user": user, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})

    try:
        reg.set_pointer("policy", "promoted", v1)
        assert ctl.reconcile().converged
        reg.set_pointer("policy", "promoted", v2)
        assert ctl.reconcile().converged
        assert ask("policy").headers["x-looprl-adapter"] == v2

        _break(monkeypatch, eng.model, eng.resolve(f"policy-{v2}").key)
        for _ in range(3):
            r = ask("policy")
            assert r.status_code == 500
            err = r.json()["error"]
            assert err["type"] == "server_error" and err["code"] == "forward_error"
            assert f"policy-{v2}" in err["message"] and "Traceback" not in r.text
            assert ask("base").status_code == 200  # base traffic is untouched
        health = httpx.get(f"{srv.url}/health").json()
        assert health["status"] == "degraded"
        assert health["models"][f"policy-{v2}"]["healthy"] is False
        assert health["models"]["base"] == {**health["models"]["base"], "healthy": True, "failed": 0}

        rep = ctl.reconcile()  # sees the unhealthy promoted version: the previous one serves again
        assert rep.converged and reg.pointer("policy", "promoted") == v1
        assert reg.manifest("policy", v2).status == "rolled_back"
        assert ask("policy").status_code == 200 and ask("policy").headers["x-looprl-adapter"] == v1
        last = read_decisions(ws / "state")[-1]
        assert (last["action"], last["version"], last["control"], last["by"]) == ("unhealthy_rollback", v2, v1, "controller")

        # A canary that fails: its users get the primary once it is unhealthy, then it is rolled back.
        reg.set_status("policy", v3, "canary", "test")
        reg.set_pointer("policy", "canary", v3)
        ctl_cfg = serving_config(ws, serving_base)
        ctl2 = AdapterController(ctl_cfg.model_copy(update={"canary": ctl_cfg.canary.model_copy(
            update={"traffic_share": 0.5})}), endpoints=[srv.url])
        assert ctl2.reconcile().converged
        _break(monkeypatch, eng.model, eng.resolve(f"policy-{v3}").key)
        canary_users = [u for u in (f"user{i}" for i in range(100)) if bucket("policy", u) < 0.5][:6]
        codes = [ask("policy", user=u).status_code for u in canary_users]
        assert codes[:3] == [500, 500, 500] and codes[3:] == [200, 200, 200]
        assert ctl2.reconcile().converged
        assert reg.pointer("policy", "canary") is None and reg.manifest("policy", v3).status == "rolled_back"
        state = json.loads(httpx.get(f"{srv.url}/v1/looprl/state", headers=srv.admin_headers).text)
        assert state["aliases"]["policy"]["canary"] is None
        ctl2.close()
    finally:
        ctl.close()
        srv.thread.stop()
