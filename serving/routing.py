"""Aliases and weighted canary routing, sticky per user.

An alias (e.g. ``policy``) names a primary adapter and optionally a canary adapter with a traffic
share. A user is sent to the canary iff ``bucket(alias, user) < share``, where the bucket is a
hash of (alias, user) in [0, 1). So the split is sticky per user, needs no state, and is
monotone: raising the share only moves users *into* the canary. Requests without a ``user``
are split at random.

The same function is used by the embedded server and by the controller's routing file for
vLLM deployments (where a gateway or the product backend applies the split), so a user lands
on the same side whichever tier routes them.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass
from typing import Any


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
