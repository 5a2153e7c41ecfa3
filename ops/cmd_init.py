"""`looprl init [--force] [--quiet]`: create the workspace layout and build the tiny MoE base into
``cfg.base_path``. On a workspace that has a base model it does nothing unless ``--force``."""

from __future__ import annotations

import argparse

from rich.console import Console

from looprl.ops.core.config import LooprlConfig

WORKSPACE_DIRS = ("events", "registry", "state", "ray", "reports")


def _init(args: argparse.Namespace, cfg: LooprlConfig) -> int:
    from looprl.ops.sim.base import create_base
    from looprl.policy.model import base_checksum

    console = Console(stderr=True)
    ws = cfg.workspace
    base = cfg.base_path
    for name in WORKSPACE_DIRS:
        (ws / name).mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]workspace[/] {ws.resolve()}: {', '.join(d + '/' for d in WORKSPACE_DIRS)} ready")
    if (base / "config.json").is_file() and not args.force:
        console.print(f"[bold]base model[/] {base} exists (checksum {base_checksum(base)[:12]}); nothing to do "
                      "(use --force to rebuild)")
        return 0
    if cfg.model.base_path is not None and not args.force and base.exists():
        console.print(f"[red]model.base_path {base} exists but has no config.json; refusing to overwrite (use --force)")
        return 2
    console.print(f"[bold]base model[/] building {cfg.model.family} "
                  f"(hidden {cfg.model.hidden_size}, {cfg.model.num_layers} layers, {cfg.model.num_experts} experts, "
                  f"top-{cfg.model.experts_per_token}), pre-training {cfg.model.pretrain_steps} steps ...")
    out = create_base(cfg, progress=not args.quiet)
    console.print(f"[bold green]base model ready[/] {out} (checksum {base_checksum(out)[:12]})")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="create the workspace and build the tiny MoE base model (idempotent)")
    p.add_argument("--force", action="store_true", help="rebuild the base model even if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_init)
