"""`looprl serving serve` as a real process: config from the environment, admin token enforced, clean stop."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx

from fixtures_serving import ADMIN_TOKEN, make_workspace
from listen_testing import LogTail, listening, stop


def test_looprl_serve_process_serves_and_hot_swaps(serving_base, serving_adapters, tmp_path):
    ws = make_workspace(tmp_path / "ws", serving_adapters)
    # port 0: a free port, which the process logs ("serving listening")
    env = {**os.environ, "LOOPRL_MODEL__BASE_PATH": str(serving_base), "LOOPRL_SERVING__PORT": "0",
           "LOOPRL_SERVING__ADMIN_TOKEN": ADMIN_TOKEN, "LOOPRL_SERVING__LOG_RESPONSES": "false",
           "LOOPRL_SERVING__MAX_LORA_RANK": "8"}
    env.pop("LOOPRL_CONFIG", None)
    proc = subprocess.Popen([sys.executable, "-m", "looprl.ops.cli", "--workspace", str(ws), "serving", "serve"],
                            env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    tail = LogTail(proc)
    try:
        url, _port = listening(tail, "serving")
        deadline = time.monotonic() + 30  # the socket is bound before the line; the app starts right after
        while True:
            assert proc.poll() is None, tail.text()[-2000:]
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "looprl serving serve did not come up"
            time.sleep(0.1)
        auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        v = serving_adapters.good[0]
        body = {"lora_name": f"policy-{v}", "lora_path": str(ws / "registry" / "policy" / v)}
        assert httpx.post(f"{url}/v1/load_lora_adapter", json=body).status_code == 401
        assert httpx.post(f"{url}/v1/load_lora_adapter", json=body, headers=auth).status_code == 200
        big = {"lora_name": "big", "lora_path": str(ws / "registry" / "policy" / serving_adapters.too_large)}
        assert httpx.post(f"{url}/v1/load_lora_adapter", json=big, headers=auth).status_code == 400  # env config applied
        assert httpx.post(f"{url}/v1/looprl/alias", json={"alias": "policy", "lora_name": f"policy-{v}"},
                          headers=auth).status_code == 200
        r = httpx.post(f"{url}/v1/completions", json={"model": "policy", "prompt": "hi", "max_tokens": 4}, timeout=30)
        assert r.status_code == 200 and r.headers["x-looprl-adapter"] == v
        assert "looprl_serving_requests_total" in httpx.get(f"{url}/metrics").text
    finally:
        rc = stop(proc)
    tail.wait_closed()
    assert rc in (0, 130), tail.text()[-2000:]
