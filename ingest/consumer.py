"""`looprl ingest consume`: Kafka (responses + feedback topics) -> the Parquet event log, exactly once.

Delivery is at-least-once and writes are idempotent:

1. poll a batch (``ingest.batch_max_events`` records or ``ingest.batch_max_seconds``);
2. validate each record (``ts`` within ``ingest.ts_max_past_s``/``ts_max_future_s`` of now); invalid
   ones go to the dead-letter topic with the original bytes (cut to ``ingest.dlq_max_bytes``) and
   headers ``looprl-reason``/``looprl-detail``/``looprl-source-*`` (input never crashes the loop);
3. drop events whose ``event_id`` is already stored (producer resends, replays after a crash);
4. write one Parquet part per kind: temp file, fsync, atomic rename, directory fsync;
5. wait until the dead-letter records are acknowledged; one the DLQ refuses for what it is (over
   the broker's size limit) is sent again without its value, and one refused even so is skipped
   (``looprl_ingest_dlq_skipped_total``): a bad record never holds back the others' commit;
6. only then commit the offsets.

A crash (SIGKILL) anywhere before 6 replays the batch after restart: events already in Parquet
are found in the dedupe index, which is reloaded from the newest part files at start (and on
every partition assignment, for scaled-out consumers), so each event is stored exactly once.
Dead-lettered records may be re-sent to the DLQ after such a crash (at-least-once there).

Each topic carries its own kinds: responses only from ``kafka.topic_responses`` (the serving tier or
gateway), feedback only from ``kafka.topic_feedback``; anything else is dead-lettered (``wrong_topic``).
Feedback about a response the log does not hold is stored and waits for it; once
``ingest.orphan_timeout_seconds`` have passed without it, a periodic sweep sends a copy to the DLQ
(``orphan_feedback``, naming the missing id). The event stays in the log, where the views leave it
unresolved (it trains nothing and counts in no canary) unless its response does turn up.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from looprl.ingest import metrics as m
from looprl.ingest.decode import Columns, decode
from looprl.ingest.schema import InvalidEvent, TsWindow, check_ts
from looprl.ingest.transport import Consumer, Producer, Record, ensure_topics, make_consumer, make_producer, wait_for_broker
from looprl.ops.core.config import LooprlConfig
from looprl.ops.core.locks import LockHeld, try_lock
from looprl.ops.core.log import get_logger
from looprl.ops.core.signals import stop_on_signals
from looprl.storage.events import EventLog
from looprl.storage.parts import PartWriter, clean_temp, recent_event_ids
from looprl.storage.registry import atomic_write_text

log = get_logger(__name__)

_POLL_CHUNK = 10_000
_DETAIL_MAX = 500
# Producers key records by event id; a longer key is junk, and its prefix is enough to find it.
_DLQ_KEY_MAX = 1024
# Columns the log adds to an event (not part of it): left out of an orphan's DLQ copy.
_STORAGE_COLUMNS = frozenset({"ingested_at", "kafka_topic", "kafka_partition", "kafka_offset", "missing"})


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
    # invalid records the DLQ refused even without their value: counted, logged, committed past
    skipped: dict[str, int] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    committed: bool = False


@dataclass
class Totals:
    records: int = 0
    stored: int = 0
    duplicates: int = 0
    dead: int = 0
    skipped: int = 0
    batches: int = 0

    def add(self, r: BatchResult) -> None:
        self.records += r.records
        self.stored += sum(r.stored.values())
        self.duplicates += r.duplicates
        self.dead += sum(r.dead.values())
        self.skipped += sum(r.skipped.values())
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
        self.ts_window = TsWindow(cfg.ingest.ts_max_past_s, cfg.ingest.ts_max_future_s)
        self._sweep_state = cfg.state_dir / "ingest" / "orphan_sweep.json"
        self._sweep_every = max(1.0, min(60.0, cfg.ingest.orphan_timeout_seconds / 4))
        self._next_sweep = 0.0
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
        security = k.security("ingest")  # reads both topics, writes the DLQ, commits its group
        if self._consumer is None:
            wait_for_broker(self.bootstrap, timeout=broker_timeout, security=security)
            ensure_topics(self.bootstrap, {t: k.topic_partitions for t in (*self.topics, k.topic_dlq)},
                          security=security)
            self._consumer = make_consumer(
                self.bootstrap, k.client, security=security, group_id=self.group_id,
                session_timeout_ms=k.session_timeout_ms, heartbeat_interval_ms=k.heartbeat_interval_ms)
        if self._dlq is None:
            self._dlq = make_producer(self.bootstrap, k.client, security=security, client_id="looprl-ingest-dlq")
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
        ing = self.cfg.ingest
        assert self._dlq is not None and self._consumer is not None
        res = BatchResult(records=len(records))
        now = datetime.now(timezone.utc)
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
                check_ts(ev.ts, self.ts_window, now)
                self._check_topic(ev.kind, r.topic)
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

        refusals = self._send_dead(dead)  # before the write: the acknowledgements come meanwhile

        if cols:
            t0 = time.perf_counter()
            ingested_at = datetime.now(timezone.utc)
            res.files = self.writer.write_batch({kind: c.table(ingested_at) for kind, c in cols.items()}, ingested_at)
            m.BATCH_WRITE.observe(time.perf_counter() - t0)
            dedupe.add(batch_ids, res.files)
            res.stored = {kind: len(c) for kind, c in cols.items()}
            m.LAST_BATCH.set(time.time())

        if dead:
            skipped = self._finish_dead(dead, refusals)
            for i, (_r, reason, _detail) in enumerate(dead):
                counts = res.skipped if i in skipped else res.dead
                counts[reason] = counts.get(reason, 0) + 1

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
        for reason, n in res.skipped.items():
            m.DLQ_SKIPPED.labels(reason=reason).inc(n)
        if res.duplicates:
            m.DUPLICATES.inc(res.duplicates)
        m.BATCH_EVENTS.observe(len(records))
        self.totals.add(res)
        if dead:
            log.info("dead-lettered", **{f"reason_{r}": n for r, n in res.dead.items()})
        return res

    def _send_dead(self, dead: list[tuple[Record, str, str]],
                   stubs: dict[int, Exception] | None = None) -> dict[int, Exception]:
        """Send ``dead`` (record, reason, detail) to the DLQ, or only the indexes in ``stubs`` (each
        with the DLQ's refusal of its full copy) as stubs without the value. Returns the failures
        by index, filled in as the acknowledgements arrive."""
        failures: dict[int, Exception] = {}
        limit = self.cfg.ingest.dlq_max_bytes
        for i in (range(len(dead)) if stubs is None else stubs):
            r, reason, detail = dead[i]
            refusal = None if stubs is None else stubs[i]
            value, key = r.value, r.key
            headers = [("looprl-reason", reason.encode()), ("looprl-detail", detail[:_DETAIL_MAX].encode("utf-8", "replace")),
                       ("looprl-source-topic", r.topic.encode()), ("looprl-source-partition", str(r.partition).encode()),
                       ("looprl-source-offset", str(r.offset).encode())]
            if value is not None and (refusal is not None or len(value) > limit):
                headers += [("looprl-original-bytes", str(len(value)).encode()),
                            ("looprl-original-sha256", hashlib.sha256(value).hexdigest().encode())]
                value = None if refusal is not None else value[:limit]
            if refusal is not None:
                headers.append(("looprl-dlq-error", str(refusal)[:_DETAIL_MAX].encode("utf-8", "replace")))
            if key is not None and len(key) > _DLQ_KEY_MAX:
                key = key[:_DLQ_KEY_MAX]
            self._dlq.send(self.cfg.kafka.topic_dlq, value, key=key, headers=headers,
                           on_delivery=lambda err, i=i: err is not None and failures.__setitem__(i, err))
        return failures

    def _finish_dead(self, dead: list[tuple[Record, str, str]], failures: dict[int, Exception]) -> set[int]:
        """Wait for the DLQ's acknowledgements of ``dead``. A record refused for what it is (over
        the broker's size limit) is sent again as a stub; one refused even so is logged and
        skipped. Returns the indexes skipped. Anything else unacknowledged (timeout, broker down)
        raises ``IngestError``: the batch is not committed and will be replayed."""
        refused = self._await_dead(len(dead), failures)
        if not refused:
            return set()
        stub_failures = self._send_dead(dead, {i: failures[i] for i in refused})
        skipped = self._await_dead(len(refused), stub_failures)
        for i in sorted(skipped):
            r, reason, _detail = dead[i]
            log.error("the dead-letter topic refused a record even without its value; skipped", reason=reason,
                      source_topic=r.topic, source_partition=r.partition, source_offset=r.offset,
                      error=str(stub_failures[i])[:300])
        return skipped

    def _await_dead(self, sent: int, failures: dict[int, Exception]) -> set[int]:
        """Flush the DLQ; returns the indexes refused for what the record is, raises ``IngestError``
        for any other failure."""
        remaining = self._dlq.flush(30.0)
        transient = [e for e in failures.values() if not getattr(e, "permanent", False)]
        if remaining or transient:
            raise IngestError(f"dead-letter topic {self.cfg.kafka.topic_dlq} did not acknowledge "
                              f"{remaining + len(transient)} of {sent} record(s) ({transient[:1]}); not committing")
        return set(failures)

    def _check_topic(self, kind: str, topic: str) -> None:
        k = self.cfg.kafka
        if (kind == "response") != (topic == k.topic_responses):
            raise InvalidEvent("wrong_topic", f"kind={kind!r} on topic {topic}: responses are accepted only "
                                              f"from {k.topic_responses} (the serving tier), feedback only from "
                                              f"{k.topic_feedback}")

    # ------------------------------------------------------------------ orphan feedback
    def sweep_orphans(self, now: datetime | None = None) -> int:
        """Dead-letter (reason ``orphan_feedback``), once, the feedback stored more than
        ``ingest.orphan_timeout_seconds`` before ``now`` whose response is still not in the log.
        A watermark in ``<state>/ingest/orphan_sweep.json`` (advanced once the DLQ acknowledged)
        says how far the sweeps got; a lock lets one consumer of a scaled-out group sweep at a time.
        Returns how many were dead-lettered."""
        assert self._dlq is not None
        timeout = self.cfg.ingest.orphan_timeout_seconds
        until = (now or datetime.now(timezone.utc)) - timedelta(seconds=timeout)
        try:
            lock = try_lock(self._sweep_state.with_suffix(".lock"))
        except LockHeld:
            return 0
        try:
            after = self._swept_until()
            if after is not None and until <= after:
                return 0
            dead = [self._orphan_record(row, timeout) for row in EventLog(self.cfg.events_dir).orphans(after, until)]
            skipped = self._finish_dead(dead, self._send_dead(dead)) if dead else set()
            atomic_write_text(self._sweep_state, json.dumps({"swept_until": until.isoformat()}))
        finally:
            lock.release()
        sent = len(dead) - len(skipped)
        if dead:
            m.DEAD_LETTERS.labels(reason="orphan_feedback").inc(sent)
            if skipped:
                m.DLQ_SKIPPED.labels(reason="orphan_feedback").inc(len(skipped))
            log.info("orphan feedback dead-lettered", events=sent, timeout_seconds=timeout)
        return sent

    def _swept_until(self) -> datetime | None:
        if not self._sweep_state.is_file():
            return None
        return datetime.fromisoformat(json.loads(self._sweep_state.read_text())["swept_until"])

    def _orphan_record(self, row: dict, timeout: float) -> tuple[Record, str, str]:
        """A stored orphan as the DLQ's (record, reason, detail): the event as stored (JSON, keyed
        by its id) with the Kafka coordinates it was read from."""
        event = {k: v for k, v in row.items() if v is not None and k not in _STORAGE_COLUMNS}
        value = json.dumps(event, separators=(",", ":"), default=datetime.isoformat).encode()
        topic, partition, offset = row["kafka_topic"], row["kafka_partition"], row["kafka_offset"]
        rec = Record(topic or self.cfg.kafka.topic_feedback, -1 if partition is None else partition,
                     -1 if offset is None else offset, value, row["event_id"].encode())
        return rec, "orphan_feedback", (f"{row['missing']} not in the log {timeout:g} s after this feedback was "
                                        "stored (ingest.orphan_timeout_seconds)")

    def _maybe_sweep(self) -> None:
        if time.monotonic() < self._next_sweep:
            return
        self._next_sweep = time.monotonic() + self._sweep_every
        try:
            self.sweep_orphans()
        except Exception as e:  # e.g. the DLQ unreachable: the watermark stays, the next sweep retries
            log.warning("orphan feedback sweep failed", error=str(e)[:300])

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
            self._maybe_sweep()
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
