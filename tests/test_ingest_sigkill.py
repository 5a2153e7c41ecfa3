"""Exactly-once under SIGKILL: `looprl ingest consume` is killed -9 mid-stream several times and restarted
while producers keep sending (some events twice, as a retrying producer would). Afterwards every
event is in the Parquet log exactly once: 0 lost, 0 duplicated."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

from fixtures_kafka import ingest_config, ingest_env
from looprl.ingest.schema import ResponseEvent, ThumbsEvent, encode_event
from looprl.ingest.transport import make_producer
from looprl.storage.events import EventLog

MAX_EVENTS = 12_000
KILLS = 3


def _producer_thread(bootstrap: str, cfg, sent: dict[str, int], stop: threading.Event, done: threading.Event,
                     errors: list) -> None:
    """~400 events/s until ``stop``; 5% of them are sent a second time later (same bytes)."""
    rng = random.Random(7)
    p = make_producer(bootstrap, "confluent", linger_ms=5)
    history: list[tuple[str, bytes, bytes]] = []
    try:
        for i in range(MAX_EVENTS):
            if stop.is_set() and i % 2 == 0:
                break
            if i % 2 == 0:
                e = ResponseEvent(response_id=f"r{i}", prompt=f"p{i}", completion="c", model="m")
                topic = cfg.kafka.topic_responses
            else:
                e = ThumbsEvent(response_id=f"r{i - 1}", up=bool(i % 3))
                topic = cfg.kafka.topic_feedback
            key, value = str(e.event_id).encode(), encode_event(e)
            p.send(topic, value, key=key, on_delivery=lambda err: err is not None and errors.append(err))
            sent[str(e.event_id)] = 1
            history.append((topic, key, value))
            if rng.random() < 0.05:
                t, k, v = rng.choice(history)
                p.send(t, v, key=k, on_delivery=lambda err: err is not None and errors.append(err))
            if i % 100 == 99:
                time.sleep(0.25)
        if p.flush(30):
            errors.append("unflushed")
    finally:
        p.close()
        done.set()


def _start(env, log_path, *extra):
    return subprocess.Popen([sys.executable, "-m", "looprl.ops.cli", "ingest", "consume", *extra], env=env,
                            stdout=open(log_path, "ab"), stderr=subprocess.STDOUT, start_new_session=True)


def test_sigkill_and_restart_loses_and_duplicates_nothing(tmp_path, kafka_bootstrap, kafka_topics):
    cfg = ingest_config(tmp_path, kafka_bootstrap, kafka_topics, batch_max_events=150, batch_max_seconds=0.2)
    env = ingest_env(cfg)
    log_path = tmp_path / "ingest.log"
    sent: dict[str, int] = {}
    errors: list = []
    done, stop_producing = threading.Event(), threading.Event()
    producer = threading.Thread(target=_producer_thread, args=(kafka_bootstrap, cfg, sent, stop_producing, done, errors),
                                daemon=True)

    rng = random.Random(1)
    procs = []
    killed_with_data = 0
    try:
        proc = _start(env, log_path)
        procs.append(proc)
        producer.start()
        for _ in range(KILLS):
            # wait until this incarnation has written something, then kill it at a random moment
            deadline = time.monotonic() + 40
            start_files = len(EventLog(cfg.events_dir).files())
            while len(EventLog(cfg.events_dir).files()) <= start_files and time.monotonic() < deadline:
                assert proc.poll() is None, log_path.read_text()[-3000:]
                time.sleep(0.1)
            time.sleep(rng.uniform(0.0, 0.6))
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            killed_with_data += len(EventLog(cfg.events_dir).files()) > start_files
            proc = _start(env, log_path)
            procs.append(proc)
        stop_producing.set()
        assert done.wait(60), "producer did not finish"
        assert not errors, errors[:3]
        os.killpg(proc.pid, signal.SIGKILL)  # one more kill after the producers stopped
        proc.wait(timeout=10)
        final = _start(env, log_path, "--idle-exit", "3")
        procs.append(final)
        assert final.wait(timeout=90) == 0, log_path.read_text()[-3000:]
    finally:
        stop_producing.set()
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    assert killed_with_data == KILLS
    log = EventLog(cfg.events_dir)
    counts = log.query(
        "SELECT (SELECT count(*) FROM responses) + (SELECT count(*) FROM feedback) AS n, "
        "(SELECT count(DISTINCT event_id) FROM responses) + (SELECT count(DISTINCT event_id) FROM feedback) AS d"
    ).to_pylist()[0]
    stored = set(log.query("SELECT event_id FROM responses UNION ALL SELECT event_id FROM feedback")
                 .column("event_id").to_pylist())
    lost = set(sent) - stored
    assert not lost, f"{len(lost)} events lost"
    assert counts["n"] == counts["d"] == len(sent), f"duplicated: {counts['n'] - counts['d']}"
    assert len(sent) > 2000
    # every response's thumbs resolved through the join
    unresolved = log.query("SELECT count(*) AS n FROM feedback_joined WHERE prompt IS NULL").column("n")[0].as_py()
    assert unresolved == 0


def test_sigterm_stops_cleanly_after_committing_and_metrics_are_served(tmp_path, kafka_bootstrap, kafka_topics):
    import re

    import httpx

    cfg = ingest_config(tmp_path, kafka_bootstrap, kafka_topics)
    log_path = tmp_path / "ingest.log"
    p = make_producer(kafka_bootstrap, "confluent", linger_ms=1)
    events = [ThumbsEvent(response_id=f"r{i}", up=True) for i in range(50)]
    for e in events:
        p.send(cfg.kafka.topic_feedback, encode_event(e))
    assert p.flush(20) == 0
    proc = _start(ingest_env(cfg), log_path)
    try:
        deadline = time.monotonic() + 60
        while EventLog(cfg.events_dir).stats().kinds["thumbs"].events < 50:
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.2)
        url = re.search(r'"url": "(http://[^"]+/metrics)"', log_path.read_text()).group(1)
        body = httpx.get(url, timeout=5).text
        assert 'looprl_ingest_events_total{kind="thumbs"} 50.0' in body
        heartbeat = float(re.search(r"^looprl_ingest_heartbeat_timestamp_seconds (\S+)$", body, re.M).group(1))
        assert time.time() - heartbeat < 5
        assert "looprl_ingest_batch_write_seconds_bucket" in body and "looprl_ingest_consumer_lag_messages" in body
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, log_path.read_text()[-3000:]
        assert '"msg": "ingest stopped"' in log_path.read_text()
    finally:
        p.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # the offsets were committed: a restart reads nothing again
    again = subprocess.run([sys.executable, "-m", "looprl.ops.cli", "ingest", "consume", "--idle-exit", "1"],
                           env=ingest_env(cfg), capture_output=True, text=True, timeout=90)
    assert again.returncode == 0 and json.loads(again.stdout.splitlines()[-1])["records"] == 0
