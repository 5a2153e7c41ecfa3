"""The argv of a `looprl` subcommand, for every process that starts one (the demo's services, the
scheduler's jobs): this interpreter and ``-m``, so it works in a venv whose ``bin`` is not on PATH."""

from __future__ import annotations

import sys

CLI_MODULE = "looprl.ops.cli"


def looprl_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", CLI_MODULE, *args]
