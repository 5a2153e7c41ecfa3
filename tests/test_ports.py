"""Port 0 means one thing everywhere: a free port, which the process logs at start ("<what>
listening", with url and port) and really serves on. A taken port stops the process with an
error naming the config key. (`looprl serving serve` on port 0: tests/test_serving_cli.py; the
embedded broker on port 0: tests/test_ingest_broker.py.)"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from listen_testing import LogTail, listening, stop
from upstream_stub import StubUpstream

from looprl.ops.core.config import ConfigError
from looprl.ops.core.listen import bind_socket
from looprl.ops.core.log import setup_logging
from looprl.ops.core.metrics import serve_metrics


def _env(tmp_path, **config: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPRL_")}
    env.update(LOOPRL_WORKSPACE=str(tmp_path / "ws"), PYTHONUNBUFFERED="1", **config)
    return env


def _start(argv: list[str], env: dict[str, str], cwd) -> tuple[subprocess.Popen, LogTail]:
    proc = subprocess.Popen([sys.executable, "-m", "looprl.ops.cli", *argv], env=env, cwd=cwd, text=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return proc, LogTail(proc)


def _stop(proc: subprocess.Popen, tail: LogTail) -> None:
    rc = stop(proc)
    tail.wait_closed()
    assert rc in (0, 130), tail.text()[-3000:]


@pytest.fixture
def json_logs(capsys):
    setup_logging("INFO", "json")
    yield capsys
    logging.getLogger("looprl").setLevel(logging.INFO)


def test_metrics_on_port_0_log_the_port_they_serve(json_logs):
    port = serve_metrics(0)
    rec = [json.loads(x) for x in json_logs.readouterr().err.splitlines() if '"metrics listening"' in x][-1]
    assert rec["port"] == port > 0 and rec["url"] == f"http://127.0.0.1:{port}/metrics"
    assert "python_info" in httpx.get(rec["url"], timeout=5).text


def test_a_taken_port_names_the_key():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"cannot listen on 127.0.0.1:{taken} .*set serving.port to a free "
                                              r"port, or 0 for any free port"):
            bind_socket("127.0.0.1", taken, "serving.port")
        with pytest.raises(ConfigError, match=rf"127.0.0.1:{taken} .*set ingest.metrics_port to a free port"):
            serve_metrics(taken, key="ingest.metrics_port")


def test_metrics_wait_for_a_port_that_comes_free():
    """wait_s: a port the job before still holds is bound once it is let go; one held for longer
    than the wait is still a clear error, after the wait."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    taken = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=rf"127.0.0.1:{taken} .*set policy.metrics_port to a free port"):
        serve_metrics(taken, key="policy.metrics_port", wait_s=0.5)
    assert time.monotonic() - t0 >= 0.5
    threading.Timer(0.5, s.close).start()
    assert serve_metrics(taken, key="policy.metrics_port", wait_s=10.0) == taken
    assert "python_info" in httpx.get(f"http://127.0.0.1:{taken}/metrics", timeout=5).text


def test_the_collector_on_port_0(tmp_path, kafka_bootstrap, kafka_topics):
    env = _env(tmp_path, LOOPRL_KAFKA__BOOTSTRAP_SERVERS=kafka_bootstrap,
               LOOPRL_KAFKA__TOPIC_FEEDBACK=kafka_topics["topic_feedback"], LOOPRL_INGEST__COLLECTOR_PORT="8090")
    proc, tail = _start(["ingest", "collect", "--port", "0"], env, tmp_path)  # the flag overrides the key
    try:
        url, port = listening(tail, "collector")
        assert port != 8090 and url == f"http://127.0.0.1:{port}/v1/feedback"
        base = url.removesuffix("/v1/feedback")
        assert httpx.get(f"{base}/health", timeout=5).status_code == 200
        r = httpx.post(url, json={"kind": "thumbs", "response_id": "r-port0", "up": True}, timeout=20)
        assert r.status_code in (200, 202), r.text
        metrics = httpx.get(f"{base}/metrics", timeout=5, follow_redirects=True).text
        assert 'looprl_ingest_collector_events_total{kind="thumbs"} 1.0' in metrics
    finally:
        _stop(proc, tail)


def test_the_gateway_and_its_metrics_on_port_0(tmp_path):
    from openai import OpenAI

    stub = StubUpstream(looprl=True, version="v3").start()
    env = _env(tmp_path, LOOPRL_GATEWAY__PORT="0", LOOPRL_GATEWAY__METRICS_PORT="0",
               LOOPRL_GATEWAY__UPSTREAMS=json.dumps([stub.url]), LOOPRL_GATEWAY__LOG_RESPONSES="false")
    proc, tail = _start(["gateway"], env, tmp_path)
    try:
        metrics_url, _ = listening(tail, "metrics")
        url, _ = listening(tail, "gateway")
        llm = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=5)
        raw = llm.chat.completions.with_raw_response.create(model="policy", user="u1",
                                                            messages=[{"role": "user", "content": "hi"}])
        assert raw.parse().choices[0].message.content == "Hello, world!"
        assert raw.headers["x-looprl-adapter"] == "v3"
        assert "looprl_gateway_requests_total" in httpx.get(metrics_url, timeout=5).text
    finally:
        _stop(proc, tail)
        stub.stop()
