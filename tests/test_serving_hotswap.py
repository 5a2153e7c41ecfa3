"""Hot-swap under concurrent load: zero failed requests, and every answer is exactly what the
version that started it produces (in-flight requests never switch adapters mid-answer)."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import httpx

PROMPTS = ["hello world", "the cat sat on", "question: what is", "I love learning"]
MAX_TOKENS = 12


def _admin(srv, path, body):
    r = httpx.post(f"{srv.url}{path}", json=body, headers=srv.admin_headers, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def _complete(http: httpx.Client, prompt: str, stream: bool) -> tuple[str, str]:
    body = {"model": "policy", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": stream}
    if not stream:
        r = http.post("/v1/completions", json=body)
        r.raise_for_status()
        return r.headers["x-looprl-adapter"], r.json()["choices"][0]["text"]
    with http.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        version, parts, done = r.headers["x-looprl-adapter"], [], False
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                assert chunk["looprl_adapter_version"] == version
                parts.append(chunk["choices"][0]["text"])
        assert done, "stream ended without [DONE]"
        return version, "".join(parts)


def test_hot_swaps_under_load_fail_nothing_and_never_mix_versions(serving_server):
    srv = serving_server
    versions = [*srv.adapters.good, srv.adapters.experts_only]  # attention + fused-expert LoRAs, expert-only

    # Reference answers of each version, before any swap.
    ref: dict[tuple[str, str], str] = {}
    with httpx.Client(base_url=srv.url, timeout=60) as http:
        for v in versions:
            _admin(srv, "/v1/load_lora_adapter", {"lora_name": f"policy-{v}", "lora_path": srv.registry_path(v)})
            for p in PROMPTS:
                r = http.post("/v1/completions", json={"model": f"policy-{v}", "prompt": p, "max_tokens": MAX_TOKENS,
                                                       "temperature": 0})
                ref[(v, p)] = r.json()["choices"][0]["text"]
            if v != versions[0]:
                _admin(srv, "/v1/unload_lora_adapter", {"lora_name": f"policy-{v}"})
    assert len({ref[(v, PROMPTS[0])] for v in versions}) >= 3  # the versions really answer differently
    _admin(srv, "/v1/looprl/alias", {"alias": "policy", "lora_name": f"policy-{versions[0]}"})

    stop = threading.Event()
    results: list[tuple[str, str, str]] = []
    failures: list[str] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            k = 0
            while not stop.is_set():
                p = PROMPTS[(i + k) % len(PROMPTS)]
                try:
                    v, text = _complete(http, p, stream=(i + k) % 2 == 0)
                    with lock:
                        results.append((v, p, text))
                except Exception as e:  # any failure is a failed request
                    with lock:
                        failures.append(f"{type(e).__name__}: {e}")
                k += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(16)]
    for t in threads:
        t.start()
    swaps, current = 0, 0
    deadline = time.monotonic() + 60
    try:
        while swaps < 8 and time.monotonic() < deadline:
            time.sleep(0.3)
            nxt = (current + 1) % len(versions)
            new, old, older = versions[nxt], versions[current], versions[(current - 1) % len(versions)]
            _admin(srv, "/v1/load_lora_adapter", {"lora_name": f"policy-{new}", "lora_path": srv.registry_path(new)})
            _admin(srv, "/v1/looprl/alias", {"alias": "policy", "lora_name": f"policy-{new}"})
            # keep the previous one for rollback; unload the one before it (may still be draining)
            if older not in (new, old) and swaps > 0:
                _admin(srv, "/v1/unload_lora_adapter", {"lora_name": f"policy-{older}"})
            current, swaps = nxt, swaps + 1
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(30)

    assert not failures, failures[:5]
    assert swaps == 8 and len(results) >= 50
    seen = Counter(v for v, _, _ in results)
    assert len(seen) == len(versions), seen  # traffic really moved through every version
    wrong = [(v, p, text) for v, p, text in results if text != ref[(v, p)]]
    assert not wrong, wrong[:3]
    state = httpx.get(f"{srv.url}/v1/looprl/state", headers=srv.admin_headers).json()
    assert state["aliases"]["policy"]["version"] == versions[current]
    assert len(state["adapters"]) <= 3  # old versions were unloaded, not leaked
