"""The updater's durable state under ``<state_dir>/reward/``: what it has consumed, and its
working model, committed together so that no event is ever trained on twice, across restarts.

    state.json           the commit record: update number, working-weights dir, watermark,
                         pending publish decision (written atomically, last)
    consumed.log         append-only "<update>\\t<event_id>\\t<ingested_at>" lines: the events trained
                         on or held out since the consumed floor. Lines tagged with an update newer
                         than state.json belong to an update that crashed before its commit and
                         are dropped on load.
    work-<update>/       the working reward model's weights (safetensors) after that update

An update is committed by: writing ``work-<n>/`` (temp dir + rename), appending and fsyncing its
``consumed.log`` lines, then replacing ``state.json``. A crash anywhere before the last step leaves
the previous commit intact; the restarted updater redoes update ``n`` from scratch.

The consumed ids stay bounded: state.json holds a *consumed floor*, and every resolved event
ingested before it counts as consumed without its id (the new-events query reads only events
from the floor on). Ids of events before the floor are forgotten, in memory and in consumed.log
(rewritten atomically, after the commit that moved the floor). The updater keeps the floor a
window behind the newest consumed event (``reward.consumed_window_seconds``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from looprl.storage.registry import atomic_write_text

STATE_FILE = "state.json"
CONSUMED_LOG = "consumed.log"
_STAMP = "%Y-%m-%dT%H:%M:%S.%fZ"  # fixed width, UTC: stamps compare as strings in time order


def stamp(at: datetime) -> str:
    """An ingestion time as consumed.log writes it."""
    return at.astimezone(timezone.utc).strftime(_STAMP)


class UpdaterState(BaseModel):
    update: int = 0
    work: str | None = None  # name of the committed work dir (None: fresh model)
    watermark: dict[str, Any] = {}  # newest consumed (ingested_at, event_id) + counts, for reporting
    pending_publish: bool = False  # the last committed update decided to publish; not done yet
    pending_metrics: dict[str, Any] = {}
    published: str | None = None  # last version this updater published
    # Every resolved event ingested before this was consumed (None: no update yet); only later
    # events are read as new, and only their ids are remembered.
    consumed_floor: datetime | None = None


class StateStore:
    def __init__(self, state_dir: str | Path):
        self.dir = Path(state_dir) / "reward"
        self.dir.mkdir(parents=True, exist_ok=True)

    # ---- reading ----
    def load(self) -> tuple[UpdaterState, dict[str, str]]:
        """The committed state and the consumed event ids from its floor on (id -> ingestion
        stamp); removes leftovers of a crashed update."""
        path = self.dir / STATE_FILE
        state = UpdaterState()
        if path.is_file():
            try:
                state = UpdaterState.model_validate_json(path.read_text())
            except ValueError as e:
                raise RuntimeError(f"{path}: unreadable reward updater state ({e}); refusing to guess") from e
        consumed = self.load_consumed(state)
        for p in self.dir.glob("work-*"):
            if p.name != state.work:
                shutil.rmtree(p, ignore_errors=True)
        for p in self.dir.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
        return state, consumed

    def load_consumed(self, state: UpdaterState) -> dict[str, str]:
        """The ids ``state`` remembers as consumed (id -> ingestion stamp). consumed.log is
        rewritten without the lines it does not need: of an update after ``state``'s, or of an
        event before its floor. A line without a stamp (written before stamps were) is kept."""
        path = self.dir / CONSUMED_LOG
        if not path.is_file():
            return {}
        floor = stamp(state.consumed_floor) if state.consumed_floor is not None else ""
        ids: dict[str, str] = {}
        keep: list[str] = []
        dirty = False
        raw = path.read_text()
        lines = raw.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        elif lines:
            dirty = True  # a torn last line (crash mid-append): drop it
            lines.pop()
        for line in lines:
            tag, _, rest = line.partition("\t")
            eid, _, at = rest.partition("\t")
            if not tag.isdigit() or not eid:
                dirty = True
                continue
            if int(tag) > state.update:
                dirty = True  # an update that never committed: its events were not consumed
                continue
            if at and at < floor:
                dirty = True  # before the floor: consumed without its id
                continue
            ids[eid] = at
            keep.append(line)
        if dirty:
            atomic_write_text(path, "".join(line + "\n" for line in keep))
        return ids

    def work_dir(self, state: UpdaterState) -> Path | None:
        return self.dir / state.work if state.work else None

    # ---- committing ----
    def stage_work(self, update: int, write) -> str:
        """Write the working model with ``write(dir)`` into ``work-<update>`` atomically."""
        tmp = Path(tempfile.mkdtemp(dir=self.dir, prefix=".tmp-"))
        try:
            write(tmp)
            for p in tmp.iterdir():
                with open(p, "rb+") as f:
                    os.fsync(f.fileno())
            final = self.dir / f"work-{update}"
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            return final.name
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def append_consumed(self, update: int, events: list[tuple[str, datetime]]) -> None:
        """Log (event id, ingestion time) pairs as consumed by ``update`` (not committed yet)."""
        if not events:
            return
        with open(self.dir / CONSUMED_LOG, "a") as f:
            f.write("".join(f"{update}\t{eid}\t{stamp(at)}\n" for eid, at in events))
            f.flush()
            os.fsync(f.fileno())

    def commit(self, state: UpdaterState) -> None:
        """The commit point: replace state.json atomically, then drop older work dirs."""
        atomic_write_text(self.dir / STATE_FILE, state.model_dump_json(indent=2))
        for p in self.dir.glob("work-*"):
            if p.name != state.work:
                shutil.rmtree(p, ignore_errors=True)

    def append_history(self, history_path: Path, record: dict[str, Any]) -> None:
        history_path.parent.mkdir(parents=True, exist_ok=True)
        with open(history_path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
