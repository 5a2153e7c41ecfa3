"""The `looprl` command line: ``looprl <stage> <action>``.

Each stage's commands live in ``ops/cmd_<area>.py`` with a ``register(subparsers)`` function that
adds the stage with its actions (argparse ``dest="action"``); an action sets
``func(args, cfg) -> int | None``. Command functions import the stage module they run, and its
heavy libraries (torch, duckdb, pyarrow), inside the function, so that ``looprl --help`` and every
command start without loading what they do not use. This file wires the modules together, maps
the spellings from before this scheme to it, loads the config once and logs it.

Global options (``--config``, ``--workspace``, ``--log-level``, ``--log-format``) are accepted
before the command and after any of its words (``looprl serving serve --workspace X`` is
``looprl --workspace X serving serve``); given in both places, the later one wins.
``looprl --version`` reads the installed distributions' metadata and imports none of them.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from typing import get_args

from looprl.ops import cmd_ingest, cmd_init, cmd_loop, cmd_policy, cmd_reward, cmd_serving
from looprl.ops.core.config import ConfigError, LooprlConfig, load_config
from looprl.ops.core.log import get_logger, setup_logging

COMMAND_MODULES = (cmd_init, cmd_ingest, cmd_reward, cmd_policy, cmd_serving, cmd_loop)

# Global options that take a value: before the command, the command starts after them.
GLOBAL_OPTIONS = ("--config", "--workspace", "--log-level", "--log-format")
LOG_LEVELS = get_args(LooprlConfig.model_fields["log_level"].annotation)
LOG_FORMATS = get_args(LooprlConfig.model_fields["log_format"].annotation)
# Libraries whose versions `looprl --version` reports besides looprl's own (from their metadata).
VERSION_OF = ("torch", "transformers", "peft")

# Spellings from before `looprl <stage> <action>`, still accepted for one release with a notice on
# stderr: old words -> new words.
DEPRECATED: dict[tuple[str, ...], tuple[str, ...]] = {
    ("broker",): ("ingest", "broker"),
    ("ingest",): ("ingest", "consume"),
    ("collector",): ("ingest", "collect"),
    ("train", "policy"): ("policy", "train"),
    ("gate",): ("policy", "gate"),
    ("serve",): ("serving", "serve"),
    ("controller",): ("serving", "control"),
    ("scheduler",): ("scheduler", "run"),
    ("trigger",): ("scheduler", "trigger"),
    ("runs",): ("scheduler", "runs"),
    ("canary",): ("canary", "status"),
    ("promote",): ("canary", "promote"),
    ("rollback",): ("canary", "rollback"),
}


def _command_start(argv: list[str]) -> int:
    """Index of the command's first word in ``argv``, after the global options."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        arg = argv[i]  # argparse also accepts an unambiguous prefix, e.g. --work
        takes_value = len(arg) > 2 and "=" not in arg and any(o.startswith(arg) for o in GLOBAL_OPTIONS)
        i += 2 if takes_value else 1
    return i


def undeprecate(argv: list[str]) -> tuple[list[str], str | None]:
    """``argv`` in the current spelling, and a notice naming the new form if it was an old one.

    An old spelling whose word is now a stage (``looprl ingest``, ``looprl scheduler --once``,
    ``looprl canary``) is old only when no action follows it."""
    i = _command_start(argv)
    for old, new in DEPRECATED.items():
        if tuple(argv[i:i + len(old)]) != old:
            continue
        rest = argv[i + len(old):]
        if old[0] == new[0] and rest and (not rest[0].startswith("-") or rest[0] in ("-h", "--help")):
            return argv, None
        notice = (f"looprl: `looprl {' '.join(old)}` is deprecated and goes in the next release; "
                  f"use `looprl {' '.join(new)}`")
        return [*argv[:i], *new, *rest], notice
    return argv, None


def _print_config(args: argparse.Namespace, cfg: LooprlConfig) -> int:
    print(json.dumps(cfg.redacted(), indent=2))
    return 0


def version_text() -> str:
    """``looprl X`` and, on a second line, the versions of the heavy libraries and Python, read
    from the installed distributions' metadata (nothing is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    def of(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "not installed"

    libs = ", ".join(f"{d} {of(d)}" for d in VERSION_OF)
    return f"looprl {of('looprl')}\n{libs}; Python {platform.python_version()}"


class _VersionAction(argparse.Action):
    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit()


def _add_global_options(p: argparse.ArgumentParser, top: bool) -> None:
    # Below the top, an option not given must not replace what was given before the command:
    # SUPPRESS leaves it out of the namespace instead of setting its default.
    d = {} if top else {"default": argparse.SUPPRESS}
    g = p.add_argument_group("global options" if top else "global options (also accepted before the command)")
    g.add_argument("--config", metavar="PATH", help="path to looprl.toml (default: ./looprl.toml or $LOOPRL_CONFIG)",
                   **d)
    g.add_argument("--workspace", metavar="DIR", help="workspace directory (overrides config 'workspace')", **d)
    g.add_argument("--log-level", choices=LOG_LEVELS, type=str.upper, help="log level (overrides config 'log_level')",
                   **d)
    g.add_argument("--log-format", choices=LOG_FORMATS,
                   help="log lines on stderr: human on a terminal and JSON otherwise (auto, the default), or "
                        "forced (overrides config 'log_format')", **d)


def parsers(p: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    """Every parser of the command tree under ``p`` (``p`` included, each once), with its command words."""
    out, seen = [(p.prog, p)], {id(p)}
    for prog, parser in out:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    if id(child) not in seen:
                        seen.add(id(child))
                        out.append((child.prog, child))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="looprl",
        description="Continual online RLHF: feedback -> Kafka -> reward model -> LoRA-PPO -> hot-swapped adapters. "
                    "Commands read `looprl <stage> <action>`; init, config, demo, simulate, status and report "
                    "concern the whole loop.",
    )
    p.add_argument("--version", action=_VersionAction,
                   help="print looprl's version, and torch's, transformers' and peft's, and exit")
    _add_global_options(p, top=True)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    c = sub.add_parser("config", help="print the whole effective config (file + LOOPRL_* env), secrets masked")
    c.set_defaults(func=_print_config)
    for mod in COMMAND_MODULES:
        mod.register(sub)
    for _prog, child in parsers(p)[1:]:
        _add_global_options(child, top=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv, notice = undeprecate(sys.argv[1:] if argv is None else list(argv))
    if notice:
        print(notice, file=sys.stderr)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        overrides = {k: v for k in ("workspace", "log_level", "log_format") if (v := getattr(args, k))}
        cfg: LooprlConfig = load_config(args.config, **overrides)
    except ConfigError as e:
        print(f"looprl: {e}", file=sys.stderr)
        return 2
    setup_logging(cfg.log_level, cfg.log_format)
    log = get_logger("looprl.ops.cli")  # __name__ is __main__ under `python -m`
    command = " ".join(w for w in (args.command, getattr(args, "action", None)) if w)
    log.info("config", command=command, **cfg.summary())
    log.debug("effective config", command=command, config=cfg.redacted())
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
