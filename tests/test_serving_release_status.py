"""Serving honours the release contract: a version the gate rejected or that was rolled back is
not loaded unless an admin forces it, and the controller (which never forces) cannot put one in
front of users, while its rollback to the previous promoted version still works."""

from __future__ import annotations

import httpx
import pytest

from looprl.serving.controller import AdapterController
from looprl.storage import releases
from looprl.storage.registry import Registry

from fixtures_serving import serving_config


@pytest.fixture(scope="module")
def srv(serving_server):
    return serving_server


def _load(srv, name: str, version: str, **extra) -> httpx.Response:
    return httpx.post(f"{srv.url}/v1/load_lora_adapter", headers=srv.admin_headers, timeout=60,
                      json={"lora_name": name, "lora_path": srv.registry_path(version), **extra})


def _loaded(srv) -> set[str]:
    state = httpx.get(f"{srv.url}/v1/looprl/state", headers=srv.admin_headers).json()
    return {a["name"] for a in state["adapters"]}


def _served(srv) -> str:
    r = httpx.post(f"{srv.url}/v1/completions", timeout=60, json={"model": "policy", "prompt": "hi", "max_tokens": 1})
    assert r.status_code == 200, r.text
    return r.headers["x-looprl-adapter"]


@pytest.mark.parametrize("status", ["rejected", "rolled_back"])
def test_unfit_versions_load_only_when_forced(srv, status):
    reg = Registry(srv.cfg.registry_dir)
    version = srv.adapters.good[2]
    reg.set_status("policy", version, status, "judged unfit by the test")
    name = f"forced-{status.replace('_', '-')}"
    try:
        r = _load(srv, name, version)
        err = r.json()["error"]
        assert r.status_code == 409 and err["code"] == "refused_status", r.text
        assert f"policy/{version} is {status} (judged unfit by the test)" in err["message"]
        assert '"force": true' in err["message"] and name not in _loaded(srv)

        r = _load(srv, name, version, force=True)  # an operator's explicit decision
        assert r.status_code == 200, r.text
        answer = httpx.post(f"{srv.url}/v1/completions", timeout=60, json={"model": name, "prompt": "hi", "max_tokens": 1})
        assert answer.headers["x-looprl-adapter"] == version
    finally:
        httpx.post(f"{srv.url}/v1/unload_lora_adapter", json={"lora_name": name}, headers=srv.admin_headers)
        reg.set_status("policy", version, "candidate", "restored by the test")


def test_the_controller_never_serves_a_rolled_back_version(srv):
    reg = Registry(srv.cfg.registry_dir)
    v1, v2, v3 = srv.adapters.good
    ctl = AdapterController(serving_config(srv.cfg.workspace, srv.cfg.model.base_path), endpoints=[srv.url])
    try:
        for v in (v1, v2):
            reg.set_status("policy", v, "promoted", "test")
            reg.set_pointer("policy", "promoted", v)
            assert ctl.reconcile().converged
            assert _served(srv) == v
        assert {f"policy-{v1}", f"policy-{v2}"} <= _loaded(srv)  # v1 kept for rollback

        # Rolling back v2 restores the previous promoted version, which serving accepts.
        releases.roll_back_promoted(reg, srv.cfg.state_dir, "test", by="operator", action="manual_rollback")
        assert reg.pointer("policy", "promoted") == v1 and reg.manifest("policy", v2).status == "rolled_back"
        assert ctl.reconcile().converged
        assert _served(srv) == v1

        # A pointer edited by hand to a version the gate rejected: the endpoint refuses to load it,
        # so nothing flips and users keep v1.
        reg.set_status("policy", v3, "rejected", "test: worse than the control")
        reg.set_pointer("policy", "promoted", v3)
        rep = ctl.reconcile()
        assert not rep.converged and not rep.flipped
        assert any("409" in e and "rejected" in e for e in rep.errors), rep.errors
        assert _served(srv) == v1 and f"policy-{v3}" not in _loaded(srv)
    finally:
        reg.set_pointer("policy", "promoted", v1)
        reg.set_status("policy", v3, "candidate", "restored by the test")
        ctl.reconcile()
        ctl.close()
