"""The release contract: how a policy version reaches users and leaves them.

    candidate --gate--> gated | rejected
    gated --canary start--> canary --promote--> promoted
    canary --roll back--> rolled_back            (the promoted version keeps all traffic)
    promoted --roll back--> rolled_back          (the previous promoted version serves again)

``LIFECYCLE`` is that table, and every move below is checked against it on the manifest's current
status (under the registry lock): a refused move raises ``TransitionError`` naming the version,
its status and the statuses the move is allowed from. A person may also promote by hand any
version that passed the gate (gated, canary, a superseded promoted one, a rolled-back one).

The pointers ``registry/policy/promoted`` and ``registry/policy/canary`` say what serves; the
serving controller applies them. Whoever decides (the offline gate, the canary test, an operator,
the controller on an unhealthy adapter) changes status and pointers through the functions here;
canary starts, promotions and rollbacks append one line to ``<state_dir>/canary/decisions.jsonl``,
which the report and ``looprl status`` read. Version texts (``v3``, ``base``) are parsed by
``Version`` (ground floor) only.

Deciders race: the canary counts votes for minutes while an operator may roll back or promote by
hand, and the controller may roll back an unhealthy adapter. Each move is therefore one
compare-and-set under the registry's policy lock: it reads status and pointers, compares them
with ``expected`` (what its caller read before deciding), then writes statuses, pointers and the
decision line. If anything differs it raises ``StaleDecision`` naming what changed and writes
nothing, so the later, stale decision never overwrites the earlier one. A promotion of another
version, or a rollback of the promoted version, ends a running canary (status rolled_back, a
decision ``end`` with the reason): the canary was judged against a control that no longer serves.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from looprl.ops.core.version import BASE_TEXT, Version, version_number
from looprl.storage.registry import Manifest, Registry, RegistryError, Status

__all__ = [
    "BASE", "CANARY", "KIND", "LIFECYCLE", "PROMOTED", "DecisionRecord", "Expected", "StaleDecision",
    "TransitionError", "Version", "canary_version", "check_transition", "continue_point", "decisions_path",
    "drop_stale_canary", "lineage",
    "VLLM_DIR", "adapter_dir", "lora_name", "previous_promoted", "promote", "promoted_version", "read_decisions",
    "record_decision",
    "record_gate", "require", "roll_back_canary", "roll_back_promoted", "sources", "start_canary",
    "version_number", "version_of_lora",
]

KIND = "policy"  # the registry kind whose versions serve users
PROMOTED = "promoted"  # pointer: the version all traffic gets (missing: the base model)
CANARY = "canary"  # pointer: the version a share of users gets while the canary test runs
BASE = BASE_TEXT  # the version the base model (no adapter) is reported as

# The lifecycle: each status and the statuses a version may move to from it.
LIFECYCLE: dict[Status, tuple[Status, ...]] = {
    "candidate": ("gated", "rejected"),
    "gated": ("gated", "rejected", "canary", "promoted"),  # re-gating is allowed until it reaches users
    "rejected": ("gated", "rejected"),
    "canary": ("promoted", "rolled_back"),
    "promoted": ("promoted", "rolled_back"),  # by hand: a superseded promoted version serves again
    "rolled_back": ("promoted",),  # by hand only: the canary never restarts a rolled-back version
}

# What a refusal tells whoever asked for a move, per target status.
_RULES: dict[Status, str] = {
    "gated": "only candidates are gated",
    "rejected": "only candidates are gated",
    "canary": "only a gated version enters canary",
    "promoted": "only versions that passed the gate can be promoted",
    "rolled_back": "only the canary or the promoted version is rolled back",
}


class TransitionError(RegistryError):
    """A move the lifecycle does not allow; the message names the version, its status and the
    statuses the move is allowed from."""


class StaleDecision(TransitionError):
    """The registry changed between a decider's read and its move (someone else decided meanwhile);
    the message names what changed, and nothing was written."""


@dataclass(frozen=True)
class Expected:
    """What a decider read before deciding; its move commits only if the registry still shows it.

    ``status``: the status of the version the move is about (None: not compared). ``pointers``:
    pointer name (``PROMOTED``, ``CANARY``) -> the version it named, None for no pointer (for
    ``PROMOTED``: the base model); pointers not named are not compared."""

    status: Status | None = None
    pointers: Mapping[str, str | None] = field(default_factory=dict)


def sources(to: Status) -> tuple[Status, ...]:
    """The statuses a version may move to ``to`` from."""
    return tuple(s for s, targets in LIFECYCLE.items() if to in targets)


def check_transition(version: str, status: Status, to: Status) -> None:
    """Raise ``TransitionError`` unless a version in ``status`` may move to ``to``."""
    if to not in _RULES:
        raise ValueError(f"{to!r} is not a status of the policy lifecycle: {', '.join(_RULES)}")
    targets = LIFECYCLE.get(status, ())
    if to in targets:
        return
    msg = f"{KIND}/{version} is {status}: {_RULES[to]} ({', '.join(sources(to))})"
    if "gated" in sources(to) and "gated" in targets:  # the gate can still open the way
        msg += f"; run `looprl policy gate {version}` first"
    raise TransitionError(msg)


def require(reg: Registry, version: str, to: Status) -> Manifest:
    """The manifest of ``version`` if it may move to ``to`` now (a check before expensive work)."""
    m = reg.manifest(KIND, version)  # raises RegistryError naming a missing version
    check_transition(version, m.status, to)
    return m


def _move(reg: Registry, version: str, to: Status, reason: str, numbers: dict[str, Any] | None) -> Manifest:
    return reg.set_status(KIND, version, to, reason, numbers,
                          check=lambda m: check_transition(version, m.status, to))


def _shown(pointer: str, version: str | None) -> str:
    return version or (BASE if pointer == PROMOTED else "nothing")


def _compare(reg: Registry, version: str | None, expected: Expected | None, move: str) -> None:
    """Under the lock: raise ``StaleDecision`` unless the registry still shows ``expected``."""
    if expected is None:
        return
    changes = []
    if expected.status is not None and version is not None:
        m = reg.manifest(KIND, version)
        if m.status != expected.status:
            why = f" ({m.reason})" if m.reason else ""
            changes.append(f"{KIND}/{version} is now {m.status}{why}, was {expected.status}")
    for name, seen in expected.pointers.items():
        now = reg.pointer(KIND, name)
        if now != seen:
            changes.append(f"pointer {name} now names {_shown(name, now)}, was {_shown(name, seen)}")
    if changes:
        raise StaleDecision(f"{move} refused, the registry changed since it was decided: {'; '.join(changes)}. "
                            "Nothing was written; decide again on what serves now")


# --------------------------------------------------------------------------- pointers and names
def promoted_version(reg: Registry) -> str | None:
    """The version all traffic gets; None: the base model."""
    return reg.pointer(KIND, PROMOTED)


def canary_version(reg: Registry) -> str | None:
    """The version on canary; None: no canary."""
    return reg.pointer(KIND, CANARY)


# A published policy version may hold, besides its peft adapter, a copy in the layout vLLM loads
# (per-expert LoRA on fused MoE experts: looprl.policy.vllm_layout), in this subdirectory.
VLLM_DIR = "vllm"


def adapter_dir(reg: Registry, version: str, *, engine: str = "looprl") -> Path:
    """The directory a serving engine loads ``version`` from: for vLLM (``engine="vllm"``) the
    vLLM-layout copy when the version has one, else (and for `looprl serving serve`) the version."""
    d = reg.version_dir(KIND, version).resolve()
    if engine == "vllm" and (d / VLLM_DIR / "adapter_config.json").is_file():
        return d / VLLM_DIR
    return d


def lora_name(version: str) -> str:
    """The name serving loads ``version`` under (``policy-v3``)."""
    return Version.parse(version).lora_name(KIND)


def version_of_lora(name: str | None) -> str | None:
    """``policy-v3`` -> ``v3``; a name that is not a policy version's -> None."""
    v = Version.from_lora_name(name, KIND)
    return str(v) if v is not None else None


def gated_against(m: Manifest) -> str | None:
    """The incumbent ``m`` was last gated against (the gate records it; ``BASE`` for the bare base),
    or None for a version never gated or gated before the gate recorded it."""
    for h in reversed(m.history):
        if h.status == "gated":
            incumbent = h.numbers.get("incumbent")
            return str(incumbent) if incumbent else None
    return None


def previous_promoted(reg: Registry, current: str) -> str | None:
    """The newest version before ``current`` that was promoted and not rolled back since."""
    for m in reversed(reg.list(KIND)):
        if m.number < version_number(current) and m.status == "promoted":
            return m.version
    return None


# A trainer's line runs through versions that passed the gate and that users have not refused.
_ON_LINE: frozenset[str] = frozenset({"gated", "canary"})


def lineage(reg: Registry, version: str | None) -> list[str]:
    """``version`` and the versions it was trained from (manifest ``parent``), newest first; the
    base model ends it (a missing version or a loop ends it early)."""
    out: list[str] = []
    while version is not None and version not in out:
        out.append(version)
        try:
            version = reg.manifest(KIND, version).parent
        except RegistryError:
            break
    return out


def continue_point(reg: Registry, how: str = "promoted") -> str | None:
    """The version a new training run continues from (``policy.continue_from``; None: the base).

    ``"promoted"``: the version serving all traffic. ``"newest_gated"``: the newest version whose
    parents lead to the promoted one through gated (or canary) versions only, else the promoted
    one. A rollback or a rejection on the way ends that line, and so does a promotion elsewhere."""
    promoted = promoted_version(reg)
    if how == "promoted":
        return promoted
    if how != "newest_gated":
        raise ValueError(f"continue from {how!r}: expected 'promoted' or 'newest_gated'")
    manifests = {m.version: m for m in reg.list(KIND)}

    def on_line(version: str) -> bool:
        seen: set[str] = set()
        v: str | None = version
        while v != promoted:
            m = manifests.get(v) if v is not None else None
            if m is None or m.status not in _ON_LINE or v in seen:
                return False
            seen.add(v)
            v = m.parent
        return True

    for m in sorted(manifests.values(), key=lambda m: m.number, reverse=True):
        if m.status in _ON_LINE and on_line(m.version):
            return m.version
    return promoted


# --------------------------------------------------------------------------- the decisions log
@dataclass
class DecisionRecord:
    at: float
    # start | promote | rollback | manual_promote | manual_rollback | unhealthy_rollback | end (a canary another
    # decision ended)
    action: str
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


def _decided(state_dir: str | Path, at: float | None, action: str, version: str, control: str, reason: str,
             numbers: dict[str, Any], by: str) -> DecisionRecord:
    rec = DecisionRecord(time.time() if at is None else at, action, version, control, reason, numbers, by)
    record_decision(state_dir, rec)
    return rec


# --------------------------------------------------------------------------- the transitions
def record_gate(reg: Registry, version: str, decision: Status, reason: str,
                numbers: dict[str, Any] | None = None) -> Manifest:
    """The offline gate's verdict on ``version``: ``gated`` or ``rejected`` (policy.gate judges)."""
    if decision not in ("gated", "rejected"):
        raise ValueError(f"a gate decision is 'gated' or 'rejected', got {decision!r}")
    return _move(reg, version, decision, reason, numbers)


def start_canary(reg: Registry, state_dir: str | Path, version: str, *, traffic_share: float,
                 by: str = "scheduler", at: float | None = None, expected: Expected | None = None) -> DecisionRecord:
    """A gated ``version`` serves ``traffic_share`` of users next to the promoted one."""
    with reg.locked(KIND):
        _compare(reg, version, expected, f"canary start of {KIND}/{version}")
        current = canary_version(reg)
        if current is not None and current != version:
            raise TransitionError(f"{KIND}/{version} cannot enter canary: {KIND}/{current} is on canary; "
                                  "promote it or roll it back first")
        control = promoted_version(reg) or BASE
        numbers = {"control": control, "traffic_share": traffic_share}
        _move(reg, version, "canary", f"canary at {traffic_share:.0%} of traffic vs {control}", numbers)
        reg.set_pointer(KIND, CANARY, version)
        return _decided(state_dir, at, "start", version, control, "gated candidate enters canary", numbers, by)


def _end_canary(reg: Registry, state_dir: str | Path, at: float | None, why: str, by: str) -> dict[str, str]:
    """Under the lock: roll back the running canary because another decision replaced its control.
    Returns ``{"ended_canary": version}`` for the deciding move's numbers, or nothing."""
    canary = canary_version(reg)
    if canary is None:
        return {}
    reg.set_pointer(KIND, CANARY, None)
    if reg.manifest(KIND, canary).status != "canary":  # a stale pointer: nothing was running
        return {}
    control = promoted_version(reg) or BASE
    reason = f"canary ended: {why}"
    _move(reg, canary, "rolled_back", reason, {"control": control})
    _decided(state_dir, at, "end", canary, control, reason, {}, by)
    return {"ended_canary": canary}


def promote(reg: Registry, state_dir: str | Path, version: str, reason: str, *, by: str, action: str,
            control: str | None = None, numbers: dict[str, Any] | None = None,
            at: float | None = None, expected: Expected | None = None) -> DecisionRecord:
    """``version`` gets all traffic. ``control``: what it was compared with (default: what served).
    A canary of another version ends (``numbers["ended_canary"]``)."""
    reg.verify(KIND, version)  # never promote a corrupted adapter
    with reg.locked(KIND):
        _compare(reg, version, expected, f"promotion of {KIND}/{version}")
        require(reg, version, "promoted")  # refuse before the canary is ended
        previous = promoted_version(reg) or BASE
        numbers = {"previous": previous, **(numbers or {})}
        if canary_version(reg) != version:
            numbers.update(_end_canary(reg, state_dir, at, f"{version} promoted ({reason})", by))
        _move(reg, version, "promoted", reason, numbers)
        reg.set_pointer(KIND, PROMOTED, version)
        if canary_version(reg) == version:
            reg.set_pointer(KIND, CANARY, None)
        return _decided(state_dir, at, action, version, control or previous, reason, numbers, by)


def roll_back_canary(reg: Registry, state_dir: str | Path, version: str, reason: str, *, by: str, action: str,
                     numbers: dict[str, Any] | None = None, at: float | None = None,
                     expected: Expected | None = None) -> DecisionRecord:
    """End the canary ``version``: status rolled_back, pointer cleared; promoted keeps all traffic."""
    with reg.locked(KIND):
        _compare(reg, version, expected, f"rollback of the canary {KIND}/{version}")
        status = require(reg, version, "rolled_back").status
        if status != "canary":  # the promoted version: its pointer must move too
            raise TransitionError(f"{KIND}/{version} is {status}, not on canary: roll back the promoted version "
                                  "instead")
        control = promoted_version(reg) or BASE
        numbers = {"control": control, **(numbers or {})}
        _move(reg, version, "rolled_back", reason, numbers)
        if canary_version(reg) == version:
            reg.set_pointer(KIND, CANARY, None)
        return _decided(state_dir, at, action, version, control, reason, numbers, by)


def roll_back_promoted(reg: Registry, state_dir: str | Path, reason: str, *, by: str, action: str,
                       at: float | None = None, expected: Expected | None = None) -> DecisionRecord:
    """Replace the promoted version by the previous promoted one (or the base model). A running
    canary ends too (``numbers["ended_canary"]``): its control no longer serves."""
    with reg.locked(KIND):
        current = promoted_version(reg)
        _compare(reg, current, expected, "rollback of the promoted version")
        if current is None:
            raise TransitionError("nothing to roll back: the base model already serves all traffic")
        require(reg, current, "rolled_back")  # refuse before the canary is ended
        previous = previous_promoted(reg, current)
        numbers = {"restored": previous or BASE,
                   **_end_canary(reg, state_dir, at, f"its control {current} was rolled back ({reason})", by)}
        _move(reg, current, "rolled_back", reason, numbers)
        reg.set_pointer(KIND, PROMOTED, previous)
        return _decided(state_dir, at, action, current, previous or BASE, reason, numbers, by)


def drop_stale_canary(reg: Registry) -> str | None:
    """Clear the canary pointer if its version left the canary status (decided by hand meanwhile).
    Returns the version dropped, or None."""
    with reg.locked(KIND):
        current = canary_version(reg)
        if current is None or reg.manifest(KIND, current).status == "canary":
            return None
        reg.set_pointer(KIND, CANARY, None)
        return current
