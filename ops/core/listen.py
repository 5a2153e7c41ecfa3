"""Listening sockets, one rule for every looprl server: port 0 picks a free port, and the port
really bound is logged at start (``"<what> listening"`` with ``url`` and ``port``), so a caller
that asked for 0 reads it from the log.

``bind_socket`` binds before the server starts (a taken port fails here with the config key to
change); ``run_http`` runs an ASGI app on it with uvicorn in the foreground, as ``uvicorn.run``
would (signals, graceful shutdown), for the HTTP servers: serving, collector, gateway. The
/metrics servers go through ``looprl.ops.core.metrics.serve_metrics``, which follows the same rule.
"""

from __future__ import annotations

import socket
import sys
from typing import Any

from looprl.ops.core.config import ConfigError
from looprl.ops.core.log import get_logger

log = get_logger(__name__)

# What uvicorn.run exits with when the app never started (its lifespan startup failed).
STARTUP_FAILURE = 3


def url_of(host: str, port: int, path: str = "") -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}{path}"


def bind_socket(host: str, port: int, key: str = "port") -> socket.socket:
    """A TCP socket bound to ``host:port`` (0: a free port; read it with ``getsockname()``).
    A port that cannot be bound is a ``ConfigError`` naming ``key``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP: asyncio sets TCP_NODELAY only on such sockets (else ~40 ms Nagle stalls).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror or e}): set {key} to a free port, "
                          "or 0 for any free port") from None
    return sock


def run_http(app: Any, host: str, port: int, *, what: str, key: str, path: str = "", lifespan: str = "auto",
             **fields: Any) -> int:
    """Serve ``app`` on ``host:port`` in the foreground until SIGINT/SIGTERM; logs
    ``"<what> listening"`` with the bound port and ``fields``. Returns the port it listened on."""
    import uvicorn

    sock = bind_socket(host, port, key)
    bound = sock.getsockname()[1]
    log.info(f"{what} listening", url=url_of(host, bound, path), port=bound, **fields)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan=lifespan,
                                           timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    if not server.started:
        sys.exit(STARTUP_FAILURE)
    return bound
