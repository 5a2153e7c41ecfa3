"""sha256 of big files, computed once while the file stays the same.

A base checkpoint's identity (``checksum_dir``) hashes every weight file, and every stage checks
it at start: tens of gigabytes each time for a real model. A file's digest is kept here keyed by
what any change to the file changes: its real path, size, inode and device, mtime_ns and
ctime_ns (rewriting a file moves its ctime even when its mtime is put back). A digest is kept
only for a file whose mtime and ctime are over ``RACY_SECONDS`` older than the read, since a write
in the same clock tick as an earlier one leaves both unchanged.

Kept in this process, and in a small JSON file shared by the processes of this user
(``$XDG_CACHE_HOME/looprl/file-digests.json``, else ``~/.cache/looprl/``): written atomically,
best effort (an unwritable or corrupt cache only costs a rehash), entries of files that no longer
exist dropped on each write.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import time
from pathlib import Path

RACY_SECONDS = 2.0
MAX_ENTRIES = 4096
_LOCK = threading.Lock()
_MEMO: dict[str, tuple[list[int], str]] = {}


def default_cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "looprl" / "file-digests.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_ino, st.st_dev, st.st_mtime_ns, st.st_ctime_ns]


def _read(cache_file: Path) -> dict[str, tuple[list[int], str]]:
    try:
        data = json.loads(cache_file.read_text())
        return {k: (list(v[0]), str(v[1])) for k, v in data.items()}
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return {}


def _write(cache_file: Path, new: dict[str, tuple[list[int], str]]) -> None:
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        merged = {**_read(cache_file), **new}
        live = {k: v for k, v in merged.items() if os.path.exists(k)}
        if len(live) > MAX_ENTRIES:  # keep the newest files
            live = dict(sorted(live.items(), key=lambda kv: kv[1][0][3])[-MAX_ENTRIES:])
        fd, tmp = tempfile.mkstemp(dir=cache_file.parent, prefix=f".{cache_file.name}.")
        with os.fdopen(fd, "w") as f:
            json.dump(live, f)
        os.replace(tmp, cache_file)
    except OSError:
        pass  # best effort: a read-only home only means hashing again next time


def cached_sha256(paths: list[Path], cache_file: Path | None = None) -> dict[Path, str]:
    """sha256 of each file in ``paths``, from the cache where the file is unchanged
    (``cache_file``: None for ``default_cache_file()``)."""
    cache_file = default_cache_file() if cache_file is None else cache_file
    with _LOCK:
        known = dict(_MEMO)
    known.update(_read(cache_file))
    out: dict[Path, str] = {}
    fresh: dict[str, tuple[list[int], str]] = {}
    for p in paths:
        key = os.path.realpath(p)
        st = os.stat(key)
        hit = known.get(key)
        if hit is not None and hit[0] == _stamp(st):
            out[p] = hit[1]
            continue
        started = time.time_ns()
        digest = sha256_file(Path(key))
        out[p] = digest
        after = os.stat(key)
        newest = max(after.st_mtime_ns, after.st_ctime_ns)
        if _stamp(after) == _stamp(st) and started - newest > RACY_SECONDS * 1e9:
            fresh[key] = (_stamp(after), digest)
    if fresh:
        with _LOCK:
            _MEMO.update(fresh)
        _write(cache_file, fresh)
    return out
