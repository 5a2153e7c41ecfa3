"""The serving state between the HTTP layer and the engine: model names, aliases, adapter admin.

One lock orders every decision that involves names: resolving a request's ``model`` (alias,
canary split, adapter name) *and* handing it to the engine happen under it, as do alias flips and
unloads. So a flip is atomic: a request either resolved before it (and keeps its adapter until
it finishes, even if that adapter is unloaded meanwhile) or after it.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from looprl.ops.core.log import get_logger
from looprl.ops.core.version import version_number
from looprl.serving import metrics as m
from looprl.serving.adapters import AdapterError, check_name, read_adapter
from looprl.serving.engine import BASE_VERSION, Engine, EngineError, Handle, Sink
from looprl.serving.routing import Route
from looprl.serving.sampling import SamplingParams

log = get_logger(__name__)

MAX_ALIASES = 8


@dataclass(frozen=True)
class Submitted:
    handle: Handle  # the first choice's
    adapter: str | None  # public adapter name; None = base model
    version: str  # what produced the answer: registry version or "base"
    role: str  # "primary" | "canary" | "direct"
    model_name: str  # what the response's "model" field says
    handles: tuple[Handle, ...] = ()  # every choice's (n > 1), in choice order

    def cancel(self) -> None:
        """Stop generating every choice (the client went away or timed out)."""
        for h in self.handles or (self.handle,):
            h.cancel()


class ServingService:
    def __init__(self, engine: Engine, *, registry_root: Path, base_name: str = "base",
                 alias: str = "policy", base_path: Path | None = None, seed: int = 0):
        self.engine = engine
        self.registry_root = Path(registry_root)
        self.base_name = base_name
        self.base_path = base_path
        self.default_alias = alias
        self.created = int(time.time())
        self._lock = threading.Lock()
        self._routes: dict[str, Route] = {alias: Route()}
        self._rng = random.Random(seed)
        self._publish_route_metrics(alias, Route())

    # ------------------------------------------------------------------ requests
    def submit(self, model: str, user: str | None, prompt_ids: list[int], params: SamplingParams | list[SamplingParams],
               sink: Sink | list[Sink], *, last_model: str | None = None, last_across_canary: bool = False) -> Submitted:
        """Resolve ``model`` for ``user`` and queue the generation; a list of params and sinks queues
        one generation per choice, all on the adapter resolved once (a canary split never splits
        the choices of one request).

        The last of several generations may be a comparison's second candidate, from another model:
        ``last_model`` names it (the gateway, which routed the alias itself, names the other arm);
        ``last_across_canary`` takes the other arm of the alias's canary split when it has a healthy
        canary. Either way the user sees the canary's answer beside the control's, to one question:
        a paired canary vote (``looprl.ops.canary``)."""
        params_list = params if isinstance(params, list) else [params]
        sinks = sink if isinstance(sink, list) else [sink]
        with self._lock:
            route, adapter, role = self._resolve(model, user)
            last = adapter
            if len(params_list) > 1 and last_model is not None:
                try:
                    last = self._resolve(last_model, user)[1]
                except EngineError as e:  # unloaded meanwhile: the comparison never fails the answer
                    log.warning("comparison candidate from the answer's own model", wanted=last_model, error=str(e))
            elif len(params_list) > 1 and last_across_canary:
                last = self._other_arm(route, adapter)
            if last == adapter:
                handles = self.engine.submit_many(prompt_ids, params_list, adapter, sinks)
            else:
                handles = self.engine.submit_many(prompt_ids, params_list[:-1], adapter, sinks[:-1])
                try:
                    try:
                        handles += self.engine.submit_many(prompt_ids, params_list[-1:], last, sinks[-1:])
                    except EngineError as e:  # the comparison never fails the answer: its own model
                        log.warning("comparison candidate from the answer's own model", error=str(e))
                        handles += self.engine.submit_many(prompt_ids, params_list[-1:], adapter, sinks[-1:])
                except Exception:  # all of them, or none
                    for h in handles:
                        h.cancel()
                    raise
        return Submitted(handles[0], adapter, handles[0].version, role, adapter or self.base_name,
                         handles=tuple(handles))

    def _resolve(self, model: str, user: str | None) -> tuple[Route | None, str | None, str]:
        """(the alias's route or None, adapter name or None for the base model, role) of ``model``
        for ``user``; under the lock."""
        route = self._routes.get(model)
        if route is not None:
            adapter, role = route.choose(model, user, self._rng)
            if role == "canary" and not self._healthy(adapter):
                # An unhealthy canary's users get the primary until the controller rolls it back.
                adapter, role = route.primary, "primary"
            return route, adapter, role
        if model == self.base_name:
            return None, None, "direct"
        if self.engine.resolve(model) is None:
            raise EngineError(f"model {model!r} does not exist; see GET /v1/models", reason="unknown_model")
        return None, model, "direct"

    def models(self) -> list[dict[str, Any]]:
        """OpenAI/vLLM's model list. ``root`` names the model, never a path: this list is public,
        and filesystem layout is for the admin state only."""
        out = [{"id": self.base_name, "object": "model", "created": self.created, "owned_by": "looprl",
                "root": self.base_name, "parent": None}]
        for a in self.engine.adapters():
            out.append({"id": a.name, "object": "model", "created": int(a.loaded_at), "owned_by": "looprl",
                        "root": a.version, "parent": self.base_name, "looprl_adapter_version": a.version})
        with self._lock:
            routes = dict(self._routes)
        for alias, r in routes.items():
            out.append({"id": alias, "object": "model", "created": self.created, "owned_by": "looprl",
                        "root": r.primary or self.base_name, "parent": self.base_name, "looprl_alias": r.to_json()})
        return out

    # ------------------------------------------------------------------ admin
    def load(self, name: str, path: str, force: bool = False) -> dict[str, Any]:
        """Load a registry version; ``force`` serves it even if it was rejected or rolled back."""
        with self._lock:
            reserved = {self.base_name, *self._routes}
        check_name(name, reserved)
        spec = read_adapter(name, path, self.registry_root, self.engine.inventory, self.engine.max_lora_rank,
                            force=force)
        if force:
            log.warning("adapter load forced past the manifest status check", name=name, version=spec.version)
        info = self.engine.load_adapter(spec)
        return info.public()

    def unload(self, name: str) -> dict[str, Any]:
        with self._lock:
            users = [a for a, r in self._routes.items() if name in (r.primary, r.canary)]
            if users:
                raise AdapterError(
                    f"lora_name {name!r} is in use by alias {users[0]!r}; point the alias elsewhere first",
                    reason="in_use",
                )
            info = self.engine.unload_adapter(name)
        return info.public()

    def set_alias(self, alias: str, primary: str | None, canary: str | None = None, share: float = 0.0) -> Route:
        primary = None if primary == self.base_name else primary
        with self._lock:
            if canary == self.base_name:
                raise AdapterError("a canary must be a loaded adapter, not the base model", reason="bad_alias")
            if alias == self.base_name or self.engine.resolve(alias) is not None:
                raise AdapterError(f"alias {alias!r} clashes with a model name", reason="bad_alias")
            if alias not in self._routes and len(self._routes) >= MAX_ALIASES:
                raise AdapterError(f"at most {MAX_ALIASES} aliases", reason="bad_alias")
            for name in (primary, canary):
                if name is not None and self.engine.resolve(name) is None:
                    raise AdapterError(f"lora_name {name!r} is not loaded; load it first", reason="not_found")
            if canary is not None and canary == primary:
                raise AdapterError("canary lora_name equals the primary", reason="bad_alias")
            try:
                route = Route(primary, canary, share if canary else 0.0)
            except ValueError as e:
                raise AdapterError(str(e), reason="bad_alias") from None
            old = self._routes.get(alias)
            self._routes[alias] = route
        if old is None or old.primary != route.primary:
            m.SWAPS.inc()
        self._publish_route_metrics(alias, route)
        log.info("alias set", alias=alias, primary=route.primary, canary=route.canary, share=route.share,
                 previous=old.primary if old else None)
        return route

    def _other_arm(self, route: Route | None, adapter: str | None) -> str | None:
        """The adapter of the canary split's other arm (None: the base model); ``adapter`` itself
        when there is no split to cross (no alias, no canary, or an unhealthy one)."""
        if route is None or route.canary is None or route.share <= 0 or not self._healthy(route.canary):
            return adapter
        if adapter == route.canary:
            return route.primary
        return route.canary if adapter == route.primary else adapter

    def _healthy(self, name: str | None) -> bool:
        info = self.engine.resolve(name) if name is not None else None
        return info is None or info.health.healthy

    def _version_of(self, name: str | None) -> str:
        if name is None:
            return BASE_VERSION
        info = self.engine.resolve(name)
        return info.version if info else BASE_VERSION

    def _publish_route_metrics(self, alias: str, route: Route) -> None:
        m.ACTIVE_VERSION.labels(alias=alias, role="primary").set(version_number(self._version_of(route.primary)))
        m.ACTIVE_VERSION.labels(alias=alias, role="canary").set(
            version_number(self._version_of(route.canary)) if route.canary else -1)
        m.CANARY_SHARE.labels(alias=alias).set(route.share)

    def state(self) -> dict[str, Any]:
        with self._lock:
            routes = dict(self._routes)
        aliases = {}
        for alias, r in routes.items():
            aliases[alias] = {
                "lora_name": r.primary, "version": self._version_of(r.primary),
                "canary": {"lora_name": r.canary, "version": self._version_of(r.canary), "share": r.share}
                if r.canary else None,
            }
        return {
            "base": {"name": self.base_name, "path": str(self.base_path) if self.base_path else None,
                     "checksum": self.engine.inventory.checksum},
            "adapters": [a.public() for a in self.engine.adapters()],
            "draining": [a.public() for a in self.engine.draining()],
            "aliases": aliases,
            "engine": self.engine.stats(),
            "health": self.engine.health(),
        }
