"""Temp files and directories that are removed only once their writer is gone.

A writer takes an exclusive lock on ``<temp>.lock`` before it creates ``<temp>`` (``claim``) and
lets go of it, removing the lock file, once the temp was renamed into place or removed
(``release``). A cleaner removes a temp only if it can take that lock, i.e. its writer finished or
died (the kernel drops the flock of a dead process): ``remove_abandoned``. So neither age nor a
start-up sweep can delete the temp of a slow or concurrent writer, in this process, another one,
or on another host sharing the directory, and a crashed writer's temp goes at the next sweep
instead of after a timeout.

Used by the registry (``<kind>/.tmp-*`` version directories) and the event log's part writer
(``.part-*.tmp`` files).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from filelock import FileLock

from looprl.ops.core.locks import LockHeld, file_lock, try_lock

LOCK_SUFFIX = ".lock"


def owner_lock(temp: Path) -> Path:
    """The lock file that says whether ``temp``'s writer is still at work."""
    return temp.with_name(temp.name + LOCK_SUFFIX)


def claim(temp: Path) -> FileLock:
    """Take ``temp``'s owner lock; call before creating ``temp``, and ``release`` after."""
    lock = file_lock(owner_lock(temp))
    lock.acquire()
    return lock


def release(temp: Path, lock: FileLock) -> None:
    """Let go of ``temp`` (already renamed or removed)."""
    # Removed while still held: a cleaner that opened the file meanwhile cannot win it and skips.
    owner_lock(temp).unlink(missing_ok=True)
    lock.release()


def remove_abandoned(directory: Path, pattern: str) -> int:
    """Remove the temps (files or directories) matching the glob ``pattern`` under ``directory``
    whose writer is gone, and owner locks whose temp is gone and that nobody holds. Returns how
    many temps were removed."""
    directory = Path(directory)
    temps = {p for p in directory.glob(pattern) if not p.name.endswith(LOCK_SUFFIX)}
    temps |= {p.with_name(p.name[: -len(LOCK_SUFFIX)]) for p in directory.glob(pattern + LOCK_SUFFIX)}
    removed = 0
    for temp in sorted(temps):
        lock_path = owner_lock(temp)
        try:
            lock = try_lock(lock_path)
        except LockHeld:
            continue  # its writer is at work
        try:
            if temp.is_dir() and not temp.is_symlink():
                shutil.rmtree(temp, ignore_errors=True)
                removed += 1
            elif temp.exists() or temp.is_symlink():
                temp.unlink(missing_ok=True)
                removed += 1
            lock_path.unlink(missing_ok=True)
        finally:
            lock.release()
    return removed
