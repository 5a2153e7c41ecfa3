"""`looprl init` (workspace + base model) and `looprl reward ...` (the reward-model updater).

- ``looprl init [--force]``: create the workspace layout and build the tiny MoE base into
  ``cfg.base_path``; on an existing workspace it does nothing unless ``--force``.
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

from looprl.ops.core.config import LooprlConfig

WORKSPACE_DIRS = ("events", "registry", "state", "ray", "reports")


def _init(args: argparse.Namespace, cfg: LooprlConfig) -> int:
    from rich.console import Console

    console = Console(stderr=True)
    ws = cfg.workspace
    base = cfg.base_path
    for name in WORKSPACE_DIRS:
        (ws / name).mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]workspace[/] {ws.resolve()}: {', '.join(d + '/' for d in WORKSPACE_DIRS)} ready")
    if (base / "config.json").is_file() and not args.force:
        from looprl.policy.model import base_checksum

        console.print(f"[bold]base model[/] {base} exists (checksum {base_checksum(base)[:12]}); nothing to do "
                      "(use --force to rebuild)")
        return 0
    if cfg.model.base_path is not None and not args.force and base.exists():
        console.print(f"[red]model.base_path {base} exists but has no config.json; refusing to overwrite (use --force)")
        return 2
    from looprl.policy.model import base_checksum, create_base

    console.print(f"[bold]base model[/] building {cfg.model.family} "
                  f"(hidden {cfg.model.hidden_size}, {cfg.model.num_layers} layers, {cfg.model.num_experts} experts, "
                  f"top-{cfg.model.experts_per_token}), pre-training {cfg.model.pretrain_steps} steps ...")
    out = create_base(cfg, progress=not args.quiet)
    console.print(f"[bold green]base model ready[/] {out} (checksum {base_checksum(out)[:12]})")
    return 0


def _user_errors() -> tuple[type[Exception], ...]:
    """What an updater command reports in one line (no traceback): the fix is the user's."""
    from looprl.reward.updater import UpdaterBusy
    from looprl.storage.registry import RegistryError  # RewardModelError is one

    return FileNotFoundError, RegistryError, UpdaterBusy


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
    p = sub.add_parser("init", help="create the workspace and build the tiny MoE base model (idempotent)")
    p.add_argument("--force", action="store_true", help="rebuild the base model even if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_init)

    r = sub.add_parser("reward", help="the incremental reward-model updater")
    rs = r.add_subparsers(dest="reward_command", metavar="SUBCOMMAND", required=True)
    u = rs.add_parser("update", help="one incremental update on the new feedback (test-then-train, gated publish)")
    u.add_argument("--force", action="store_true", help="update even with fewer than reward.min_new_events new events")
    u.add_argument("--quiet", action="store_true", help="no progress bar")
    u.set_defaults(func=_update)
    s = rs.add_parser("serve", help="follow the event log and update continuously (metrics on reward.metrics_port)")
    s.add_argument("--max-updates", type=int, default=None, help="stop after this many updates (default: run forever)")
    s.add_argument("--metrics-port", type=int, default=None, help="override reward.metrics_port (0: any free port)")
    s.set_defaults(func=_serve)
    st = rs.add_parser("status", help="published reward versions, watermark and recent decisions")
    st.set_defaults(func=_status)
