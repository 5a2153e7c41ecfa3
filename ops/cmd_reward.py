"""`looprl reward ...`: the reward-model updater.

- ``looprl reward update``: one incremental update (new events + replay), test-then-train,
  publish if not worse on the held-out set.
- ``looprl reward serve``: the long-lived updater: polls the event log every
  ``reward.poll_seconds`` and exports metrics on ``reward.metrics_port``.
- ``looprl reward status``: the published versions, the watermark and the last decisions.
"""

from __future__ import annotations

import argparse
import json
import sys

from looprl.ops.commands import pushes_metrics
from looprl.ops.core.config import LooprlConfig


def _user_errors() -> tuple[type[Exception], ...]:
    """What an updater command reports in one line (no traceback): the fix is the user's."""
    from looprl.policy.families import BaseModelError  # an unsupported or corrupt base checkpoint
    from looprl.reward.updater import UpdaterBusy
    from looprl.storage.registry import RegistryError  # RewardModelError is one

    return FileNotFoundError, RegistryError, UpdaterBusy, BaseModelError


@pushes_metrics("looprl-reward-update")
def _update(args: argparse.Namespace, cfg: LooprlConfig) -> int:
    from looprl.reward.updater import RewardUpdater

    try:
        with RewardUpdater(cfg) as up:
            result = up.update(progress=not args.quiet, force=args.force)
    except _user_errors() as e:
        print(f"looprl reward update: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result.model_dump(mode="json") if result else {"status": "no new events"}, indent=2))
    return 0


def _serve(args: argparse.Namespace, cfg: LooprlConfig) -> int:
    from looprl.reward.updater import serve

    try:
        serve(cfg, max_updates=args.max_updates, metrics_port=args.metrics_port)
    except _user_errors() as e:
        print(f"looprl reward serve: {e}", file=sys.stderr)
        return 2
    return 0


def _status(args: argparse.Namespace, cfg: LooprlConfig) -> int:
    from looprl.reward.updater import status

    print(json.dumps(status(cfg), indent=2, default=str))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("reward", help="the incremental reward-model updater")
    rs = r.add_subparsers(dest="action", metavar="ACTION", required=True)
    u = rs.add_parser("update", help="one incremental update on the new feedback (test-then-train, gated publish)")
    u.add_argument("--force", action="store_true", help="update even with fewer than reward.min_new_events new events")
    u.add_argument("--quiet", action="store_true", help="no progress bar")
    u.set_defaults(func=_update)
    s = rs.add_parser("serve", help="follow the event log and update continuously (metrics on reward.metrics_port)")
    s.add_argument("--max-updates", type=int, default=None, help="stop after this many updates (default: run forever)")
    s.add_argument("--metrics-port", type=int, default=None, help="override reward.metrics_port (0 = a free port, logged at start)")
    s.set_defaults(func=_serve)
    st = rs.add_parser("status", help="published reward versions, watermark and recent decisions")
    st.set_defaults(func=_status)
