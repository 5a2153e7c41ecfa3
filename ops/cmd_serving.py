"""`looprl serving ...`: the serving stage.

- ``looprl serving serve``: the embedded OpenAI-compatible server with runtime LoRA hot-swap.
- ``looprl serving control``: the adapter controller: applies the registry's
  ``promoted``/``canary`` pointers to every endpoint in ``serving.endpoints`` (embedded servers
  or vLLM); ``--once`` runs one pass and prints its report as JSON (exit 0 if all endpoints
  converged, 1 otherwise).
- ``looprl serving gateway`` (also ``looprl gateway``): the OpenAI-compatible proxy product
  backends call instead of vLLM: canary routing, version attribution, response logging
  (``looprl.serving.gateway``).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from looprl.ops.core.config import LooprlConfig
from looprl.ops.core.metrics import serve_metrics
from looprl.ops.core.signals import stop_on_signals


def _serve(args: argparse.Namespace, cfg: LooprlConfig) -> int:
    from looprl.serving.server import serve

    try:
        return serve(cfg, host=args.host, port=args.port)
    except (FileNotFoundError, ValueError) as e:  # no base model yet, a tokenizer without pad/eos
        print(f"looprl serving serve: {e}", file=sys.stderr)
        return 2


def _control(args: argparse.Namespace, cfg: LooprlConfig) -> int:
    from looprl.serving.controller import AdapterController

    ctl = AdapterController(cfg, endpoints=args.endpoint or None)
    try:
        if args.once:
            report = ctl.reconcile()
            print(json.dumps(asdict(report), indent=2, default=str))
            return 0 if report.converged else 1
        serve_metrics(cfg.serving.controller_metrics_port, host=cfg.metrics_host,
                      key="serving.controller_metrics_port")
        with stop_on_signals() as stop:
            ctl.run(stop)
        return 0
    finally:
        ctl.close()


def _gateway(args: argparse.Namespace, cfg: LooprlConfig) -> int:
    from looprl.ops.core.config import ConfigError
    from looprl.serving.gateway import serve_gateway

    try:
        return serve_gateway(cfg, host=args.host, port=args.port)
    except (ConfigError, ValueError) as e:  # no upstream, a public address without client tokens
        print(f"looprl gateway: {e}", file=sys.stderr)
        return 2


def _gateway_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=None, help="bind address (default: gateway.host)")
    p.add_argument("--port", type=int, default=None, help="port (default: gateway.port; 0 = a free port, logged at "
                                                          "start)")
    p.set_defaults(func=_gateway)


GATEWAY_HELP = ("run the OpenAI-compatible gateway in front of vLLM or `looprl serving serve`: canary routing, "
                "version attribution, response logging")


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("serving", help="the serving tier: OpenAI-compatible server and adapter controller")
    acts = g.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = acts.add_parser("serve", help="run the embedded OpenAI-compatible server (LoRA hot-swap, canary routing)")
    p.add_argument("--host", default=None, help="bind address (default: serving.host)")
    p.add_argument("--port", type=int, default=None, help="port (default: serving.port; 0 = a free port, logged at "
                                                          "start)")
    p.set_defaults(func=_serve)

    c = acts.add_parser("control", help="the adapter controller: apply registry pointers promoted/canary to the "
                                        "serving endpoints")
    c.add_argument("--once", action="store_true", help="one reconcile pass, print the report as JSON")
    c.add_argument("--endpoint", action="append", help="endpoint URL (repeatable; default: serving.endpoints)")
    c.set_defaults(func=_control)

    _gateway_options(acts.add_parser("gateway", help=GATEWAY_HELP))
    # What product backends talk to, so also a top-level command: `looprl gateway`.
    _gateway_options(sub.add_parser("gateway", help=GATEWAY_HELP))
