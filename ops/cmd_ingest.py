"""`looprl ingest ...` and `looprl events ...`: the ingest stage and the event log it writes.

    looprl ingest broker                embedded Kafka (Tansu, in memory) in the foreground
    looprl ingest consume               Kafka -> exactly-once Parquet event log (long-lived)
    looprl ingest collect               HTTP feedback collector (POST /v1/feedback)
    looprl events stats [--json]        what the event log holds
    looprl events query "SQL" [--format table|json|csv] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console
from rich.table import Table

from looprl.ops.core.config import ConfigError, LooprlConfig
from looprl.ops.core.metrics import serve_metrics


def _broker(args: argparse.Namespace, cfg: LooprlConfig) -> int:
    from looprl.ingest.broker import BrokerError, run_broker

    try:
        return run_broker(cfg, port=args.port, host=args.host)
    except BrokerError as e:
        print(f"looprl ingest broker: {e}", file=sys.stderr)
        return 1


def _bootstrap(cfg: LooprlConfig) -> str:
    from looprl.ingest.broker import NoBroker, bootstrap_servers
    from looprl.ingest.transport import parse_servers

    try:
        servers = bootstrap_servers(cfg)
        parse_servers(servers)
    except (ValueError, NoBroker) as e:
        raise ConfigError(str(e)) from None
    return servers


def _consume(args: argparse.Namespace, cfg: LooprlConfig) -> int:
    from looprl.ingest.consumer import IngestError, run_ingest
    from looprl.ingest.transport import KafkaUnavailable

    serve_metrics(cfg.ingest.metrics_port, host=cfg.metrics_host, key="ingest.metrics_port")
    try:
        totals = run_ingest(cfg, _bootstrap(cfg), idle_exit_s=args.idle_exit, max_records=args.max_records)
    except (KafkaUnavailable, IngestError) as e:
        print(f"looprl ingest consume: {e}", file=sys.stderr)
        return 1
    print(json.dumps({"records": totals.records, "stored": totals.stored, "duplicates": totals.duplicates,
                      "dead_lettered": totals.dead, "dlq_skipped": totals.skipped, "batches": totals.batches}))
    return 0


def _collect(args: argparse.Namespace, cfg: LooprlConfig) -> int:
    from looprl.ingest.collector import run_collector

    return run_collector(cfg, _bootstrap(cfg), host=args.host, port=args.port)


def _fmt(v) -> str:
    if v is None:
        return ""
    if hasattr(v, "strftime"):
        return v.strftime("%Y-%m-%d %H:%M:%S")  # the views' time zone is UTC
    return str(v)


def _stats(args: argparse.Namespace, cfg: LooprlConfig) -> int:
    from looprl.storage.events import EventLog

    st = EventLog(cfg.events_dir).stats()
    if args.json:
        print(json.dumps(st.as_dict(), indent=2))
        return 0
    t = Table(title=f"event log {cfg.events_dir}")
    for col in ("kind", "events", "files", "MiB", "first ts", "last ts", "last ingested"):
        t.add_column(col, justify="right" if col in ("events", "files", "MiB") else "left")
    for k in st.kinds.values():
        t.add_row(k.kind, str(k.events), str(k.files), f"{k.bytes / 2**20:.2f}", _fmt(k.first_ts), _fmt(k.last_ts),
                  _fmt(k.last_ingested_at))
    t.add_row("total", str(st.total), str(sum(k.files for k in st.kinds.values())),
              f"{sum(k.bytes for k in st.kinds.values()) / 2**20:.2f}", "", "", "")
    con = Console()
    con.print(t)
    con.print(f"feedback whose response is not in the log (yet): {st.feedback_unresolved}")
    return 0


def _query(args: argparse.Namespace, cfg: LooprlConfig) -> int:
    import duckdb

    from looprl.storage.events import VIEWS, EventLog

    try:
        table = EventLog(cfg.events_dir).query(args.sql)
    except duckdb.Error as e:
        print(f"looprl events query: {e}\n(views: {', '.join(VIEWS)})", file=sys.stderr)
        return 2
    shown = table.slice(0, args.limit) if args.limit else table
    if args.format == "json":
        for row in shown.to_pylist():
            print(json.dumps(row, default=str))
    elif args.format == "csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(shown, sys.stdout.buffer)
    else:
        t = Table()
        for name in shown.column_names:
            t.add_column(name)
        for row in shown.to_pylist():
            t.add_row(*(_fmt(v) for v in row.values()))
        Console().print(t)
        if shown.num_rows < table.num_rows:
            print(f"({table.num_rows} rows, {shown.num_rows} shown; --limit 0 shows all)", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("ingest", help="feedback and responses into the Parquet event log: broker, consumer, collector")
    acts = g.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = acts.add_parser("broker", help="run the embedded Kafka broker (Tansu, in memory) in the foreground")
    p.add_argument("--port", type=int, default=None, help="port (default: kafka.embedded_port; 0 = a free port, "
                                                          "printed at start)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1; Tansu speaks PLAINTEXT "
                                                       "without authentication, so keep it on loopback)")
    p.set_defaults(func=_broker)

    p = acts.add_parser("consume", help="consume the responses/feedback topics into the Parquet event log "
                                        "(exactly once)")
    p.add_argument("--idle-exit", type=float, default=None, metavar="SECONDS",
                   help="exit once no record arrived for this long (default: run until SIGTERM/Ctrl-C)")
    p.add_argument("--max-records", type=int, default=None, metavar="N", help="exit after this many records")
    p.set_defaults(func=_consume)

    p = acts.add_parser("collect", help="HTTP feedback collector: POST /v1/feedback -> Kafka")
    p.add_argument("--host", default=None, help="bind address (default: ingest.collector_host)")
    p.add_argument("--port", type=int, default=None, help="port (default: ingest.collector_port; 0 = a free port, "
                                                          "logged at start)")
    p.set_defaults(func=_collect)

    ev = sub.add_parser("events", help="inspect the Parquet event log (DuckDB views)")
    evsub = ev.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = evsub.add_parser("stats", help="events, files and time range per kind")
    p.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    p.set_defaults(func=_stats)
    p = evsub.add_parser("query", help="run SQL over the views responses, feedback, feedback_joined, "
                                       "preferences_joined, feedback_votes, preference_votes")
    p.add_argument("sql", help='a DuckDB query over the views, e.g. "SELECT kind, count(*) FROM feedback GROUP BY 1"')
    p.add_argument("--format", choices=("table", "json", "csv"), default="table",
                   help="table (default), JSON lines or CSV on stdout")
    p.add_argument("--limit", type=int, default=50, help="rows shown (0: all)")
    p.set_defaults(func=_query)
