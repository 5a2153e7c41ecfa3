"""The argv of a `looprl` subcommand, for every process that starts one (the demo's services, the
scheduler's jobs): this interpreter and ``-m``, so it works in a venv whose ``bin`` is not on PATH.
And ``pushes_metrics``: the short jobs' commands push their final metrics to a Pushgateway."""

from __future__ import annotations

import functools
import sys

from looprl.ops.core.metrics import pushed_when_done

CLI_MODULE = "looprl.ops.cli"


def looprl_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", CLI_MODULE, *args]


def pushes_metrics(job: str):
    """Decorate a short job's command (``func(args, cfg) -> int``) so that, however it ends, its
    final metrics go to the Pushgateway (``metrics.pushgateway_url``) as group ``{job, instance}``:
    Prometheus never scrapes a process that ends before its next scrape."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(args, cfg):
            m = cfg.metrics
            with pushed_when_done(m.pushgateway_url, job, instance=m.push_instance, timeout=m.push_timeout_seconds):
                return fn(args, cfg)

        return run

    return wrap
