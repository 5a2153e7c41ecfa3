"""The one type for a registry version: ``v3`` on disk, in pointers, manifests and metrics; the
base model (no adapter) is version 0, written ``base``. Parsed here and nowhere else."""

from __future__ import annotations

import re
from dataclasses import dataclass

_VERSION_RE = re.compile(r"^v([1-9][0-9]*)$")
BASE_TEXT = "base"  # how the base model (no adapter) is written wherever a version is


@dataclass(frozen=True, order=True)
class Version:
    number: int

    def __post_init__(self) -> None:
        if self.number < 0:
            raise ValueError(f"a version number is >= 0, got {self.number}")

    @classmethod
    def parse(cls, text: "str | Version") -> "Version":
        """``"v3"`` -> Version(3); ``"base"`` -> BASE. Anything else is a ValueError naming it."""
        if isinstance(text, Version):
            return text
        if text == BASE_TEXT:
            return BASE
        m = _VERSION_RE.match(text) if isinstance(text, str) else None
        if m is None:
            raise ValueError(f"invalid version {text!r}: expected 'v<N>' (N >= 1) or 'base'")
        return cls(int(m.group(1)))

    @classmethod
    def parse_or_none(cls, text: "str | Version | None") -> "Version | None":
        """Like ``parse`` for values that may be missing or unversioned (None for those)."""
        if text is None:
            return None
        try:
            return cls.parse(text)
        except ValueError:
            return None

    @property
    def is_base(self) -> bool:
        return self.number == 0

    def __str__(self) -> str:
        return BASE_TEXT if self.is_base else f"v{self.number}"

    def lora_name(self, kind: str = "policy") -> str:
        """The name an adapter of this version is served under (never reused, as vLLM caches by name)."""
        if self.is_base:
            raise ValueError("the base model has no adapter name")
        return f"{kind}-{self}"

    @classmethod
    def from_lora_name(cls, name: str | None, kind: str = "policy") -> "Version | None":
        """``policy-v3`` -> Version(3); other names -> None."""
        if not name or not name.startswith(f"{kind}-"):
            return None
        v = cls.parse_or_none(name[len(kind) + 1:])
        return v if v is not None and not v.is_base else None


BASE = Version(0)


def version_number(text: "str | Version | None") -> int:
    """The number of a version string for gauges: "v3" -> 3; base, None and unversioned -> 0."""
    v = Version.parse_or_none(text)
    return v.number if v is not None else 0


def version_sort_key(text: str) -> tuple[int, int, str]:
    """Orders version texts for display: base, then v1, v2, ... by number, then anything unversioned."""
    v = Version.parse_or_none(text)
    return (0, v.number, text) if v is not None else (1, 0, text)
