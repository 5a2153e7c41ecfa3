"""Prometheus metrics of the ingest stage (consumer, collector, SDK). Labels are bounded: event
kinds, dead-letter reasons (``looprl.ingest.schema.DLQ_REASONS``), HTTP status codes."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# ---- consumer (looprl ingest consume)
EVENTS = Counter("looprl_ingest_events_total", "Events made durable in the Parquet log", ["kind"])
DEAD_LETTERS = Counter("looprl_ingest_dead_letters_total", "Invalid events sent to the dead-letter topic", ["reason"])
DLQ_SKIPPED = Counter("looprl_ingest_dlq_skipped_total",
                      "Invalid events the dead-letter topic refused even without their value (skipped)", ["reason"])
DUPLICATES = Counter("looprl_ingest_duplicates_total", "Events skipped because their event_id was already stored")
BATCH_WRITE = Histogram("looprl_ingest_batch_write_seconds", "Time to make one batch durable (Parquet + fsync)",
                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))
BATCH_EVENTS = Histogram("looprl_ingest_batch_events", "Records per processed batch",
                         buckets=(1, 10, 100, 500, 1000, 2500, 5000, 10000, 25000))
OFFSETS_COMMITTED = Counter("looprl_ingest_offsets_committed_total",
                            "Records whose offsets were committed after their batch was durable")
COMMITS = Counter("looprl_ingest_commits_total", "Offset commits", ["outcome"])
LAG = Gauge("looprl_ingest_consumer_lag_messages",
            "Records behind the partitions' high watermark (approximate on the embedded Tansu broker)")
HEARTBEAT = Gauge("looprl_ingest_heartbeat_timestamp_seconds", "Last iteration of the consumer loop (unix time)")
LAST_BATCH = Gauge("looprl_ingest_last_batch_timestamp_seconds", "When the last batch became durable (unix time)")
DEDUPE_IDS = Gauge("looprl_ingest_dedupe_ids", "Event ids held in the dedupe index")

# ---- HTTP collector (looprl ingest collect)
COLLECTOR_REQUESTS = Counter("looprl_ingest_collector_requests_total", "Collector requests by HTTP status", ["code"])
COLLECTOR_EVENTS = Counter("looprl_ingest_collector_events_total", "Events accepted by the collector", ["kind"])
COLLECTOR_REJECTED = Counter("looprl_ingest_collector_rejected_total", "Events rejected by the collector", ["reason"])

# ---- SDK (FeedbackClient / ResponseLogger, in the producing process)
SDK_SENT = Counter("looprl_ingest_sdk_delivered_total", "Events acknowledged by Kafka", ["topic_role"])
SDK_FAILED = Counter("looprl_ingest_sdk_failed_total", "Events Kafka did not acknowledge", ["topic_role"])
