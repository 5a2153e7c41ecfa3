"""The `looprl` command line.

Each group of subcommands lives in its own ``ops/cmd_<area>.py`` module with a
``register(subparsers)`` function; a subcommand sets ``func(args, cfg) -> int | None``.
This file only wires them together, loads the config once and logs it.
"""

from __future__ import annotations

import argparse
import json
import sys

from looprl.ops import cmd_ingest, cmd_loop, cmd_policy, cmd_reward, cmd_serving
from looprl.ops.core.config import ConfigError, LooprlConfig, load_config
from looprl.ops.core.log import get_logger, setup_logging

COMMAND_MODULES = (cmd_ingest, cmd_reward, cmd_policy, cmd_serving, cmd_loop)


def _print_config(args: argparse.Namespace, cfg: LooprlConfig) -> int:
    print(json.dumps(cfg.redacted(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="looprl",
        description="Continual online RLHF: feedback -> Kafka -> reward model -> LoRA-PPO -> hot-swapped adapters.",
    )
    p.add_argument("--config", help="path to looprl.toml (default: ./looprl.toml or $LOOPRL_CONFIG)")
    p.add_argument("--workspace", help="workspace directory (overrides config 'workspace')")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    c = sub.add_parser("config", help="print the effective config (file + LOOPRL_* env), secrets masked")
    c.set_defaults(func=_print_config)
    for mod in COMMAND_MODULES:
        mod.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        overrides = {"workspace": args.workspace} if args.workspace else {}
        cfg: LooprlConfig = load_config(args.config, **overrides)
    except ConfigError as e:
        print(f"looprl: {e}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level)
    get_logger("ops.cli").info("effective config", command=args.command, config=cfg.redacted())
    try:
        rc = args.func(args, cfg)
    except KeyboardInterrupt:
        return 130
    except ConfigError as e:
        print(f"looprl: {e}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
