"""The Kafka client seam: one small interface over kafka-python and confluent-kafka.

Everything in looprl that talks to Kafka goes through ``make_producer``, ``make_consumer`` and
``ensure_topics`` so the client library is a config choice (``kafka.client``):

- ``confluent`` (librdkafka): non-blocking sends, ~10x faster consumption; the default.
- ``kafka-python``: pure Python, no native code.

Only behaviour that real Apache Kafka and the embedded Tansu broker share is used. Tansu 0.6
quirks designed around (measured): the idempotent producer fails (we disable it: duplicates
from producer retries are removed by the consumer's event-id dedupe); ListOffsets LATEST is
wrong, so ``auto_offset_reset`` is always ``earliest`` and the lag gauge is approximate on
Tansu; a group join takes about half the session timeout (keep ``kafka.session_timeout_ms`` small);
CreatePartitions fails, so topics are created once with a fixed partition count.

Security (TLS, SASL) is one ``KafkaSecurity`` (``kafka.security_*``, ``KafkaConfig.security(role)``)
that every constructor here takes as ``security=`` and ``security_options`` maps onto the client
library: None is PLAINTEXT, what the embedded broker speaks.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal, NamedTuple, Protocol

import confluent_kafka
from kafka import ConsumerRebalanceListener, KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import (
    InvalidRecordError, KafkaError, MessageSizeTooLargeError, RecordListTooLargeError, TopicAlreadyExistsError,
)
from kafka.structs import OffsetAndMetadata

from looprl.ops.core.config import KafkaSecurity
from looprl.ops.core.log import get_logger

log = get_logger(__name__)

ClientName = Literal["kafka-python", "confluent"]
DeliveryCallback = Callable[[Exception | None], None]
PartitionsCallback = Callable[[list[tuple[str, int]]], None]


class KafkaUnavailable(RuntimeError):
    """The broker cannot be reached (or did not answer metadata) within the timeout."""


class DeliveryFailed(RuntimeError):
    """One message was not acknowledged by the broker. ``reason`` is the client's error text;
    ``permanent``: the message itself is refused (too large, invalid record), so sending the same
    bytes again can never succeed, unlike a timeout or an unreachable broker."""

    def __init__(self, reason: str, permanent: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent


# Refusals of one message for what it is, by the client's own check or by the broker.
_PERMANENT_CODES = frozenset({
    confluent_kafka.KafkaError.MSG_SIZE_TOO_LARGE, confluent_kafka.KafkaError.INVALID_MSG_SIZE,
    confluent_kafka.KafkaError.RECORD_LIST_TOO_LARGE, confluent_kafka.KafkaError.INVALID_RECORD,
})
_PERMANENT_ERRORS = (MessageSizeTooLargeError, RecordListTooLargeError, InvalidRecordError)


def _confluent_failure(err: confluent_kafka.KafkaError) -> DeliveryFailed:
    return DeliveryFailed(str(err), permanent=err.code() in _PERMANENT_CODES)


def _kafka_python_failure(e: Exception) -> DeliveryFailed:
    return DeliveryFailed(f"{type(e).__name__}: {e}", permanent=isinstance(e, _PERMANENT_ERRORS))


class Record(NamedTuple):
    topic: str
    partition: int
    offset: int
    value: bytes | None
    key: bytes | None


# --------------------------------------------------------------------------- helpers
def parse_servers(bootstrap: str) -> list[tuple[str, int]]:
    """``"host:port,host2:port2"`` -> [(host, port), ...]; a clear error names a bad entry."""
    out = []
    for part in bootstrap.split(","):
        part = part.strip()
        host, sep, port = part.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"kafka.bootstrap_servers: {part!r} is not host:port")
        out.append((host.strip("[]"), int(port)))
    if not out:
        raise ValueError("kafka.bootstrap_servers is empty")
    return out


def tcp_reachable(bootstrap: str, timeout: float = 1.0) -> bool:
    for host, port in parse_servers(bootstrap):
        try:
            with socket.create_connection((host, port), timeout=timeout):
                return True
        except OSError:
            continue
    return False


# Each setting of a KafkaSecurity, as kafka-python's keyword argument and as librdkafka's property
# (confluent). Kafka-python names SCRAM credentials sasl_plain_* too.
_SECURITY_OPTION_NAMES: dict[str, dict[str, str]] = {
    "kafka-python": {"protocol": "security_protocol", "mechanism": "sasl_mechanism",
                     "username": "sasl_plain_username", "password": "sasl_plain_password", "cafile": "ssl_cafile"},
    "confluent": {"protocol": "security.protocol", "mechanism": "sasl.mechanism",
                  "username": "sasl.username", "password": "sasl.password", "cafile": "ssl.ca.location"},
}


def security_options(security: KafkaSecurity | None, client: ClientName) -> dict[str, Any]:
    """``security`` (None: PLAINTEXT) as the constructor options of ``client``: kafka-python keyword
    arguments or librdkafka properties, only the settings that are set. Every producer, consumer
    and admin client of this module takes its security options from here. The password leaves its
    ``SecretStr`` only into the client's own configuration."""
    names = _SECURITY_OPTION_NAMES.get(client)
    if names is None:
        raise ValueError(f"kafka.client: unknown client {client!r} (expected 'confluent' or 'kafka-python')")
    s = security if security is not None else KafkaSecurity()
    values = {"protocol": s.protocol, "mechanism": s.mechanism, "username": s.username,
              "password": None if s.password is None else s.password.get_secret_value(),
              "cafile": None if s.cafile is None else str(s.cafile)}
    return {names[k]: v for k, v in values.items() if v is not None}


def _quiet_kafka_python() -> None:
    # kafka-python logs every refused connection at ERROR; our own logs say what matters.
    logging.getLogger("kafka").setLevel(logging.CRITICAL)


def _rdkafka_logger() -> logging.Logger:
    lg = logging.getLogger("looprl.ingest.rdkafka")
    lg.setLevel(logging.ERROR)
    return lg


def _admin(bootstrap: str, timeout: float, security: KafkaSecurity | None = None):
    _quiet_kafka_python()
    try:
        return KafkaAdminClient(bootstrap_servers=bootstrap, client_id="looprl-admin",
                                request_timeout_ms=int(max(timeout, 1.0) * 1000),
                                **security_options(security, "kafka-python"))
    except KafkaError as e:
        raise KafkaUnavailable(f"Kafka at {bootstrap} is not reachable: {e}") from None


def wait_for_broker(bootstrap: str, timeout: float = 30.0, *, security: KafkaSecurity | None = None) -> list[str]:
    """Wait until the broker accepts connections *and* answers metadata; returns its topics."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if tcp_reachable(bootstrap, timeout=0.5):
            try:
                admin = _admin(bootstrap, min(5.0, max(deadline - time.monotonic(), 1.0)), security)
                try:
                    return list(admin.list_topics())
                finally:
                    admin.close()
            except Exception as e:  # not ready yet: metadata not served
                last = e
        time.sleep(0.1)
    raise KafkaUnavailable(f"Kafka at {bootstrap} did not answer metadata within {timeout:.0f}s ({last})")


def ensure_topics(bootstrap: str, topics: dict[str, int], timeout: float = 15.0, *,
                  security: KafkaSecurity | None = None) -> list[str]:
    """Create the missing topics with a fixed partition count (replication 1 on a single broker,
    else min(3, brokers)). Existing topics are kept as they are. Returns the names created."""
    admin = _admin(bootstrap, timeout, security)
    created = []
    try:
        existing = set(admin.list_topics())
        try:
            brokers = len(admin.describe_cluster().get("brokers", [])) or 1
        except Exception:  # not every broker implements DescribeCluster; one replica is always valid
            brokers = 1
        replication = min(3, brokers)
        for name, partitions in topics.items():
            if name in existing:
                continue
            try:
                admin.create_topics([NewTopic(name, partitions, replication)])
                created.append(name)
            except TopicAlreadyExistsError:  # created concurrently by another process
                pass
    finally:
        admin.close()
    if created:
        log.info("topics created", topics=created, partitions=sorted(set(topics[t] for t in created)))
    return created


# --------------------------------------------------------------------------- producer
class Producer(Protocol):
    def send(self, topic: str, value: bytes, key: bytes | None = None,
             headers: list[tuple[str, bytes]] | None = None, on_delivery: DeliveryCallback | None = None) -> None: ...

    def flush(self, timeout: float) -> int: ...

    def close(self, timeout: float = 5.0) -> None: ...


@dataclass
class ProducerOptions:
    linger_ms: int = 5
    # A message not acknowledged within this time fails (on_delivery gets the error).
    delivery_timeout_ms: int = 30_000
    acks: str = "all"
    client_id: str = "looprl"
    max_request_bytes: int = 2 * 1024 * 1024


class _ConfluentProducer:
    """librdkafka producer; a daemon thread serves delivery callbacks (librdkafka needs poll)."""

    def __init__(self, bootstrap: str, opts: ProducerOptions, security: KafkaSecurity | None = None):
        self._p = confluent_kafka.Producer({
            "bootstrap.servers": bootstrap,
            "client.id": opts.client_id,
            "acks": opts.acks,
            "linger.ms": opts.linger_ms,
            "enable.idempotence": False,  # Tansu 0.6 fails InitProducerId; consumers dedupe by event_id
            "message.timeout.ms": opts.delivery_timeout_ms,
            "message.max.bytes": opts.max_request_bytes,
            "queue.buffering.max.messages": 200_000,
            "logger": _rdkafka_logger(),
            **security_options(security, "confluent"),
        })
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="looprl-producer-poll", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed.is_set():
            self._p.poll(0.05)

    def send(self, topic, value, key=None, headers=None, on_delivery=None) -> None:
        cb = None
        if on_delivery is not None:
            def cb(err, _msg, _f=on_delivery):
                _f(_confluent_failure(err) if err is not None else None)
        deadline = time.monotonic() + 10.0
        while True:
            try:
                self._p.produce(topic, value=value, key=key, headers=headers, on_delivery=cb)
                return
            except BufferError:
                # Local queue full: wait for deliveries (bounded), then fail this message loudly.
                if time.monotonic() > deadline:
                    if on_delivery is not None:
                        on_delivery(DeliveryFailed("local producer queue full"))
                        return
                    raise
                self._p.poll(0.05)
            except confluent_kafka.KafkaException as e:  # e.g. message too large: a per-message failure
                if on_delivery is None:
                    raise
                err = e.args[0] if e.args else None
                on_delivery(_confluent_failure(err) if isinstance(err, confluent_kafka.KafkaError)
                            else DeliveryFailed(str(e)))
                return
            except Exception as e:
                if on_delivery is None:
                    raise
                on_delivery(DeliveryFailed(f"{type(e).__name__}: {e}"))
                return

    def flush(self, timeout: float) -> int:
        return int(self._p.flush(timeout))

    def close(self, timeout: float = 5.0) -> None:
        try:
            self._p.flush(timeout)
        finally:
            self._closed.set()
            self._thread.join(timeout=2)


class _KafkaPythonProducer:
    """kafka-python producer. Its ``send`` can block (metadata, bootstrap), so a worker thread
    calls it: our ``send`` only enqueues, and an unreachable broker turns into per-message
    delivery failures instead of a blocked caller or an exception in the constructor."""

    def __init__(self, bootstrap: str, opts: ProducerOptions, security: KafkaSecurity | None = None):
        self._bootstrap = bootstrap
        self._opts = opts
        self._security = security
        self._p = None
        self._q: queue.Queue = queue.Queue()
        self._inflight = 0
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._work, name="looprl-kafka-python-send", daemon=True)
        self._thread.start()

    def _producer(self):
        if self._p is None:
            _quiet_kafka_python()
            o = self._opts
            self._p = KafkaProducer(
                bootstrap_servers=self._bootstrap, client_id=o.client_id, acks=o.acks,
                linger_ms=o.linger_ms, enable_idempotence=False, delivery_timeout_ms=o.delivery_timeout_ms,
                # kafka-python requires delivery_timeout_ms > linger_ms + request_timeout_ms
                request_timeout_ms=max(500, min(30_000, o.delivery_timeout_ms - o.linger_ms - 1)),
                max_block_ms=o.delivery_timeout_ms, bootstrap_timeout_ms=min(o.delivery_timeout_ms, 30_000),
                max_request_size=o.max_request_bytes, **security_options(self._security, "kafka-python"))
        return self._p

    def _done(self, on_delivery, err) -> None:
        if on_delivery is not None:
            try:
                on_delivery(err)
            except Exception as e:
                log.warning("delivery callback raised", error=str(e)[:200])
        with self._cv:
            self._inflight -= 1
            self._cv.notify_all()

    def _work(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            topic, value, key, headers, on_delivery = item
            try:
                fut = self._producer().send(topic, value=value, key=key, headers=headers)
            except Exception as e:  # no broker, metadata timeout, message too large, ...
                err = _kafka_python_failure(e)
                self._done(on_delivery, err)
                if self._p is None:  # could not even connect: fail what is queued now, not one by one
                    while True:
                        try:
                            nxt = self._q.get_nowait()
                        except queue.Empty:
                            break
                        if nxt is None:
                            return
                        self._done(nxt[4], err)
                continue
            fut.add_callback(lambda _md, cb=on_delivery: self._done(cb, None))
            fut.add_errback(lambda e, cb=on_delivery: self._done(cb, _kafka_python_failure(e)))

    def send(self, topic, value, key=None, headers=None, on_delivery=None) -> None:
        with self._cv:
            self._inflight += 1
        self._q.put((topic, value, key, headers, on_delivery))

    def flush(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._inflight > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(min(left, 0.05))
            return self._inflight

    def close(self, timeout: float = 5.0) -> None:
        self.flush(timeout)
        self._q.put(None)
        self._thread.join(timeout=timeout)
        if self._p is not None:
            self._p.close(timeout=timeout)


def make_producer(bootstrap: str, client: ClientName = "confluent", *, security: KafkaSecurity | None = None,
                  **options) -> Producer:
    opts = ProducerOptions(**options)
    if client == "confluent":
        return _ConfluentProducer(bootstrap, opts, security)
    if client == "kafka-python":
        return _KafkaPythonProducer(bootstrap, opts, security)
    raise ValueError(f"kafka.client: unknown client {client!r} (expected 'confluent' or 'kafka-python')")


# --------------------------------------------------------------------------- consumer
class Consumer(Protocol):
    def subscribe(self, topics: list[str], on_assign: PartitionsCallback | None = None,
                  on_revoke: PartitionsCallback | None = None) -> None: ...

    def poll(self, max_records: int, timeout: float) -> list[Record]: ...

    def commit(self, offsets: dict[tuple[str, int], int]) -> None: ...

    def lag(self) -> int | None: ...

    def close(self) -> None: ...


@dataclass
class ConsumerOptions:
    group_id: str
    session_timeout_ms: int = 6000
    heartbeat_interval_ms: int = 2000
    client_id: str = "looprl-ingest"
    max_poll_interval_ms: int = 300_000
    fetch_max_bytes: int = 16 * 1024 * 1024
    # How long the broker may hold a fetch waiting for data: the floor of end-to-end latency.
    fetch_wait_max_ms: int = 100


class _ConfluentConsumer:
    def __init__(self, bootstrap: str, opts: ConsumerOptions, security: KafkaSecurity | None = None):
        self._c = confluent_kafka.Consumer({
            "bootstrap.servers": bootstrap,
            "group.id": opts.group_id,
            "client.id": opts.client_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            # LATEST is unreliable on Tansu; a new group reads the topic from its start.
            "auto.offset.reset": "earliest",
            "session.timeout.ms": opts.session_timeout_ms,
            "heartbeat.interval.ms": opts.heartbeat_interval_ms,
            "max.poll.interval.ms": opts.max_poll_interval_ms,
            "fetch.max.bytes": opts.fetch_max_bytes,
            "fetch.wait.max.ms": opts.fetch_wait_max_ms,
            "enable.partition.eof": False,
            "logger": _rdkafka_logger(),
            **security_options(security, "confluent"),
        })
        self._assigned: set[tuple[str, int]] = set()

    def subscribe(self, topics, on_assign=None, on_revoke=None) -> None:
        def assigned(_c, parts):
            self._assigned |= {(p.topic, p.partition) for p in parts}
            if on_assign:
                on_assign([(p.topic, p.partition) for p in parts])

        def revoked(_c, parts):
            if on_revoke:
                on_revoke([(p.topic, p.partition) for p in parts])
            self._assigned -= {(p.topic, p.partition) for p in parts}

        self._c.subscribe(topics, on_assign=assigned, on_revoke=revoked, on_lost=revoked)

    def poll(self, max_records: int, timeout: float) -> list[Record]:
        msgs = self._c.consume(max_records, timeout)
        out = []
        append = out.append
        for m in msgs:
            err = m.error()
            if err is not None:
                # Transient broker/partition errors are reported in-band; librdkafka retries.
                if not err.retriable() and err.fatal():
                    raise KafkaUnavailable(f"fatal consumer error: {err}")
                log.warning("consumer error", error=str(err))
                continue
            append(Record(m.topic(), m.partition(), m.offset(), m.value(), m.key()))
        return out

    def commit(self, offsets: dict[tuple[str, int], int]) -> None:
        if offsets:
            self._c.commit(offsets=[confluent_kafka.TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                           asynchronous=False)

    def lag(self) -> int | None:
        if not self._assigned or self._c is None:
            return None
        total = 0
        try:
            parts = self._c.position([confluent_kafka.TopicPartition(t, p) for t, p in self._assigned])
            for tp in parts:
                _low, high = self._c.get_watermark_offsets(tp, cached=True)
                if high is None or high < 0 or tp.offset < 0:
                    continue
                total += max(0, high - tp.offset)
        except Exception:  # lag is observability only
            return None
        return total

    def close(self) -> None:
        # Tansu 0.6 leaves a group stuck for minutes if a member sends LeaveGroup while its join
        # is still pending; a member that never got partitions just goes away (its session expires).
        if self._assigned:
            self._c.close()
        # else: drop the handle without LeaveGroup (librdkafka is destroyed with it)
        self._c = None


class _KafkaPythonConsumer:
    def __init__(self, bootstrap: str, opts: ConsumerOptions, security: KafkaSecurity | None = None):
        _quiet_kafka_python()
        try:
            self._c = KafkaConsumer(
                bootstrap_servers=bootstrap, group_id=opts.group_id, client_id=opts.client_id,
                enable_auto_commit=False, auto_offset_reset="earliest",
                session_timeout_ms=opts.session_timeout_ms, heartbeat_interval_ms=opts.heartbeat_interval_ms,
                max_poll_interval_ms=opts.max_poll_interval_ms, fetch_max_bytes=opts.fetch_max_bytes,
                fetch_max_wait_ms=opts.fetch_wait_max_ms,
                max_partition_fetch_bytes=opts.fetch_max_bytes, **security_options(security, "kafka-python"))
        except KafkaError as e:
            raise KafkaUnavailable(f"Kafka at {bootstrap} is not reachable: {e}") from None

    def subscribe(self, topics, on_assign=None, on_revoke=None) -> None:
        class _Listener(ConsumerRebalanceListener):
            def on_partitions_revoked(self, revoked):
                if on_revoke and revoked:
                    on_revoke([(tp.topic, tp.partition) for tp in revoked])

            def on_partitions_assigned(self, assigned):
                if on_assign and assigned:
                    on_assign([(tp.topic, tp.partition) for tp in assigned])

        self._c.subscribe(topics, listener=_Listener())

    def poll(self, max_records: int, timeout: float) -> list[Record]:
        batches = self._c.poll(timeout_ms=int(timeout * 1000), max_records=max_records)
        out = []
        for recs in batches.values():
            out.extend(Record(r.topic, r.partition, r.offset, r.value, r.key) for r in recs)
        return out

    def commit(self, offsets: dict[tuple[str, int], int]) -> None:
        if offsets:
            self._c.commit({TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in offsets.items()})

    def lag(self) -> int | None:
        total, known = 0, False
        try:
            for tp in self._c.assignment():
                high = self._c.highwater(tp)  # from fetch responses, not ListOffsets
                if high is None:
                    continue
                total += max(0, high - self._c.position(tp, timeout_ms=100))
                known = True
        except Exception:
            return None
        return total if known else None

    def close(self) -> None:
        if self._c.assignment():  # see _ConfluentConsumer.close: never leave mid-join
            self._c.close(autocommit=False)


def make_consumer(bootstrap: str, client: ClientName = "confluent", *, security: KafkaSecurity | None = None,
                  **options) -> Consumer:
    opts = ConsumerOptions(**options)
    if client == "confluent":
        return _ConfluentConsumer(bootstrap, opts, security)
    if client == "kafka-python":
        return _KafkaPythonConsumer(bootstrap, opts, security)
    raise ValueError(f"kafka.client: unknown client {client!r} (expected 'confluent' or 'kafka-python')")


def topic_partitions(bootstrap: str, topics: Iterable[str], timeout: float = 10.0, *,
                     security: KafkaSecurity | None = None) -> dict[str, int]:
    """Partition count of each existing topic (for tools and tests)."""
    admin = _admin(bootstrap, timeout, security)
    try:
        out = {}
        for t in admin.describe_topics(list(topics)):
            if not t.get("error_code"):
                out[t["name"]] = len(t["partitions"])
        return out
    finally:
        admin.close()
