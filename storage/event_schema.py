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
    ],
    "thumbs": [pa.field("response_id", pa.string(), nullable=False), pa.field("up", pa.bool_(), nullable=False)],
    "rating": [pa.field("response_id", pa.string(), nullable=False), pa.field("rating", pa.int32(), nullable=False)],
    "correction": [pa.field("response_id", pa.string(), nullable=False),
                   pa.field("corrected", pa.string(), nullable=False)],
    "preference": [
        pa.field("chosen_response_id", pa.string()),
        pa.field("rejected_response_id", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("chosen_text", pa.string()),
        pa.field("rejected_text", pa.string()),
    ],
}

SCHEMAS: dict[str, pa.Schema] = {kind: pa.schema(COMMON + fields) for kind, fields in KIND_FIELDS.items()}
KINDS = tuple(SCHEMAS)

_DUCKDB_TYPES = {
    pa.string(): "VARCHAR", pa.int16(): "SMALLINT", pa.int32(): "INTEGER", pa.int64(): "BIGINT",
    pa.bool_(): "BOOLEAN", TS: "TIMESTAMPTZ",
}


def duckdb_type(t: pa.DataType) -> str:
    return _DUCKDB_TYPES[t]
