"""Benchmark of `looprl ingest consume` against raw Kafka consumption, in one run on one broker.

N events (a realistic mix: 1/3 responses, thumbs, preferences, ratings, corrections) are produced
once to fresh topics, then read four ways from the same topics:

- raw kafka-python: a bare ``KafkaConsumer`` reading every record (the baseline, no validation);
- raw confluent: the same with confluent-kafka (librdkafka);
- looprl ingest (kafka-python client) and looprl ingest (confluent client): the real
  ``IngestConsumer`` (validation, dedupe, Parquet + fsync, offset commits), each with its own
  consumer group and event log.

Every figure is events/s from the first record received to the last record done (so the group
join, ~3 s on Tansu, is not counted). Ratios are to raw kafka-python consumption measured in the
same run. Goal: ingest >= 0.8x raw kafka-python and >= 30,000 events/s on 2 cores.

Usage: ``python benchmarks/ingest.py [--events 100000] [--bootstrap HOST:PORT]`` (default: an
embedded Tansu broker). Human lines first, then one JSON line of figures.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path


def make_events(n: int, seed: int = 0) -> list[tuple[str, bytes, bytes]]:
    """(role, key, value) of ``n`` valid events; roles 'responses' and 'feedback'."""
    from looprl.ingest.schema import (
        CorrectionEvent, PreferenceEvent, RatingEvent, ResponseEvent, ThumbsEvent, encode_event,
    )

    rng = random.Random(seed)
    words = "the park is sunny and bright today we walked along the river happy wonderful calm".split()
    out, rids = [], []
    for i in range(n):
        k = i % 6
        text = " ".join(rng.choice(words) for _ in range(rng.randint(8, 30)))
        if k in (0, 1) or not rids:
            rid = f"resp-{i}"
            rids.append(rid)
            ev = ResponseEvent(response_id=rid, prompt="tell me about the " + rng.choice(words), completion=text,
                               model="policy", adapter_version=f"v{rng.randint(1, 5)}", user_id=f"user-{i % 50}")
            role = "responses"
        else:
            rid = rng.choice(rids)
            role = "feedback"
            if k == 2:
                ev = ThumbsEvent(response_id=rid, up=rng.random() < 0.5, user_id=f"user-{i % 50}")
            elif k == 3:
                ev = PreferenceEvent(chosen_response_id=rid, rejected_response_id=rng.choice(rids) + "-x")
            elif k == 4:
                ev = RatingEvent(response_id=rid, rating=rng.randint(1, 5))
            else:
                ev = CorrectionEvent(response_id=rid, corrected=text + " indeed")
        out.append((role, str(ev.event_id).encode(), encode_event(ev)))
    return out


def produce(bootstrap: str, topics: dict[str, str], events: list[tuple[str, bytes, bytes]]) -> float:
    from looprl.ingest.transport import make_producer

    p = make_producer(bootstrap, "confluent", linger_ms=20)
    failed: list[Exception] = []
    t0 = time.perf_counter()
    for role, key, value in events:
        p.send(topics[role], value, key=key, on_delivery=lambda e: e is not None and failed.append(e))
    left = p.flush(120)
    p.close()
    if left or failed:
        raise SystemExit(f"produce failed: {left} unacknowledged, {len(failed)} failed ({failed[:1]})")
    return time.perf_counter() - t0


def raw_kafka_python(bootstrap: str, topics: list[str], n: int, timeout: float) -> float:
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                      auto_offset_reset="earliest", fetch_max_bytes=16 * 2**20, max_partition_fetch_bytes=16 * 2**20)
    tps = [TopicPartition(t, p) for t in topics for p in sorted(c.partitions_for_topic(t) or [])]
    c.assign(tps)
    c.seek_to_beginning(*tps)
    got, t0, deadline = 0, None, time.monotonic() + timeout
    while got < n and time.monotonic() < deadline:
        for recs in c.poll(timeout_ms=200, max_records=10_000).values():
            if t0 is None:
                t0 = time.perf_counter()
            for r in recs:  # touch each value, as any consumer would
                got += r.value is not None
    dt = time.perf_counter() - (t0 or time.perf_counter())
    c.close()
    if got < n:
        raise SystemExit(f"raw kafka-python read {got}/{n} records")
    return dt


def raw_confluent(bootstrap: str, topics: list[str], n: int, timeout: float) -> float:
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    from looprl.ingest.transport import topic_partitions

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-raw-{uuid.uuid4().hex[:8]}",
                  "enable.auto.commit": False, "enable.partition.eof": False})
    counts = topic_partitions(bootstrap, topics)
    c.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t in topics for p in range(counts[t])])
    got, t0, deadline = 0, None, time.monotonic() + timeout
    while got < n and time.monotonic() < deadline:
        msgs = c.consume(10_000, 0.2)
        if msgs and t0 is None:
            t0 = time.perf_counter()
        for m in msgs:
            got += m.error() is None and m.value() is not None
    dt = time.perf_counter() - (t0 or time.perf_counter())
    c.close()
    if got < n:
        raise SystemExit(f"raw confluent read {got}/{n} records")
    return dt


def looprl_ingest(bootstrap: str, topics: dict[str, str], n: int, client: str, workdir: Path,
                  batch: int, timeout: float) -> tuple[float, int]:
    from looprl.ingest.consumer import IngestConsumer
    from looprl.ops.core.config import load_config
    from looprl.storage.events import EventLog

    ws = workdir / f"ws-{client}"
    cfg = load_config(environ={}, workspace=ws,
                      kafka={"bootstrap_servers": bootstrap, "client": client, "topic_responses": topics["responses"],
                             "topic_feedback": topics["feedback"], "topic_dlq": topics["dlq"]},
                      ingest={"group_id": f"bench-{client}-{uuid.uuid4().hex[:8]}", "batch_max_events": batch,
                              "batch_max_seconds": 1.0, "metrics_port": 0})
    ic = IngestConsumer(cfg, bootstrap).start()
    first: list[float] = []
    poll = ic._consumer.poll

    def timed_poll(max_records, t):
        recs = poll(max_records, t)
        if recs and not first:
            first.append(time.perf_counter())
        return recs

    ic._consumer.poll = timed_poll  # type: ignore[method-assign]
    stop = threading.Event()
    timer = threading.Timer(timeout, stop.set)
    timer.start()
    try:
        totals = ic.run(stop, max_records=n)
        done = time.perf_counter()
    finally:
        timer.cancel()
        ic.close()
    if totals.records < n:
        raise SystemExit(f"looprl ingest ({client}) read {totals.records}/{n} records within {timeout}s")
    stored = EventLog(cfg.events_dir).query(
        "SELECT (SELECT count(*) FROM responses) + (SELECT count(*) FROM feedback) AS n").column("n")[0].as_py()
    return done - first[0], int(stored)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--bootstrap", default=None, help="existing Kafka (default: start an embedded Tansu)")
    ap.add_argument("--partitions", type=int, default=3)
    ap.add_argument("--batch", type=int, default=5000, help="ingest.batch_max_events")
    ap.add_argument("--timeout", type=float, default=300.0)
    args = ap.parse_args(argv)

    from looprl.ingest.broker import EmbeddedBroker
    from looprl.ingest.transport import ensure_topics
    from looprl.ops.core.log import setup_logging

    setup_logging("WARNING")
    broker = None
    work = Path(tempfile.mkdtemp(prefix="looprl-bench-ingest-"))
    try:
        if args.bootstrap is None:
            broker = EmbeddedBroker().start()
        bootstrap = args.bootstrap or broker.bootstrap
        run = uuid.uuid4().hex[:8]
        topics = {"responses": f"bench.responses.{run}", "feedback": f"bench.feedback.{run}", "dlq": f"bench.dlq.{run}"}
        ensure_topics(bootstrap, {t: args.partitions for t in topics.values()})
        n = args.events
        events = make_events(n)
        mb = sum(len(v) for _, _, v in events) / 2**20
        print(f"broker {bootstrap} ({'embedded Tansu' if broker else 'external'}), {n} events, {mb:.1f} MiB, "
              f"{args.partitions} partitions per topic")
        dt = produce(bootstrap, topics, events)
        print(f"produced {n} events in {dt:.2f}s ({n / dt:,.0f}/s, confluent producer)")
        del events
        both = [topics["responses"], topics["feedback"]]
        figures: dict[str, float] = {}
        t = raw_kafka_python(bootstrap, both, n, args.timeout)
        figures["raw_kafka_python_eps"] = n / t
        print(f"raw kafka-python consumption: {n / t:>10,.0f} events/s  (baseline)")
        t = raw_confluent(bootstrap, both, n, args.timeout)
        figures["raw_confluent_eps"] = n / t
        print(f"raw confluent consumption:    {n / t:>10,.0f} events/s  ({figures['raw_confluent_eps'] / figures['raw_kafka_python_eps']:.2f}x)")
        for client in ("kafka-python", "confluent"):
            t, stored = looprl_ingest(bootstrap, topics, n, client, work, args.batch, args.timeout)
            if stored != n:
                raise SystemExit(f"looprl ingest ({client}) stored {stored} events, expected {n}")
            key = "ingest_" + client.replace("-", "_") + "_eps"
            figures[key] = n / t
            print(f"looprl ingest ({client + '):':<14} {n / t:>10,.0f} events/s  "
                  f"({figures[key] / figures['raw_kafka_python_eps']:.2f}x raw kafka-python; {stored} stored, Parquet+fsync)")
        base = figures["raw_kafka_python_eps"]
        result = {
            "events": n, "partitions": args.partitions, "batch_max_events": args.batch,
            **{k: round(v) for k, v in figures.items()},
            "ratio_raw_confluent": round(figures["raw_confluent_eps"] / base, 3),
            "ratio_ingest_kafka_python": round(figures["ingest_kafka_python_eps"] / base, 3),
            "ratio_ingest_confluent": round(figures["ingest_confluent_eps"] / base, 3),
            "goal_met": figures["ingest_confluent_eps"] / base >= 0.8 and figures["ingest_confluent_eps"] >= 30_000,
        }
        print(f"goal (default client confluent: >= 0.8x raw kafka-python and >= 30,000/s): "
              f"{'met' if result['goal_met'] else 'NOT met'}")
        print(json.dumps(result))
        return 0
    finally:
        if broker is not None:
            broker.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
