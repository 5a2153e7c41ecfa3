"""Aliases and weighted canary routing, sticky per user.

An alias (e.g. ``policy``) names a primary adapter and optionally a canary adapter with a traffic
share. A user is sent to the canary iff ``bucket(alias, user) < share``, where the bucket is a
hash of (alias, user) in [0, 1). So the split is sticky per user, needs no state, and is
monotone: raising the share only moves users *into* the canary. Requests without a ``user``
are split at random.

The same function is used by the embedded server and by the gateway (``looprl.serving.gateway``),
which reads where the alias points from the routing file the adapter controller publishes
(``RoutingFile``: ``<state>/serving_routing.json``), so a user lands on the same side whichever
tier routes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Written by the adapter controller into the state directory after every pass.
ROUTING_FILE = "serving_routing.json"


def bucket(alias: str, user: str) -> float:
    digest = hashlib.sha256(f"{alias}\x00{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass(frozen=True)
class Route:
    """Where an alias points. ``primary``/``canary`` are adapter names; None means the base model."""

    primary: str | None = None
    canary: str | None = None
    share: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.share < 1.0:
            raise ValueError(f"canary share must be in [0, 1), got {self.share}")
        if self.canary is None and self.share:
            object.__setattr__(self, "share", 0.0)

    def choose(self, alias: str, user: str | None, rng: random.Random | None = None) -> tuple[str | None, str]:
        """(adapter name or None, role) for one request."""
        if self.canary is not None and self.share > 0:
            x = bucket(alias, user) if user else (rng or random).random()
            if x < self.share:
                return self.canary, "canary"
        return self.primary, "primary"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PublishedRoute:
    """Where the controller last *applied* an alias (every reachable endpoint loaded it): the route
    in served names (None = the base model) and the registry version of each served name."""

    alias: str
    route: Route
    versions: dict[str, str] = field(default_factory=dict)
    updated_at: float | None = None

    def version_of(self, name: str | None, base_name: str) -> str | None:
        return self.versions.get(name or base_name)


class RoutingFile:
    """The controller's ``serving_routing.json``, re-read when it changes (checked at most every
    ``poll_seconds``). Before the controller wrote one, the alias routes to the base model. A file
    that cannot be read keeps the last good route (the controller replaces it atomically, so that
    only happens on a broken disk), with a warning."""

    def __init__(self, path: str | Path, *, alias: str, base_name: str, poll_seconds: float = 0.5):
        self.path = Path(path)
        self.alias = alias
        self.base_name = base_name
        self.poll_seconds = poll_seconds
        self._lock = threading.Lock()
        self._checked = float("-inf")
        self._stamp: tuple[int, int] | None = None
        self._current = PublishedRoute(alias, Route(), {base_name: "base"})
        self.error: str | None = None

    def current(self) -> PublishedRoute:
        now = time.monotonic()
        if now - self._checked < self.poll_seconds:
            return self._current
        with self._lock:
            if now - self._checked >= self.poll_seconds:
                self._checked = now
                self._reload()
        return self._current

    def _reload(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp == self._stamp:
            return
        try:
            self._current = self.parse(json.loads(self.path.read_text()))
            self._stamp, self.error = stamp, None
        except (OSError, ValueError, TypeError, KeyError) as e:
            self.error = f"{self.path}: {type(e).__name__}: {e}"

    def parse(self, doc: dict[str, Any]) -> PublishedRoute:
        """A routing document as the controller writes it (``primary``/``canary`` served names,
        ``primary_version``/``canary_version``, ``share``); raises naming the bad key."""
        if not isinstance(doc, dict):
            raise ValueError("routing file: expected a JSON object")
        if doc.get("alias", self.alias) != self.alias:
            raise ValueError(f"routing file: key 'alias' is {doc.get('alias')!r}, this gateway serves {self.alias!r}")
        primary, canary = doc.get("primary"), doc.get("canary")
        for key, value in (("primary", primary), ("canary", canary)):
            if value is not None and not isinstance(value, str):
                raise ValueError(f"routing file: key {key!r} must be a model name or null")
        primary = None if primary in (None, self.base_name) else primary
        share = float(doc.get("share") or 0.0) if canary else 0.0
        route = Route(primary, canary, share)
        versions = {self.base_name: "base"}
        if primary is not None:
            versions[primary] = str(doc["primary_version"])
        if canary is not None:
            versions[canary] = str(doc["canary_version"])
        updated = doc.get("updated_at")
        return PublishedRoute(self.alias, route, versions, float(updated) if updated is not None else None)
