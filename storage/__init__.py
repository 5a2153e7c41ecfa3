"""looprl.storage: the Parquet event log, its DuckDB views, and the versioned model registry."""
