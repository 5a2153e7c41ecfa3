"""Prometheus helpers shared by every stage.

Metric names follow ``looprl_<stage>_<what>_<unit>``; labels are bounded (kinds, reasons,
status codes, never ids). Each process serves its registry on its own port with
``serve_metrics(port)``; HTTP servers (serving, collector) may instead mount ``metrics_app()``.

Short jobs (a PPO run, a gate, one reward update) end before Prometheus would scrape them: they
push their final metrics to a Pushgateway instead (``push_metrics``, ``pushed_when_done``), which
Prometheus scrapes with ``honor_labels``.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator

from prometheus_client import REGISTRY, CollectorRegistry, Counter, make_asgi_app, push_to_gateway, start_http_server
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_fixed

from looprl.ops.core.config import ConfigError
from looprl.ops.core.listen import url_of
from looprl.ops.core.log import get_logger

log = get_logger(__name__)

PUSH_FAILURES = Counter("looprl_metrics_push_failures_total", "Pushes to the Pushgateway that failed", ["job"])


def serve_metrics(port: int, registry: CollectorRegistry = REGISTRY, host: str = "127.0.0.1",
                  key: str = "the metrics port", wait_s: float = 0.0) -> int:
    """Start the /metrics HTTP server in a daemon thread; port 0 picks a free port, as every looprl
    port does (``looprl.ops.core.listen``). Logs "metrics listening" with the port bound; a port
    that cannot be bound is a ``ConfigError`` naming ``key``. Returns the port.

    ``wait_s``: how long a port in use may take to come free. A scheduler job starts on a warm
    worker moments after the job before it, whose server held the same port, ended."""
    in_use = retry_if_exception(lambda e: isinstance(e, OSError) and e.errno == errno.EADDRINUSE)
    retrying = Retrying(stop=stop_after_delay(wait_s), wait=wait_fixed(0.1), retry=in_use, reraise=True)
    try:
        server, _thread = retrying(start_http_server, port, addr=host, registry=registry)
    except OSError as e:
        raise ConfigError(f"cannot serve metrics on {host}:{port} ({e.strerror or e}): set {key} to a free "
                          "port, or 0 for any free port") from None
    if retrying.statistics.get("attempt_number", 1) > 1:  # how often the wait is needed, and how long
        log.info("metrics port came free", port=port, waited_s=round(retrying.statistics["delay_since_first_attempt"], 2))
    bound = server.server_address[1]
    log.info("metrics listening", url=url_of(host, bound, "/metrics"), port=bound)
    return bound


def metrics_app(registry: CollectorRegistry = REGISTRY):
    """An ASGI app serving /metrics, to mount inside a FastAPI server."""
    return make_asgi_app(registry=registry)


class _Prefixed:
    """The metric families of ``registry`` whose names start with ``prefix``: a job pushes its
    looprl metrics, not its interpreter's (``process_*``, ``python_gc_*``)."""

    def __init__(self, registry: CollectorRegistry, prefix: str):
        self.registry, self.prefix = registry, prefix

    def collect(self):
        return [f for f in self.registry.collect() if f.name.startswith(self.prefix)]


def push_metrics(url: str, job: str, *, instance: str, timeout: float = 5.0,
                 registry: CollectorRegistry = REGISTRY, prefix: str = "looprl_") -> bool:
    """Replace the Pushgateway group ``{job, instance}`` at ``url`` with this process's metrics
    (HTTP PUT, text exposition format). Never raises: a failure is logged and counted, and False
    returned, because a job whose work is done must not fail for its metrics."""
    try:
        push_to_gateway(url, job=job, registry=_Prefixed(registry, prefix), grouping_key={"instance": instance},
                        timeout=timeout)
    except Exception as e:  # unreachable, refused, rejected (e.g. a metric type clash): all the same here
        PUSH_FAILURES.labels(job=job).inc()
        log.warning("metrics push failed; the job's final metrics are not in Prometheus", pushgateway=url, job=job,
                    error=f"{type(e).__name__}: {e}"[:300])
        return False
    log.info("metrics pushed", pushgateway=url, job=job, instance=instance)
    return True


@contextlib.contextmanager
def pushed_when_done(url: str | None, job: str, *, instance: str, timeout: float = 5.0,
                     registry: CollectorRegistry = REGISTRY) -> Iterator[None]:
    """Run the block, then push the metrics to ``url`` (None: no push) however the block ended:
    a failed job's failure counters are its final metrics too. The block's exception propagates."""
    try:
        yield
    finally:
        if url:
            push_metrics(url, job, instance=instance, timeout=timeout, registry=registry)
