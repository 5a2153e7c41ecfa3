"""looprl.ingest: the event schema, the producer SDK, the HTTP collector, the Kafka consumer
that writes events exactly once into the Parquet log, and the embedded broker."""
