"""Prometheus helpers shared by every stage.

Metric names follow ``looprl_<stage>_<what>_<unit>``; labels are bounded (kinds, reasons,
status codes, never ids). Each process serves its registry on its own port with
``serve_metrics(port)``; HTTP servers (serving, collector) may instead mount ``metrics_app()``.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, make_asgi_app, start_http_server


def serve_metrics(port: int, registry: CollectorRegistry = REGISTRY, host: str = "127.0.0.1") -> int:
    """Start the /metrics HTTP server in a daemon thread; port 0 picks a free port. Returns the port."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server.server_address[1]


def metrics_app(registry: CollectorRegistry = REGISTRY):
    """An ASGI app serving /metrics, to mount inside a FastAPI server."""
    return make_asgi_app(registry=registry)
