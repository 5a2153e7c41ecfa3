"""Arrow schemas of the Parquet event log: one table per event kind.

Layout: ``<events_dir>/kind=<kind>/hour=<YYYY-MM-DDTHH>/part-*.parquet``, where ``hour`` is the
UTC hour the batch was *ingested* (made durable), so every batch lands in one directory per kind
and readers can prune by ingestion time. Every row carries the event fields, ``ingested_at``
(when its batch became durable) and the Kafka coordinates it was read from (audit, replay).

Compatibility: a new optional event field is a new nullable column at the end; readers use
``union_by_name`` so old files simply have it NULL.
"""

from __future__ import annotations

import pyarrow as pa

TS = pa.timestamp("us", tz="UTC")

COMMON = [
    pa.field("event_id", pa.string(), nullable=False),
    pa.field("kind", pa.string(), nullable=False),
    pa.field("schema_version", pa.int16(), nullable=False),
    pa.field("ts", TS, nullable=False),
    pa.field("user_id", pa.string()),
    pa.field("ingested_at", TS, nullable=False),
    pa.field("kafka_topic", pa.string()),
    pa.field("kafka_partition", pa.int32()),
    pa.field("kafka_offset", pa.int64()),
]

# Columns of every feedback kind: the free-text comment and the caller's metadata (a JSON object,
# stored as its JSON text). Added after the first parts were written: older parts read them as NULL.
FEEDBACK_EXTRA = [pa.field("comment", pa.string()), pa.field("metadata", pa.string())]

KIND_FIELDS: dict[str, list[pa.Field]] = {
    "response": [
        pa.field("response_id", pa.string(), nullable=False),
        # The prompt as one string (chat messages flattened, see ResponseEvent.prompt_text).
        pa.field("prompt", pa.string()),
        # The chat messages as JSON ([{"role", "content"}]) when the request was a chat.
        pa.field("messages", pa.string()),
        pa.field("completion", pa.string()),
        pa.field("model", pa.string()),
        pa.field("adapter_version", pa.string()),
        # Sampling parameters the client sent, as JSON ({"temperature", "top_p", "max_tokens", ...}).
        pa.field("sampling", pa.string()),
        # The served completion's token ids and their log-probs under the serving policy, when the
        # server reported them (NULL otherwise).
        pa.field("completion_token_ids", pa.list_(pa.int32())),
        pa.field("completion_logprobs", pa.list_(pa.float32())),
    ],
    "thumbs": [pa.field("response_id", pa.string(), nullable=False), pa.field("up", pa.bool_(), nullable=False),
               *FEEDBACK_EXTRA],
    "rating": [pa.field("response_id", pa.string(), nullable=False), pa.field("rating", pa.int32(), nullable=False),
               *FEEDBACK_EXTRA],
    "correction": [pa.field("response_id", pa.string(), nullable=False),
                   pa.field("corrected", pa.string(), nullable=False), *FEEDBACK_EXTRA],
    "preference": [
        pa.field("chosen_response_id", pa.string()),
        pa.field("rejected_response_id", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("chosen_text", pa.string()),
        pa.field("rejected_text", pa.string()),
        *FEEDBACK_EXTRA,
    ],
    # A named score; its value lands in the one column of its type, the other two are NULL.
    "score": [
        pa.field("response_id", pa.string(), nullable=False),
        pa.field("name", pa.string(), nullable=False),
        pa.field("value_number", pa.float64()),
        pa.field("value_bool", pa.bool_()),
        pa.field("value_category", pa.string()),
        *FEEDBACK_EXTRA,
    ],
}

SCHEMAS: dict[str, pa.Schema] = {kind: pa.schema(COMMON + fields) for kind, fields in KIND_FIELDS.items()}
KINDS = tuple(SCHEMAS)

_DUCKDB_TYPES = {
    pa.string(): "VARCHAR", pa.int16(): "SMALLINT", pa.int32(): "INTEGER", pa.int64(): "BIGINT",
    pa.bool_(): "BOOLEAN", pa.float64(): "DOUBLE", TS: "TIMESTAMPTZ", pa.list_(pa.int32()): "INTEGER[]", pa.list_(pa.float32()): "FLOAT[]",
}


def duckdb_type(t: pa.DataType) -> str:
    return _DUCKDB_TYPES[t]
