"""Locks between processes, through ``filelock`` (``flock`` on Unix, released by the kernel when
a process dies): one publisher per registry kind, one reward updater per workspace, one trainer
per run, one scheduler job of a kind at a time, one embedded broker start at a time."""

from __future__ import annotations

import os
from pathlib import Path

from filelock import FileLock, Timeout


class LockHeld(RuntimeError):
    """Another process holds the lock."""


def file_lock(path: str | os.PathLike[str]) -> FileLock:
    """A blocking lock for ``with file_lock(path): ...``. Not thread-local: a lock taken by one
    thread may be released by another (e.g. a job lock released by the thread that reaps it)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path), thread_local=False)


def try_lock(path: str | os.PathLike[str]) -> FileLock:
    """Take the lock now or raise ``LockHeld``; hold it until ``.release()``."""
    lock = file_lock(path)
    try:
        lock.acquire(blocking=False)
    except Timeout:
        raise LockHeld(f"{path} is held by another process") from None
    return lock
