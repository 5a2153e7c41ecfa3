"""The adapter controller: makes every serving endpoint serve what the registry says.

Contract with the registry (kind ``policy``; pointer files written by the scheduler or by an
operator, replaced atomically):

- ``registry/policy/promoted``: the version all traffic of the alias gets (missing: base model);
- ``registry/policy/canary``: optional version that gets ``canary.traffic_share`` of users,
  sticky per user (missing, or equal to promoted: no canary).

Each version ``vN`` is served under the unique name ``policy-vN`` (never reusing a name: vLLM
keeps prefix-cache entries per name). One reconcile pass, for all endpoints in
``serving.endpoints``:

1. read the pointers, verify the versions' checksums;
2. observe every endpoint (embedded looprl server: ``GET /v1/looprl/state``; vLLM: ``GET /v1/models``);
3. load missing versions everywhere (``POST /v1/load_lora_adapter``; a vLLM endpoint gets the
   version's vLLM-layout copy, ``vN/vllm``, when it has one: ``looprl.storage.releases.adapter_dir``);
4. only if *every reachable endpoint* has them: flip the alias (embedded server,
   ``POST /v1/looprl/alias``), so endpoints never split between versions because one refused a load;
5. unload ``policy-v*`` names no longer needed, keeping ``serving.keep_previous`` previously
   promoted versions loaded for instant rollback. A name the routing file (below) named is
   unloaded only in a later pass, ``serving.unload_grace_seconds`` after a routing file without it
   was written: a gateway routes by that file, so unloading with the flip would answer the
   requests it still sends there with 404.

An adapter that an embedded server reports unhealthy (``serving.unhealthy_after`` failed requests
in a row) is treated as failing before step 1: a canary is rolled back, a promoted version gives
way to the previous promoted one (``looprl.storage.releases``), and the pass applies that.

Calls are retried with backoff; failures are counted per step; after every pass the observed
version of each endpoint is compared, and a split is reported as metric
(``looprl_controller_diverged``), a warning log and ``state/serving_routing.json``.

vLLM has no alias: there the controller only loads/unloads, and the routing file (same content
as the embedded server's alias state) tells a gateway or the product backend which adapter name
to send, with ``looprl.serving.routing.Route.choose`` for the same sticky canary split.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import Counter, Gauge

from looprl.ops.core.config import LooprlConfig
from looprl.ops.core.log import get_logger
from looprl.ops.core.retry import retrying
from looprl.serving.routing import ROUTING_FILE
from looprl.storage import releases
from looprl.storage.registry import Registry, RegistryError, atomic_write_text
from looprl.storage.releases import BASE, KIND, lora_name, version_number, version_of_lora

log = get_logger(__name__)


RECONCILES = Counter("looprl_controller_reconciles_total", "Reconcile passes", ["result"])
FAILURES = Counter("looprl_controller_failures_total", "Failed controller steps", ["endpoint", "step"])
ENDPOINT_VERSION = Gauge(
    "looprl_controller_endpoint_version", "Version number an endpoint serves (0 base, -1 unknown/none)",
    ["endpoint", "role"],
)
DESIRED_VERSION = Gauge("looprl_controller_desired_version", "Version number the registry asks for (0 base, -1 none)", ["role"])
DIVERGED = Gauge("looprl_controller_diverged", "1 if endpoints serve different versions or are not all reachable")
ENDPOINTS_UP = Gauge("looprl_controller_endpoints_up", "Endpoints that answered the last observation")
ROLLBACKS = Counter("looprl_controller_rollbacks_total", "Versions rolled back because serving reported them unhealthy",
                    ["role"])
LAST_SUCCESS = Gauge("looprl_controller_last_success_timestamp_seconds", "End of the last pass where all endpoints converged")


def _routed_adapters(routing: dict) -> set[str]:
    """The ``policy-v*`` names a routing document sends traffic to (the base is no adapter)."""
    return {n for n in (routing.get("primary"), routing.get("canary")) if isinstance(n, str) and version_of_lora(n)}


def _num(version: str | None, none: int = -1) -> int:
    """A version as a gauge value: its number (base 0), ``none`` when there is none."""
    return none if version is None else version_number(version)


class EndpointError(RuntimeError):
    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass
class Desired:
    promoted: str | None  # None = base model
    canary: str | None
    share: float

    def needed(self) -> list[str]:
        return [v for v in (self.promoted, self.canary) if v is not None]


@dataclass
class Observed:
    url: str
    kind: str = "unknown"  # "looprl" | "vllm" | "unknown"
    reachable: bool = False
    loaded: list[str] = field(default_factory=list)  # adapter names
    primary: str | None = None  # adapter name the alias routes to (looprl); None = base
    canary: str | None = None
    share: float = 0.0
    error: str | None = None
    unhealthy: dict[str, str] = field(default_factory=dict)  # adapter name -> its last error

    def serving(self, desired: Desired) -> tuple[str | None, str | None]:
        """(primary version, canary version) this endpoint would serve for the alias."""
        if self.kind == "vllm":  # vLLM serves whatever name the gateway sends, if it is loaded
            p = desired.promoted if desired.promoted is None or lora_name(desired.promoted) in self.loaded else "missing"
            c = desired.canary if desired.canary is None or lora_name(desired.canary) in self.loaded else "missing"
            return p, c
        ver = lambda n: None if n is None else (version_of_lora(n) or n)  # noqa: E731
        return ver(self.primary), ver(self.canary)


class EndpointClient:
    """HTTP to one endpoint (embedded looprl server or vLLM), with retries on transient errors.

    ``credentials`` are (config key, bearer token) pairs. An embedded looprl server takes
    ``serving.admin_token`` on its admin routes, vLLM takes its one ``--api-key``
    (``serving.vllm_api_key``) on every /v1 route, and each answers 401 to the other's. The first
    probe of ``/v1/looprl/state`` tries them in order until one is not refused; that one stays in use.
    """

    def __init__(self, url: str, *, credentials: list[tuple[str, str]], timeout: float, retries: int,
                 backoff: float = 0.2):
        self.url = url.rstrip("/")
        self.retries = retries
        self.backoff = backoff
        self.credentials = list(credentials)
        self.http = httpx.Client(base_url=self.url, timeout=timeout)
        self.kind: str | None = None

    def close(self) -> None:
        self.http.close()

    def call(self, method: str, path: str, body: dict | None = None) -> httpx.Response:
        """Retry connection errors and 5xx; a 4xx is an answer (refusal), returned at once."""
        return retrying(self.retries, initial=self.backoff, on=EndpointError)(self._request, method, path, body)

    def _request(self, method: str, path: str, body: dict | None) -> httpx.Response:
        try:
            r = self.http.request(method, path, json=body)
        except httpx.HTTPError as e:
            raise EndpointError(f"{method} {path}: {type(e).__name__}: {e}") from e
        if r.status_code >= 500:
            raise EndpointError(f"{method} {path}: HTTP {r.status_code}: {r.text[:300]}", r.status_code)
        return r

    def observe(self, alias: str) -> Observed:
        """What the endpoint has loaded and (embedded server) where its alias points."""
        obs = Observed(self.url)
        if self.kind in (None, "looprl"):
            r = self._probe()
            if r.status_code == 200:
                self.kind = "looprl"
                s = r.json()
                a = (s.get("aliases") or {}).get(alias) or {}
                canary = a.get("canary") or {}
                obs.kind, obs.reachable = "looprl", True
                obs.loaded = [x["name"] for x in s.get("adapters", [])]
                obs.primary = a.get("lora_name")
                obs.canary, obs.share = canary.get("lora_name"), float(canary.get("share") or 0.0)
                for x in s.get("adapters", []):
                    h = x.get("health") or {}
                    if h.get("healthy") is False:
                        obs.unhealthy[x["name"]] = str(h.get("last_error") or "failing requests")
                return obs
            if r.status_code == 401:
                tried = ", ".join(k for k, _ in self.credentials) or "no credential configured"
                raise EndpointError(f"GET /v1/looprl/state: HTTP 401: no credential accepted (tried: {tried}; "
                                    "a looprl server takes serving.admin_token, vLLM serving.vllm_api_key)", 401)
            if r.status_code != 404:
                raise EndpointError(f"GET /v1/looprl/state: HTTP {r.status_code}: {r.text[:300]}", r.status_code)
            self.kind = "vllm"
        r = self.call("GET", "/v1/models")
        if r.status_code != 200:
            raise EndpointError(f"GET /v1/models: HTTP {r.status_code}: {r.text[:300]}", r.status_code)
        obs.kind, obs.reachable = "vllm", True
        # vLLM lists LoRA adapters as models whose "parent" is the base model.
        obs.loaded = [d["id"] for d in r.json().get("data", []) if d.get("parent")]
        return obs

    def _probe(self) -> httpx.Response:
        """``GET /v1/looprl/state`` with each credential until one is not refused (401); the
        accepted one moves to the front, so later passes need one request."""
        if not self.credentials:
            return self.call("GET", "/v1/looprl/state")
        for i, (_, token) in enumerate(self.credentials):
            self.http.headers["Authorization"] = f"Bearer {token}"
            r = self.call("GET", "/v1/looprl/state")
            if r.status_code != 401:
                self.credentials.insert(0, self.credentials.pop(i))
                break
        return r

    def load(self, name: str, path: Path) -> None:
        r = self.call("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(path)})
        if r.status_code != 200:
            raise EndpointError(f"load {name}: HTTP {r.status_code}: {r.text[:500]}", r.status_code)

    def unload(self, name: str) -> None:
        r = self.call("POST", "/v1/unload_lora_adapter", {"lora_name": name})
        if r.status_code not in (200, 404):  # 404: already gone, which is what we wanted
            raise EndpointError(f"unload {name}: HTTP {r.status_code}: {r.text[:500]}", r.status_code)

    def set_alias(self, alias: str, primary: str | None, canary: str | None, share: float) -> None:
        body: dict[str, Any] = {"alias": alias, "lora_name": primary}
        if canary is not None:
            body["canary"] = {"lora_name": canary, "share": share}
        r = self.call("POST", "/v1/looprl/alias", body)
        if r.status_code != 200:
            raise EndpointError(f"alias {alias}: HTTP {r.status_code}: {r.text[:500]}", r.status_code)


@dataclass
class PassReport:
    desired: dict[str, Any]
    endpoints: list[dict[str, Any]]
    converged: bool
    diverged: bool
    errors: list[str]
    flipped: bool


class AdapterController:
    def __init__(self, cfg: LooprlConfig, *, endpoints: list[str] | None = None, token: str | None = None):
        self.cfg = cfg
        s = cfg.serving
        self.alias = s.alias
        self.registry = Registry(cfg.registry_dir)
        if token is None and s.admin_token is not None:
            token = s.admin_token.get_secret_value()
        # The inference key first: every client holds it anyway, while the admin token must never
        # reach a vLLM endpoint (or its logs) that accepts its own key.
        credentials = [(key, value) for key, value in (
            ("serving.vllm_api_key", s.vllm_api_key.get_secret_value() if s.vllm_api_key else None),
            ("serving.admin_token", token)) if value]
        self.clients = [EndpointClient(u, credentials=credentials, timeout=s.controller_timeout_seconds,
                                       retries=s.controller_retries)
                        for u in (endpoints if endpoints is not None else s.endpoints)]
        self.keep_previous = s.keep_previous
        self.state_path = cfg.state_dir / "controller.json"
        self.routing_path = cfg.state_dir / ROUTING_FILE
        self.history, self.applied = self._load_state()  # promoted versions (oldest first), last applied
        self.last: PassReport | None = None
        self.unload_grace = s.unload_grace_seconds
        # Served names in the routing file last written, and when each name left it (monotonic).
        self.routed: set[str] = self._routed_on_disk()
        self.left_routing: dict[str, float] = {}

    def close(self) -> None:
        for c in self.clients:
            c.close()

    # ------------------------------------------------------------------ registry
    def desired(self) -> Desired:
        promoted = releases.promoted_version(self.registry)
        canary = releases.canary_version(self.registry)
        for v in (promoted, canary):
            if v is not None:
                self.registry.verify(KIND, v)  # refuse a corrupted version before any endpoint sees it
        if canary == promoted:
            canary = None
        return Desired(promoted, canary, self.cfg.canary.traffic_share if canary else 0.0)

    def _load_state(self) -> tuple[list[str], Desired | None]:
        try:
            data = json.loads(self.state_path.read_text())
            applied = data.get("applied")
            return ([v for v in data.get("history", []) if isinstance(v, str)],
                    Desired(**applied) if isinstance(applied, dict) else None)
        except (FileNotFoundError, ValueError, TypeError):
            return [], None

    def _routed_on_disk(self) -> set[str]:
        """The adapter names a routing file left by an earlier controller sends traffic to."""
        try:
            return _routed_adapters(json.loads(self.routing_path.read_text()))
        except (FileNotFoundError, ValueError, TypeError, AttributeError):
            return set()

    def _may_unload(self, name: str) -> bool:
        """Whether no gateway may still send traffic to ``name`` (see step 5)."""
        if name in self.routed:
            return False
        left = self.left_routing.get(name)
        return left is None or time.monotonic() - left >= self.unload_grace

    def _remember(self, promoted: str | None) -> None:
        if promoted is None or (self.history and self.history[-1] == promoted):
            return
        self.history = [v for v in self.history if v != promoted] + [promoted]
        self.history = self.history[-(self.keep_previous + 5):]

    def keep_set(self, d: Desired) -> set[str]:
        prev = [v for v in self.history if v != d.promoted][-self.keep_previous:] if self.keep_previous else []
        return {lora_name(v) for v in d.needed() + prev}

    # ------------------------------------------------------------------ one pass
    def reconcile(self) -> PassReport:
        errors: list[str] = []
        try:
            d = self.desired()
        except RegistryError as e:
            FAILURES.labels(endpoint="registry", step="registry").inc()
            RECONCILES.labels(result="failed").inc()
            log.error("registry pointers unusable; endpoints left as they are", error=str(e))
            report = PassReport({}, [], False, bool(self.last and self.last.diverged), [str(e)], False)
            self.last = report
            return report
        DESIRED_VERSION.labels(role="promoted").set(_num(d.promoted, none=0))
        DESIRED_VERSION.labels(role="canary").set(_num(d.canary))

        observed: dict[str, Observed] = {}
        for c in self.clients:
            try:
                obs = c.observe(self.alias)
                # What an endpoint served before we first touched it counts as "previous".
                served = version_of_lora(obs.primary)
                if served and served not in self.history:
                    self.history.append(served)
            except EndpointError as e:
                obs = Observed(c.url, kind=c.kind or "unknown", reachable=False, error=str(e))
                FAILURES.labels(endpoint=c.url, step="observe").inc()
                errors.append(f"{c.url}: {e}")
            observed[c.url] = obs
        if self._roll_back_unhealthy(d, observed):
            d = self.desired()
        self._remember(d.promoted)
        keep = self.keep_set(d)
        reachable = [c for c in self.clients if observed[c.url].reachable]

        # Free slots first: names we own that nothing routes to and nothing needs.
        for c in reachable:
            o = observed[c.url]
            routed = {o.primary, o.canary}
            for name in list(o.loaded):
                if version_of_lora(name) and name not in keep and name not in routed and self._may_unload(name):
                    if self._try(c, "unload", errors, lambda: c.unload(name)):
                        o.loaded.remove(name)

        # Phase 1: load what is needed, everywhere.
        load_ok = True
        for c in reachable:
            o = observed[c.url]
            for v in d.needed():
                name = lora_name(v)
                if name in o.loaded:
                    continue
                # vLLM loads the version's vLLM-layout copy (per-expert LoRA on the fused experts)
                path = releases.adapter_dir(self.registry, v, engine="vllm" if o.kind == "vllm" else "looprl")
                if self._try(c, "load", errors, lambda: c.load(name, path)):
                    o.loaded.append(name)
                    log.info("adapter loaded on endpoint", endpoint=c.url, name=name)
                else:
                    load_ok = False

        # Phase 2: flip aliases only if every reachable endpoint can serve the new versions.
        flipped = False
        if load_ok:
            # Every reachable endpoint can serve d: from now on it is what traffic may be sent to.
            self.applied = d
            want_p = lora_name(d.promoted) if d.promoted else None
            want_c = lora_name(d.canary) if d.canary else None
            for c in reachable:
                o = observed[c.url]
                if o.kind != "looprl":
                    continue
                if (o.primary, o.canary, round(o.share, 6)) == (want_p, want_c, round(d.share, 6)):
                    continue
                if self._try(c, "alias", errors, lambda: c.set_alias(self.alias, want_p, want_c, d.share)):
                    log.info("alias flipped", endpoint=c.url, alias=self.alias, primary=want_p, previous=o.primary,
                             canary=want_c, share=d.share)
                    o.primary, o.canary, o.share = want_p, want_c, d.share
                    flipped = True

            # Phase 3: unload what is neither needed nor kept for rollback.
            for c in reachable:
                o = observed[c.url]
                for name in list(o.loaded):
                    if (version_of_lora(name) and name not in keep and name not in (o.primary, o.canary)
                            and self._may_unload(name)):
                        if self._try(c, "unload", errors, lambda: c.unload(name)):
                            o.loaded.remove(name)
        else:
            log.error("not flipping: a reachable endpoint could not load the desired versions; "
                      "all endpoints stay on their current version", desired=asdict(d))

        return self._finish(d, observed, errors, flipped)

    def _roll_back_unhealthy(self, d: Desired, observed: dict[str, Observed]) -> bool:
        """Roll back the canary or promoted version if an endpoint reports its adapter unhealthy.
        True if the registry pointers changed."""
        bad: dict[str, str] = {}
        for o in observed.values():
            for name, error in o.unhealthy.items():
                version = version_of_lora(name)
                if version:
                    bad.setdefault(version, f"unhealthy on {o.url}: {error}")
        changed = False
        for role, version in (("canary", d.canary), ("promoted", d.promoted)):
            if version is None or version not in bad:
                continue
            # Refused if the pointer (named like the role) moved since this pass read it: someone
            # decided meanwhile.
            seen = releases.Expected(pointers={role: version})
            try:
                if role == "canary":
                    rec = releases.roll_back_canary(self.registry, self.cfg.state_dir, version, bad[version],
                                                    by="controller", action="unhealthy_rollback", expected=seen)
                else:
                    rec = releases.roll_back_promoted(self.registry, self.cfg.state_dir, bad[version],
                                                      by="controller", action="unhealthy_rollback", expected=seen)
            except releases.StaleDecision as e:
                log.warning("unhealthy version not rolled back: the registry changed meanwhile; the next pass "
                            "judges what serves now", version=version, role=role, error=str(e))
                changed = True
                continue
            except (RegistryError, OSError) as e:
                FAILURES.labels(endpoint="registry", step="rollback").inc()
                log.error("could not roll back an unhealthy version", version=version, role=role, error=str(e))
                continue
            ROLLBACKS.labels(role=role).inc()
            log.error("unhealthy version rolled back", role=role, version=version, serving_now=rec.control,
                      reason=bad[version][:300])
            changed = True
        return changed

    def _try(self, c: EndpointClient, step: str, errors: list[str], fn) -> bool:
        try:
            fn()
            return True
        except EndpointError as e:
            FAILURES.labels(endpoint=c.url, step=step).inc()
            errors.append(f"{c.url}: {e}")
            log.warning("controller step failed", endpoint=c.url, step=step, error=str(e)[:500])
            return False

    def _finish(self, d: Desired, observed: dict[str, Observed], errors: list[str], flipped: bool) -> PassReport:
        serving = {}
        up = 0
        for url, o in observed.items():
            if o.reachable:
                up += 1
                p, c = o.serving(d)
                serving[url] = (p, c)
                ENDPOINT_VERSION.labels(endpoint=url, role="primary").set(
                    _num(p, none=0) if p != "missing" else -1)
                ENDPOINT_VERSION.labels(endpoint=url, role="canary").set(_num(c) if c != "missing" else -1)
            else:
                ENDPOINT_VERSION.labels(endpoint=url, role="primary").set(-1)
                ENDPOINT_VERSION.labels(endpoint=url, role="canary").set(-1)
        ENDPOINTS_UP.set(up)
        distinct = set(serving.values())
        want = (d.promoted, d.canary)
        diverged = len(distinct) > 1 or up < len(observed)
        converged = not diverged and distinct == {want}
        DIVERGED.set(1 if diverged else 0)
        if diverged:
            log.warning("endpoints diverge", desired=want,
                        serving={u: list(v) for u, v in serving.items()},
                        unreachable=[u for u, o in observed.items() if not o.reachable])
        if converged:
            LAST_SUCCESS.set(time.time())
        RECONCILES.labels(result="ok" if converged else ("failed" if errors else "pending")).inc()
        endpoints = []
        for url, o in observed.items():
            p, c = serving.get(url, (None, None))
            endpoints.append({**asdict(o), "serving_version": p if o.reachable else None,
                              "serving_canary_version": c if o.reachable else None})
        report = PassReport(asdict(d), endpoints, converged, diverged, errors, flipped)
        self.last = report
        self._write_state(d, report)
        return report

    def _write_state(self, d: Desired, report: PassReport) -> None:
        """``serving_routing.json``: where a gateway may send traffic (the last *applied* state,
        which every reachable endpoint could load), the desired state, and what each endpoint does."""
        a = self.applied or Desired(None, None, 0.0)
        routing = {
            "alias": self.alias,
            "primary": lora_name(a.promoted) if a.promoted else self.cfg.serving.served_model_name,
            "primary_version": a.promoted or BASE,
            "canary": lora_name(a.canary) if a.canary else None,
            "canary_version": a.canary,
            "share": a.share,
            "desired": asdict(d),
            "diverged": report.diverged,
            "converged": report.converged,
            "endpoints": report.endpoints,
            "errors": report.errors[-10:],
            "updated_at": time.time(),
        }
        try:
            atomic_write_text(self.routing_path, json.dumps(routing, indent=2, default=str))
            now_routed = _routed_adapters(routing)
            now = time.monotonic()
            for name in self.routed - now_routed:
                self.left_routing[name] = now
            for name in now_routed:
                self.left_routing.pop(name, None)
            self.routed = now_routed
            atomic_write_text(self.state_path, json.dumps(
                {"history": self.history, "applied": asdict(self.applied) if self.applied else None}, indent=2))
        except OSError as e:
            log.warning("could not write controller state", error=str(e))

    # ------------------------------------------------------------------ loop
    def run(self, stop: threading.Event | None = None, max_passes: int | None = None) -> None:
        stop = stop or threading.Event()
        passes = 0
        log.info("controller running", endpoints=[c.url for c in self.clients], alias=self.alias,
                 poll_seconds=self.cfg.serving.controller_poll_seconds)
        while not stop.is_set() and (max_passes is None or passes < max_passes):
            try:
                self.reconcile()
            except Exception as e:  # keep watching: the next pass may succeed
                RECONCILES.labels(result="failed").inc()
                log.exception("reconcile pass crashed", error=str(e))
            passes += 1
            stop.wait(self.cfg.serving.controller_poll_seconds)
