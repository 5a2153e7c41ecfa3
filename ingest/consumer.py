"""`looprl ingest consume`: Kafka (responses + feedback topics) -> the Parquet event log, exactly once.

Delivery is at-least-once and writes are idempotent:

1. poll a batch (``ingest.batch_max_events`` records or ``ingest.batch_max_seconds``);
2. validate each record; invalid ones go to the dead-letter topic with the original bytes and
   headers ``looprl-reason``/``looprl-detail``/``looprl-source-*`` (input never crashes the loop);
3. drop events whose ``event_id`` is already stored (producer resends, replays after a crash);
4. write one Parquet part per kind: temp file, fsync, atomic rename, directory fsync;
5. wait until the dead-letter records are acknowledged;
6. only then commit the offsets.

A crash (SIGKILL) anywhere before 6 replays the batch after restart: events already in Parquet
are found in the dedupe index, which is reloaded from the newest part files at start (and on
every partition assignment, for scaled-out consumers), so each event is stored exactly once.
Dead-lettered records may be re-sent to the DLQ after such a crash (at-least-once there).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from looprl.ingest import metrics as m
from looprl.ingest.decode import Columns, decode
from looprl.ingest.schema import InvalidEvent
from looprl.ingest.transport import Consumer, Producer, Record, ensure_topics, make_consumer, make_producer, wait_for_broker
from looprl.ops.core.config import LooprlConfig
from looprl.ops.core.log import get_logger
from looprl.ops.core.signals import stop_on_signals
from looprl.storage.parts import PartWriter, clean_temp, recent_event_ids

log = get_logger(__name__)

_POLL_CHUNK = 10_000
_DETAIL_MAX = 500


class IngestError(RuntimeError):
    """An infrastructure failure that must not be committed past (e.g. the DLQ did not ack)."""


class DedupeIndex:
    """Event ids already in the log, oldest evicted first beyond ``max_ids``."""

    def __init__(self, events_dir: Path, max_ids: int):
        self.events_dir = events_dir
        self.max_ids = max_ids
        self._ids: dict[str, None] = {}
        self._files: set[Path] = set()

    def __contains__(self, event_id: str) -> bool:
        return event_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def load(self) -> int:
        """Read the ids of part files not seen yet (newest first, up to ``max_ids``)."""
        found = list(recent_event_ids(self.events_dir, self.max_ids, skip=self._files))
        n = 0
        for path, ids in reversed(found):  # oldest first, so eviction drops the oldest
            self._files.add(path)
            self.add(ids)
            n += len(ids)
        m.DEDUPE_IDS.set(len(self._ids))
        return n

    def add(self, ids, files: list[Path] = ()) -> None:
        self._ids.update(dict.fromkeys(ids))
        self._files.update(files)
        over = len(self._ids) - self.max_ids
        if over > 0:
            it = iter(self._ids)
            for k in [next(it) for _ in range(over)]:
                del self._ids[k]
        m.DEDUPE_IDS.set(len(self._ids))


@dataclass
class BatchResult:
    records: int = 0
    stored: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    dead: dict[str, int] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    committed: bool = False


@dataclass
class Totals:
    records: int = 0
    stored: int = 0
    duplicates: int = 0
    dead: int = 0
    batches: int = 0

    def add(self, r: BatchResult) -> None:
        self.records += r.records
        self.stored += sum(r.stored.values())
        self.duplicates += r.duplicates
        self.dead += sum(r.dead.values())
        self.batches += 1


class IngestConsumer:
    """The consumer loop. ``consumer``/``dlq`` may be injected (tests); by default they are made
    with ``cfg.kafka.client`` against ``bootstrap``."""

    def __init__(self, cfg: LooprlConfig, bootstrap: str, *, consumer: Consumer | None = None,
                 dlq: Producer | None = None, group_id: str | None = None):
        self.cfg = cfg
        self.bootstrap = bootstrap
        self.topics = [cfg.kafka.topic_responses, cfg.kafka.topic_feedback]
        self.group_id = group_id or cfg.ingest.group_id
        self._consumer = consumer
        self._dlq = dlq
        self.writer = PartWriter(cfg.events_dir)
        self.dedupe = DedupeIndex(cfg.events_dir, max(cfg.ingest.dedupe_max_ids, 2 * cfg.ingest.batch_max_events))
        self.totals = Totals()
        self._pending: list[Record] = []
        self._last_lag = 0.0
        self._assigned_at: float | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self, broker_timeout: float = 60.0) -> "IngestConsumer":
        k = self.cfg.kafka
        self.cfg.events_dir.mkdir(parents=True, exist_ok=True)
        removed = clean_temp(self.cfg.events_dir)
        loaded = self.dedupe.load()
        log.info("dedupe index loaded", ids=loaded, temp_files_removed=removed)
        if self._consumer is None:
            wait_for_broker(self.bootstrap, timeout=broker_timeout)
            ensure_topics(self.bootstrap, {t: k.topic_partitions for t in (*self.topics, k.topic_dlq)})
            self._consumer = make_consumer(
                self.bootstrap, k.client, group_id=self.group_id, session_timeout_ms=k.session_timeout_ms,
                heartbeat_interval_ms=k.heartbeat_interval_ms)
        if self._dlq is None:
            self._dlq = make_producer(self.bootstrap, k.client, client_id="looprl-ingest-dlq")
        self._consumer.subscribe(self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke)
        log.info("ingest started", bootstrap=self.bootstrap, topics=self.topics, group_id=self.group_id,
                 client=k.client, events_dir=str(self.cfg.events_dir))
        return self

    def close(self) -> None:
        if self._consumer is not None:
            try:
                self._consumer.close()
            except Exception as e:
                log.warning("consumer close failed", error=str(e)[:200])
        if self._dlq is not None:
            self._dlq.close()

    def _on_assign(self, parts: list[tuple[str, int]]) -> None:
        # Another ingest process may have written these partitions' events: learn their ids.
        self._assigned_at = time.monotonic()
        n = self.dedupe.load()
        log.info("partitions assigned", partitions=len(parts), new_dedupe_ids=n)

    def _on_revoke(self, parts: list[tuple[str, int]]) -> None:
        # Finish what we hold before the partitions move, so the new owner starts after it.
        if self._pending:
            batch, self._pending = self._pending, []
            self.process(batch)
        log.info("partitions revoked", partitions=len(parts))

    # ------------------------------------------------------------------ the loop
    def poll_batch(self, stop: threading.Event) -> list[Record]:
        ing = self.cfg.ingest
        deadline: float | None = None
        assert self._consumer is not None
        while not stop.is_set():
            room = ing.batch_max_events - len(self._pending)
            if room <= 0:
                break
            now = time.monotonic()
            # confluent's consume() waits the whole timeout unless the batch fills: keep ticks short
            tick = min(0.2, ing.batch_max_seconds)
            timeout = tick if deadline is None else max(0.0, min(tick, deadline - now))
            recs = self._consumer.poll(min(room, _POLL_CHUNK), timeout)
            m.HEARTBEAT.set(time.time())
            if recs:
                self._pending.extend(recs)
                if deadline is None:
                    deadline = time.monotonic() + ing.batch_max_seconds
            elif deadline is None and not self._pending:
                return []  # idle: give the caller a turn
            if deadline is not None and time.monotonic() >= deadline:
                break
        batch, self._pending = self._pending, []
        return batch

    def process(self, records: list[Record]) -> BatchResult:
        """Validate, dedupe, write durably, dead-letter, then commit ``records``."""
        ing, k = self.cfg.ingest, self.cfg.kafka
        assert self._dlq is not None and self._consumer is not None
        res = BatchResult(records=len(records))
        cols: dict[str, Columns] = {}
        offsets: dict[tuple[str, int], int] = {}
        batch_ids: set[str] = set()
        dead: list[tuple[Record, str, str]] = []
        dedupe = self.dedupe
        for r in records:
            tp = (r.topic, r.partition)
            if offsets.get(tp, -1) <= r.offset:
                offsets[tp] = r.offset + 1
            try:
                ev = decode(r.value, ing.max_event_bytes, ing.max_text_chars)
            except InvalidEvent as e:
                dead.append((r, e.reason, e.detail))
                continue
            except Exception as e:  # never crash on input, whatever it is
                dead.append((r, "invalid_fields", f"{type(e).__name__}: {e}"))
                continue
            eid = str(ev.event_id)
            if eid in dedupe or eid in batch_ids:
                res.duplicates += 1
                continue
            batch_ids.add(eid)
            c = cols.get(ev.kind)
            if c is None:
                c = cols[ev.kind] = Columns(ev.kind)
            c.append(ev, eid, r.topic, r.partition, r.offset)

        failures: list[Exception] = []
        for r, reason, detail in dead:
            headers = [("looprl-reason", reason.encode()), ("looprl-detail", detail[:_DETAIL_MAX].encode("utf-8", "replace")),
                       ("looprl-source-topic", r.topic.encode()), ("looprl-source-partition", str(r.partition).encode()),
                       ("looprl-source-offset", str(r.offset).encode())]
            self._dlq.send(k.topic_dlq, r.value, key=r.key, headers=headers,
                           on_delivery=lambda err: err is not None and failures.append(err))
            res.dead[reason] = res.dead.get(reason, 0) + 1

        if cols:
            t0 = time.perf_counter()
            ingested_at = datetime.now(timezone.utc)
            res.files = self.writer.write_batch({kind: c.table(ingested_at) for kind, c in cols.items()}, ingested_at)
            m.BATCH_WRITE.observe(time.perf_counter() - t0)
            dedupe.add(batch_ids, res.files)
            res.stored = {kind: len(c) for kind, c in cols.items()}
            m.LAST_BATCH.set(time.time())

        if dead:
            remaining = self._dlq.flush(30.0)
            if remaining or failures:
                raise IngestError(f"dead-letter topic {k.topic_dlq} did not acknowledge {remaining + len(failures)} "
                                  f"record(s) ({failures[:1]}); not committing")

        try:
            self._consumer.commit(offsets)
            res.committed = True
            m.COMMITS.labels(outcome="ok").inc()
            m.OFFSETS_COMMITTED.inc(len(records))
        except Exception as e:  # e.g. a rebalance: the batch is durable, a replay is deduped
            m.COMMITS.labels(outcome="failed").inc()
            log.warning("offset commit failed; the batch will be replayed and deduplicated", error=str(e)[:300])

        for kind, n in res.stored.items():
            m.EVENTS.labels(kind=kind).inc(n)
        for reason, n in res.dead.items():
            m.DEAD_LETTERS.labels(reason=reason).inc(n)
        if res.duplicates:
            m.DUPLICATES.inc(res.duplicates)
        m.BATCH_EVENTS.observe(len(records))
        self.totals.add(res)
        if dead:
            log.info("dead-lettered", **{f"reason_{r}": n for r, n in res.dead.items()})
        return res

    def _update_lag(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last_lag > 5.0:
            self._last_lag = now
            lag = self._consumer.lag() if self._consumer is not None else None
            if lag is not None:
                m.LAG.set(lag)

    def run(self, stop: threading.Event | None = None, idle_exit_s: float | None = None,
            max_records: int | None = None) -> Totals:
        """Consume until ``stop`` is set (finishing and committing the batch in hand), or until
        idle for ``idle_exit_s`` seconds, or after ``max_records`` records."""
        stop = stop or threading.Event()
        started = last_batch = time.monotonic()
        while not stop.is_set():
            batch = self.poll_batch(stop)
            if batch:
                r = self.process(batch)
                last_batch = time.monotonic()
                log.debug("batch", records=r.records, stored=r.stored, duplicates=r.duplicates, dead=r.dead)
                self._update_lag(force=True)
            else:
                self._update_lag()
                # Idle counts from the partition assignment (a group join takes seconds); without
                # any assignment give up after a minute.
                since = max(last_batch, self._assigned_at or started)
                limit = idle_exit_s if self._assigned_at else max(idle_exit_s or 0.0, 60.0)
                if idle_exit_s is not None and time.monotonic() - since >= limit:
                    break
            if max_records is not None and self.totals.records >= max_records:
                break
        if self._pending:  # stopped while holding records: make them durable and commit
            batch, self._pending = self._pending, []
            self.process(batch)
        return self.totals


def run_ingest(cfg: LooprlConfig, bootstrap: str, idle_exit_s: float | None = None,
               max_records: int | None = None, stop: threading.Event | None = None) -> Totals:
    """``looprl ingest consume``: SIGTERM/SIGINT stop it cleanly after the current batch is committed."""
    with stop_on_signals(stop) as stop:
        consumer = IngestConsumer(cfg, bootstrap).start()
        t0 = time.monotonic()
        try:
            totals = consumer.run(stop, idle_exit_s=idle_exit_s, max_records=max_records)
        finally:
            consumer.close()
    log.info("ingest stopped", seconds=round(time.monotonic() - t0, 1), records=totals.records, stored=totals.stored,
             duplicates=totals.duplicates, dead_lettered=totals.dead)
    return totals
