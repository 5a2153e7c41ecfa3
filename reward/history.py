"""The reward updater's decision log, ``<state_dir>/reward_history.jsonl``: one JSON object per
update (decision, version, new events, prequential scores judged before training, held-out
candidate score). The updater appends; ops (scheduler triggers, demo progress, report) read it
through ``read_history``. Kept free of torch so light processes can import it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from looprl.ops.core.config import LooprlConfig


def reward_history_path(cfg: LooprlConfig) -> Path:
    return cfg.state_dir / "reward_history.jsonl"


def read_history(cfg: LooprlConfig, last: int | None = None) -> list[dict[str, Any]]:
    """The logged updates, oldest first (the ``last`` N when given). A line that does not parse
    (a write cut by SIGKILL) is skipped, never fatal to the reader."""
    path = reward_history_path(cfg)
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for line in lines if last is None else lines[-last:]:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows
