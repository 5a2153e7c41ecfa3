"""Kafka fixtures: one real embedded broker (Tansu, in memory) per test session.

``kafka_bootstrap`` is its ``host:port``; it is started once, waited for until it accepts
connections *and* answers metadata, and stopped at the end of the session. Set
``LOOPRL_TEST_KAFKA_BOOTSTRAP`` to run the same tests against another Kafka (e.g. Apache Kafka).
Tests share the broker, so each uses its own topics and consumer groups (``kafka_topics``).
"""

from __future__ import annotations

import os
import uuid

import pytest


def pytest_configure(config):
    # kafka-python 3 loads its protocol schemas with deprecated importlib.resources calls: noise.
    config.addinivalue_line("filterwarnings", "ignore:read_text is deprecated:DeprecationWarning")
    config.addinivalue_line("filterwarnings", "ignore:open_text is deprecated:DeprecationWarning")


# looprl's Kafka modules are imported inside the fixtures: this plugin is imported before
# pytest_configure above installs those filters, so a module-level import would report the noise.
@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    external = os.environ.get("LOOPRL_TEST_KAFKA_BOOTSTRAP")
    if external:
        from looprl.ingest.transport import wait_for_broker

        wait_for_broker(external, timeout=30)
        yield external
        return
    from looprl.ingest.broker import EmbeddedBroker

    broker = EmbeddedBroker().start(timeout=60)
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture
def kafka_topics() -> dict[str, str]:
    """Unique topic names (``kafka.*`` config keys) and a unique ingest group for one test."""
    run = uuid.uuid4().hex[:10]
    return {"topic_feedback": f"test.feedback.{run}", "topic_responses": f"test.responses.{run}",
            "topic_dlq": f"test.dlq.{run}", "group_id": f"test-ingest-{run}"}


def ingest_config(tmp_path, bootstrap: str, topics: dict[str, str], **ingest):
    """A config for an ingest test: its own workspace, topics and group; short Kafka timeouts."""
    from looprl.ops.core.config import load_config

    kafka = {k: v for k, v in topics.items() if k.startswith("topic_")}
    return load_config(environ={}, workspace=tmp_path / "ws",
                       kafka={"bootstrap_servers": bootstrap, "session_timeout_ms": 3000,
                              "heartbeat_interval_ms": 1000, **kafka},
                       ingest={"group_id": topics["group_id"], "metrics_port": 0, "batch_max_seconds": 0.3,
                               **ingest})


def ingest_env(cfg) -> dict[str, str]:
    """LOOPRL_* environment for a `looprl ingest consume` subprocess with the same config as ``cfg``."""
    k, i = cfg.kafka, cfg.ingest
    return {
        **{n: v for n, v in os.environ.items() if not n.startswith("LOOPRL_")},
        "LOOPRL_WORKSPACE": str(cfg.workspace),
        "LOOPRL_KAFKA__BOOTSTRAP_SERVERS": k.bootstrap_servers,
        "LOOPRL_KAFKA__TOPIC_FEEDBACK": k.topic_feedback,
        "LOOPRL_KAFKA__TOPIC_RESPONSES": k.topic_responses,
        "LOOPRL_KAFKA__TOPIC_DLQ": k.topic_dlq,
        "LOOPRL_KAFKA__SESSION_TIMEOUT_MS": str(k.session_timeout_ms),
        "LOOPRL_KAFKA__HEARTBEAT_INTERVAL_MS": str(k.heartbeat_interval_ms),
        "LOOPRL_KAFKA__CLIENT": k.client,
        "LOOPRL_INGEST__GROUP_ID": i.group_id,
        "LOOPRL_INGEST__METRICS_PORT": "0",
        "LOOPRL_INGEST__BATCH_MAX_SECONDS": str(i.batch_max_seconds),
        "LOOPRL_INGEST__BATCH_MAX_EVENTS": str(i.batch_max_events),
        "PYTHONUNBUFFERED": "1",
    }
