"""The registry of model versions (reward models, policy adapters).

Layout (under ``<workspace>/registry``)::

    <kind>/v<N>/               weights (safetensors only) + small JSON/text files + manifest.json
    <kind>/latest              pointer file: newest published version
    <kind>/<pointer>           other pointers (policy: ``promoted``, ``canary``)

Publishing is atomic: files are copied into ``<kind>/.tmp-*``, fsynced, the manifest (with a
sha256 of every file) is written last, then the directory is renamed to ``v<N>`` and the
``latest`` pointer is replaced with ``os.replace``. A reader therefore sees either no version or
a whole one; a crash leaves at most a ``.tmp-*`` directory, removed by the next publish (a temp
whose publisher is still alive, however slow, is left alone: ``looprl.storage.temps``).
Every read verifies checksums (``open``), so a corrupted or tampered file is refused by name.
Pickle formats are never accepted.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from looprl.ops.core.locks import file_lock
from looprl.ops.core.version import Version
from looprl.storage.digests import cached_sha256, sha256_file
from looprl.storage.temps import claim, release, remove_abandoned

# A version's status; the policy lifecycle between them is looprl.storage.releases. "published" is a
# reward model's only status: reward versions are used as soon as they are published.
Status = Literal["candidate", "gated", "rejected", "canary", "promoted", "rolled_back", "published"]
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Weights must be safetensors; these small text formats may travel beside them.
_ALLOWED_SUFFIXES = {".safetensors", ".json", ".txt", ".md", ".model", ".jinja"}
_FORBIDDEN_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".npy", ".joblib"}
TMP_PREFIX = ".tmp-"  # a version being published: <kind>/.tmp-<random>, renamed to v<N> when whole


class _Held(threading.local):
    """The kind locks this thread holds: taking one again nests instead of waiting for itself."""

    def __init__(self) -> None:
        self.paths: set[Path] = set()


_HELD = _Held()


class RegistryError(RuntimeError):
    """Bad name, missing version, or invalid contents."""


class ChecksumError(RegistryError):
    """A file in a published version does not match the sha256 in its manifest."""


class StatusChange(BaseModel):
    status: Status
    reason: str
    at: datetime
    numbers: dict[str, Any] = {}


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: str
    kind: str
    parent: str | None = None
    base_checksum: str
    # model_type of the base (e.g. "qwen3_moe"); None in manifests written before it was recorded
    base_family: str | None = None
    watermark: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    files: dict[str, str]  # file name -> sha256
    created_at: datetime
    status: Status = "candidate"
    reason: str = ""
    history: list[StatusChange] = []
    extra: dict[str, Any] = {}

    @property
    def number(self) -> int:
        return Version.parse(self.version).number


def checksum_dir(path: Path, cache_file: Path | None = None) -> str:
    """A stable checksum of a checkpoint directory (weights + config files), used as the
    base-model identity that every adapter and reward model is tied to. Each file's digest is
    reused while the file is unchanged (``looprl.storage.digests``): every stage checks the base
    at start, and a real one is gigabytes."""
    files = [p for p in sorted(Path(path).iterdir())
             if p.is_file() and p.suffix in (".safetensors", ".json") and not p.name.startswith(".")]
    digests = cached_sha256(files, cache_file)
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        h.update(digests[p].encode())
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it survives a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small file atomically (temp file in the same dir, fsync, rename, fsync dir)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_name(kind: str) -> str:
    if not isinstance(kind, str) or not _NAME.match(kind):
        raise RegistryError(f"invalid registry kind {kind!r}: lowercase letters, digits, '-' or '_'")
    return kind


def check_version(version: str) -> str:
    """A published version's name (``v3``); the base model has none in the registry."""
    v = Version.parse_or_none(version) if isinstance(version, str) else None
    if v is None or v.is_base:
        raise RegistryError(f"invalid version {version!r}: expected v<N>, e.g. v3")
    return version


def check_file_name(name: str) -> str:
    """A file of a version: ``name`` or ``dir/name`` (one level of subdirectory, e.g. the vLLM-layout
    copy of an adapter, ``vllm/adapter_model.safetensors``)."""
    parts = name.split("/") if isinstance(name, str) else [name]
    if not 1 <= len(parts) <= 2 or any(not isinstance(x, str) or not _FILE.match(x) or x in (".", "..") for x in parts):
        raise RegistryError(f"invalid file name {name!r}")
    suffix = Path(name).suffix
    if suffix in _FORBIDDEN_SUFFIXES:
        raise RegistryError(f"{name}: pickle-based formats are refused; save weights as safetensors")
    if suffix not in _ALLOWED_SUFFIXES:
        raise RegistryError(f"{name}: file type {suffix or '(none)'} is not allowed in the registry")
    return name


class Registry:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    # ---- paths ----
    def kind_dir(self, kind: str) -> Path:
        return self.root / check_name(kind)

    def version_dir(self, kind: str, version: str) -> Path:
        return self.kind_dir(kind) / check_version(version)

    # ---- the kind lock ----
    @contextmanager
    def locked(self, kind: str) -> Iterator[None]:
        """Hold the kind's lock (between processes and threads). Every write of a manifest or a
        pointer takes it, and it nests within one thread, so a caller can read, compare and then
        write statuses and pointers as one compare-and-set."""
        path = self.kind_dir(kind).absolute() / ".lock"
        if path in _HELD.paths:
            yield
            return
        with file_lock(path):
            _HELD.paths.add(path)
            try:
                yield
            finally:
                _HELD.paths.discard(path)

    # ---- reading ----
    def versions(self, kind: str) -> list[str]:
        d = self.kind_dir(kind)
        if not d.is_dir():
            return []
        vs = [Version.parse_or_none(p.name) for p in d.iterdir() if p.is_dir() and (p / "manifest.json").is_file()]
        return [str(v) for v in sorted(v for v in vs if v is not None and not v.is_base)]

    def manifest(self, kind: str, version: str) -> Manifest:
        path = self.version_dir(kind, version) / "manifest.json"
        if not path.is_file():
            raise RegistryError(f"{kind}/{version} does not exist in registry {self.root}")
        try:
            return Manifest.model_validate_json(path.read_text())
        except ValueError as e:
            raise RegistryError(f"{kind}/{version}: unreadable manifest: {e}") from e

    def list(self, kind: str) -> list[Manifest]:
        return [self.manifest(kind, v) for v in self.versions(kind)]

    def pointer(self, kind: str, name: str = "latest") -> str | None:
        p = self.kind_dir(kind) / check_name(name)
        if not p.is_file():
            return None
        version = p.read_text().strip()
        return check_version(version) if version else None

    def latest(self, kind: str) -> Manifest | None:
        v = self.pointer(kind, "latest")
        return self.manifest(kind, v) if v else None

    def verify(self, kind: str, version: str) -> Manifest:
        """Check every file against its sha256; raise ``ChecksumError`` naming the bad file."""
        m = self.manifest(kind, version)
        d = self.version_dir(kind, version)
        for name, digest in m.files.items():
            check_file_name(name)
            p = d / name
            if not p.is_file():
                raise ChecksumError(f"{kind}/{version}: file {name} is missing")
            if sha256_file(p) != digest:
                raise ChecksumError(f"{kind}/{version}: checksum mismatch for {name} (file corrupted or modified)")
        return m

    def open(self, kind: str, version: str, base_checksum: str | None = None) -> tuple[Manifest, Path]:
        """Verified access to a version: returns its manifest and directory.

        With ``base_checksum``, also refuses a version trained on another base model."""
        m = self.verify(kind, version)
        if base_checksum is not None and m.base_checksum != base_checksum:
            raise RegistryError(
                f"{kind}/{version} was trained on base {m.base_checksum[:12]}, "
                f"but the configured base is {base_checksum[:12]}"
            )
        return m, self.version_dir(kind, version)

    # ---- writing ----
    def publish(
        self,
        kind: str,
        src_dir: str | Path,
        *,
        base_checksum: str,
        base_family: str | None = None,
        parent: str | None = None,
        watermark: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        status: Status = "candidate",
        reason: str = "",
        extra: dict[str, Any] | None = None,
        set_latest: bool = True,
    ) -> Manifest:
        """Copy the files of ``src_dir`` into a new version, atomically. Returns its manifest."""
        kdir = self.kind_dir(kind)
        kdir.mkdir(parents=True, exist_ok=True)
        src = Path(src_dir)
        # The directory's files and those of its subdirectories (one level), by relative name.
        files = sorted(p for p in [*src.iterdir(), *(q for d in src.iterdir() if d.is_dir() for q in d.iterdir())]
                       if p.is_file() and p.name != "manifest.json")
        rel = {p: p.relative_to(src).as_posix() for p in files}
        if not any(p.suffix == ".safetensors" and p.parent == src for p in files):
            raise RegistryError(f"{src}: no .safetensors weights to publish")
        for p in files:
            check_file_name(rel[p])
        self._clean_tmp(kdir)
        tmp = kdir / f"{TMP_PREFIX}{secrets.token_hex(8)}"
        owner = claim(tmp)  # held while tmp exists: another publisher's _clean_tmp leaves it alone
        try:
            tmp.mkdir(mode=0o700)
            digests = {}
            for p in files:
                dst = tmp / rel[p]
                dst.parent.mkdir(mode=0o700, exist_ok=True)
                shutil.copyfile(p, dst)
                with open(dst, "rb+") as f:
                    os.fsync(f.fileno())
                digests[rel[p]] = sha256_file(dst)
            for sub in {(tmp / rel[p]).parent for p in files} - {tmp}:
                fsync_dir(sub)
            with self.locked(kind):  # two publishers never pick the same version number
                existing = self.versions(kind)
                number = Version.parse(existing[-1]).number + 1 if existing else 1
                now = datetime.now(timezone.utc)
                m = Manifest(
                    version=str(Version(number)), kind=kind, parent=parent, base_checksum=base_checksum,
                    base_family=base_family, watermark=watermark or {}, metrics=metrics or {}, files=digests, created_at=now,
                    status=status, reason=reason, extra=extra or {},
                    history=[StatusChange(status=status, reason=reason or "published", at=now)],
                )
                atomic_write_text(tmp / "manifest.json", m.model_dump_json(indent=2))
                fsync_dir(tmp)
                os.rename(tmp, kdir / m.version)
                fsync_dir(kdir)
                if set_latest:
                    self.set_pointer(kind, "latest", m.version)
            return m
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            release(tmp, owner)

    def set_pointer(self, kind: str, name: str, version: str | None) -> None:
        """Point ``name`` at ``version`` (None: remove it), under the kind lock; readers see the old
        or the new pointer, never a partial one."""
        p = self.kind_dir(kind) / check_name(name)
        with self.locked(kind):
            if version is None:
                p.unlink(missing_ok=True)
                return
            self.manifest(kind, version)  # must exist
            atomic_write_text(p, version + "\n")

    def set_status(
        self, kind: str, version: str, status: Status, reason: str, numbers: dict[str, Any] | None = None,
        *, check: Callable[[Manifest], None] | None = None,
    ) -> Manifest:
        """Record a decision about a version (gate, canary, promotion, rollback) in its manifest.

        ``check`` sees the current manifest under the registry lock and raises to refuse the change,
        so a transition is judged on the status it really moves from, even with concurrent deciders.
        The manifest file is not covered by its own checksums, so rewriting it is safe."""
        d = self.version_dir(kind, version)
        with self.locked(kind):
            m = self.manifest(kind, version)
            if check is not None:
                check(m)
            now = datetime.now(timezone.utc)
            m.status, m.reason = status, reason
            m.history.append(StatusChange(status=status, reason=reason, at=now, numbers=numbers or {}))
            atomic_write_text(d / "manifest.json", m.model_dump_json(indent=2))
        return m

    @staticmethod
    def _clean_tmp(kdir: Path) -> None:
        # Leftovers of a publish that crashed (never visible as versions); a publisher still
        # copying holds its temp's lock, however slow it is (looprl.storage.temps).
        remove_abandoned(kdir, f"{TMP_PREFIX}*")


