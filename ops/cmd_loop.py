"""`looprl` subcommands for the loop stage (see ops/cli.py for the convention)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    pass
