"""What the product simulator leaves in the workspace, and how the demo's live view, the health
monitor and the report read it back (cheap to import: no model, no HTTP client).

- ``<state>/simulator/interactions.jsonl``: one JSON line per simulated interaction;
- ``<state>/simulator/status.json``: running counts, rewritten every second.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from looprl.ops.core.config import LooprlConfig


def simulator_dir(cfg: LooprlConfig) -> Path:
    return cfg.state_dir / "simulator"


def read_interactions(cfg: LooprlConfig, path: Path | None = None) -> list[dict[str, Any]]:
    p = Path(path or simulator_dir(cfg) / "interactions.jsonl")
    if not p.is_file():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a torn last line after a crash
            continue
    return out


def read_status(cfg: LooprlConfig) -> dict[str, Any]:
    try:
        return json.loads((simulator_dir(cfg) / "status.json").read_text())
    except (OSError, ValueError):
        return {}
