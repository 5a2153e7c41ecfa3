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
    """A TCP socket bound to ``host:port`` and listening (0: a free port; read it with ``getsockname()``).
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
    # Listening now, before uvicorn starts: the port is logged as listening at once, and a client
    # reading that line was refused until uvicorn's own listen() (a CI failure in tests/test_ports.py).
    # Connections wait in the backlog; uvicorn's listen() later only sets the same backlog again.
    sock.listen(2048)
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


class HttpThread:
    """An ASGI app served by uvicorn in a background thread on a socket bound at construction
    (``port`` 0: a free port, then ``self.port``): the in-process servers of tests, benchmarks and
    the demo's embedded parts. ``on_stop`` runs after the server has stopped."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, *, name: str, lifespan: str = "auto",
                 key: str = "port", on_stop: Any = None):
        import uvicorn

        self.name = name
        self._sock = bind_socket(host, port, key)
        self.host, self.port = host, self._sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan=lifespan,
                                                    timeout_graceful_shutdown=5))
        self._on_stop = on_stop
        self._thread: Any = None

    @property
    def url(self) -> str:
        return url_of(self.host, self.port)

    def start(self, timeout: float = 30.0) -> "HttpThread":
        import threading
        import time

        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                        name=self.name, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} on {self.url} did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self._sock.close()
        if self._on_stop is not None:
            self._on_stop()

    def __enter__(self) -> "HttpThread":
        return self if self._thread is not None else self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
