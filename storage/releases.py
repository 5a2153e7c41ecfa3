"""How a policy version reaches users and leaves them: the registry transitions and their log.

    candidate --gate--> gated | rejected
    gated --canary start--> canary --promote--> promoted
    canary --roll back--> rolled_back            (the promoted version keeps all traffic)
    promoted --roll back--> rolled_back          (the previous promoted version serves again)

The pointers ``registry/policy/promoted`` and ``registry/policy/canary`` say what serves; the
serving controller applies them. Whoever decides (the canary test, an operator, the controller
on an unhealthy adapter) changes status and pointers through the functions here, and appends one
line to ``<state_dir>/canary/decisions.jsonl``, which the report and ``looprl status`` read.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from looprl.storage.registry import Registry, RegistryError

KIND = "policy"
BASE = "base"  # what serving reports as the version of the base model


def version_number(version: str | None) -> int:
    """"v3" -> 3; the base model, None and anything unversioned -> 0."""
    return int(version[1:]) if version and version.startswith("v") and version[1:].isdigit() else 0


@dataclass
class DecisionRecord:
    at: float
    action: str  # start | promote | rollback | manual_promote | manual_rollback | unhealthy_rollback
    version: str | None
    control: str
    reason: str
    numbers: dict[str, Any] = field(default_factory=dict)
    by: str = "scheduler"


def decisions_path(state_dir: str | Path) -> Path:
    return Path(state_dir) / "canary" / "decisions.jsonl"


def record_decision(state_dir: str | Path, rec: DecisionRecord) -> None:
    path = decisions_path(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(asdict(rec), default=str) + "\n")
        f.flush()


def read_decisions(state_dir: str | Path) -> list[dict[str, Any]]:
    path = decisions_path(state_dir)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def previous_promoted(reg: Registry, current: str) -> str | None:
    """The newest version before ``current`` that was promoted and not rolled back since."""
    for m in reversed(reg.list(KIND)):
        if m.number < version_number(current) and m.status == "promoted":
            return m.version
    return None


def roll_back_canary(reg: Registry, state_dir: str | Path, version: str, reason: str, *, by: str, action: str,
                     numbers: dict[str, Any] | None = None, at: float | None = None) -> DecisionRecord:
    """End the canary ``version``: status rolled_back, pointer cleared; promoted keeps all traffic."""
    control = reg.pointer(KIND, "promoted") or BASE
    numbers = {"control": control, **(numbers or {})}
    reg.set_status(KIND, version, "rolled_back", reason, numbers)
    if reg.pointer(KIND, "canary") == version:
        reg.set_pointer(KIND, "canary", None)
    rec = DecisionRecord(time.time() if at is None else at, action, version, control, reason, numbers, by)
    record_decision(state_dir, rec)
    return rec


def roll_back_promoted(reg: Registry, state_dir: str | Path, reason: str, *, by: str, action: str,
                       at: float | None = None) -> DecisionRecord:
    """Replace the promoted version by the previous promoted one (or the base model)."""
    current = reg.pointer(KIND, "promoted")
    if current is None:
        raise RegistryError("nothing to roll back: the base model already serves all traffic")
    previous = previous_promoted(reg, current)
    numbers = {"restored": previous or BASE}
    reg.set_status(KIND, current, "rolled_back", reason, numbers)
    reg.set_pointer(KIND, "promoted", previous)
    rec = DecisionRecord(time.time() if at is None else at, action, current, previous or BASE, reason, numbers, by)
    record_decision(state_dir, rec)
    return rec
