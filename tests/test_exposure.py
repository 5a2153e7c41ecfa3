"""Nothing opens an unauthenticated endpoint beyond loopback, and no credential can be blank.

The feedback collector, like the embedded server, refuses to start on a non-loopback address
without its token (it used to bind 0.0.0.0 with a warning), before it touches Kafka."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from looprl.ingest.collector import run_collector
from looprl.ops.core.config import ConfigError, is_loopback, load_config, require_token_off_loopback

LOOPBACK = ["127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1", "localhost"]
REACHABLE = ["0.0.0.0", "::", "::ffff:0.0.0.0", "", "10.0.0.5", "::ffff:10.0.0.5", "192.168.1.20", "2001:db8::1",
             "collector", "example.com"]


@pytest.mark.parametrize("host", LOOPBACK)
def test_loopback_hosts(host):
    assert is_loopback(host)
    require_token_off_loopback(host, None, "ingest.collector_host", "ingest.collector_token")


@pytest.mark.parametrize("host", REACHABLE)
def test_reachable_hosts_need_a_token(host):
    assert not is_loopback(host)
    with pytest.raises(ConfigError, match=r"'ingest.collector_token' must be set when ingest.collector_host="):
        require_token_off_loopback(host, None, "ingest.collector_host", "ingest.collector_token")
    cfg = load_config(environ={}, ingest={"collector_token": "t"})
    require_token_off_loopback(host, cfg.ingest.collector_token, "ingest.collector_host", "ingest.collector_token")


@pytest.mark.parametrize("host_from", ["config", "argument"])
def test_collector_refuses_to_start_off_loopback_without_a_token(tmp_path, host_from):
    cfg = load_config(environ={}, workspace=tmp_path,
                      ingest={"collector_host": "0.0.0.0"} if host_from == "config" else {})
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"'ingest.collector_token' must be set when ingest.collector_host='0.0.0.0'"):
        # a closed port: the refusal must come before any wait for Kafka
        run_collector(cfg, "127.0.0.1:9", host="0.0.0.0" if host_from == "argument" else None, port=0)
    assert time.monotonic() - start < 5


def test_looprl_ingest_collect_exits_with_the_key_named(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOPRL_")}
    env.update(LOOPRL_WORKSPACE=str(tmp_path), LOOPRL_KAFKA__BOOTSTRAP_SERVERS="127.0.0.1:9")
    command = ["ingest", "collect", "--host", "0.0.0.0", "--port", "0"]
    r = subprocess.run([sys.executable, "-m", "looprl.ops.cli", *command], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "ingest.collector_token" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("key", ["ingest.collector_token", "serving.admin_token", "serving.vllm_api_key"])
@pytest.mark.parametrize("value", ["", "   "])
def test_blank_credentials_are_config_errors(key, value):
    """A blank token would match a blank `Authorization: Bearer ` header: refused at load."""
    section, name = key.split(".")
    with pytest.raises(ConfigError, match=rf"config key '{key}': .*must not be empty"):
        load_config(environ={f"LOOPRL_{section.upper()}__{name.upper()}": value})


def test_credentials_are_masked_in_the_printed_config():
    cfg = load_config(environ={}, ingest={"collector_token": "c-secret"},
                      serving={"admin_token": "a-secret", "vllm_api_key": "v-secret"})
    shown = repr(cfg.redacted()) + repr(cfg)
    assert not any(s in shown for s in ("c-secret", "a-secret", "v-secret"))
