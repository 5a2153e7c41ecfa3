"""`looprl gateway`: the OpenAI-compatible proxy product backends call instead of the model servers.

vLLM serves adapters by name and does nothing else; the gateway in front of it (or of
`looprl serving serve` replicas) closes the loop:

- **Routing.** A request for the alias (``serving.alias``, ``policy``) goes to the version the
  adapter controller last applied, or to the canary for a ``canary.traffic_share`` of users,
  sticky per OpenAI ``user`` (``looprl.serving.routing``: the same split as the embedded server,
  read from the controller's ``<state>/serving_routing.json``); the body's ``model`` is rewritten to
  the versioned adapter name (``policy-v7``). Other model names pass through unchanged.
- **Attribution.** Every answer carries the adapter version (header ``X-Looprl-Adapter``, JSON
  field ``looprl_adapter_version``, in every streamed chunk too) and its response id (header
  ``X-Looprl-Response-Id``: the OpenAI ``id``, which feedback names).
- **Response logging.** Every complete answer is logged as a ``ResponseEvent`` (messages,
  completion, version, sampling parameters as the client sent them, and the served token ids and
  log-probs when the upstream returns them: ``gateway.request_token_ids`` asks every upstream
  for them, and strips what the client did not ask for from its answer, streamed or not) through
  ``looprl.serving.attribution.ResponseRecorder``: never failing or delaying the request; while
  Kafka is down, answers are buffered up to ``gateway.max_buffered_logs`` and dropped (counted)
  beyond.
- **Upstreams.** Pooled keep-alive connections (httpx); a health check per upstream every
  ``gateway.health_interval_seconds``; a request goes to the healthy upstream with the fewest
  requests in flight. A connection that fails, an upstream that answers 502/503/504, or one that
  dies before its first streamed event is retried on another replica (``gateway.max_attempts``):
  the client has received nothing yet. An upstream that dies mid-stream ends the client's stream
  with an OpenAI-style error event (``data: {"error": {...}}``), and is counted.
- **Streaming.** Server-sent events pass through as they arrive, event for event and byte for
  byte, except the version field added to chunks that lack it and the token ids / log-probs the
  gateway asked for on its own (such a chunk is re-serialised without them).
- **Targeted comparisons.** ``looprl_compare`` goes to the upstream as sent; an answer's
  ``looprl_comparison`` (the second candidate) comes back to the client, and the gateway logs it
  as its own answer, under its own response id and the version the upstream names for it, when it
  logs the first. While the alias has a canary (``serving.compare_across_canary``), the gateway
  names the other arm's adapter for the second candidate (``looprl_compare_model``), so the user
  compares the canary's answer with the control's: a paired canary vote (``looprl.ops.canary``).
  Comparisons need ``looprl serve`` upstreams; vLLM answers without one.
- **Auth.** Clients send ``Authorization: Bearer <one of gateway.client_tokens>`` (required off
  loopback); the gateway sends the upstreams ``serving.vllm_api_key``, never the client's token,
  and forwards only ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions``.
- **Metrics** (``gateway.metrics_port``): ``looprl_gateway_requests_total``,
  ``_errors_total``, ``_request_seconds``, ``_time_to_first_token_seconds``,
  ``_streamed_bytes_total`` (each by upstream and adapter version), ``_retries_total``,
  ``_upstream_healthy``, ``_response_logs_dropped_total``, ``_response_logs_buffered``,
  ``_routed_version{role}`` (the version the alias routes to, refreshed with the health checks).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import random
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

import httpx
from prometheus_client import Counter, Gauge, Histogram
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route as HttpRoute

from looprl.ops.core.chat import Chat, ChatError
from looprl.ops.core.config import LooprlConfig, require_token_off_loopback
from looprl.ops.core.errors import error_body, error_response
from looprl.ops.core.listen import HttpThread
from looprl.ops.core.log import get_logger
from looprl.ops.core.version import version_number
from looprl.serving.attribution import (
    ADAPTER_HEADER, COMPARISON_FIELD, RESPONSE_ID_HEADER, VERSION_FIELD, ResponseRecorder, choice_response_id,
    choice_seed, logged_conversation, response_event, sampling_of, served_version,
)
from looprl.serving.routing import ROUTING_FILE, RoutingFile

log = get_logger(__name__)

PATHS = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 600)
_LABELS = ["upstream", "adapter_version"]

REQUESTS = Counter("looprl_gateway_requests_total", "Requests answered by the gateway",
                   ["endpoint", "upstream", "adapter_version", "status"])
ERRORS = Counter("looprl_gateway_errors_total", "Failed upstream attempts and failed answers",
                 ["upstream", "adapter_version", "reason"])
LATENCY = Histogram("looprl_gateway_request_seconds", "Request time through the gateway, to the last byte",
                    _LABELS, buckets=_LATENCY_BUCKETS)
TTFT = Histogram("looprl_gateway_time_to_first_token_seconds", "Time to the first streamed token",
                 _LABELS, buckets=_LATENCY_BUCKETS)
STREAMED = Counter("looprl_gateway_streamed_bytes_total", "Response bytes sent to clients", _LABELS)
RETRIES = Counter("looprl_gateway_retries_total", "Requests moved to another replica before any byte streamed",
                  ["upstream"])
UPSTREAM_UP = Gauge("looprl_gateway_upstream_healthy", "1 if the upstream passed its last health check", ["upstream"])
LOGS_DROPPED = Counter("looprl_gateway_response_logs_dropped_total",
                       "Answers not logged: Kafka unreachable with the buffer full, or refused by the logger")
LOGS_BUFFERED = Gauge("looprl_gateway_response_logs_buffered", "Answers waiting for Kafka (buffered and in flight)")
ROUTED_VERSION = Gauge("looprl_gateway_routed_version",
                       "Registry version number the alias routes to (0 = base model; canary -1 = none)", ["role"])

# Connection pools to the upstreams (see Gateway.__init__).
POOL_SHARDS = 8
KEEPALIVE_S = 4.0
# Statuses after which another replica may do better (the client has received nothing yet).
_RETRY_STATUSES = (502, 503, 504)


def _error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict:
    return error_body(message, type=kind, param=param, code=code)


def _error(status: int, message: str, *, code: str | None = None, param: str | None = None) -> JSONResponse:
    # The shape shared with serving and the feedback collector (looprl.ops.core.errors).
    return error_response(status, message, param=param, code=code)


def _sse_error(message: str, code: str) -> bytes:
    return f"data: {json.dumps(_error_body(message, 'server_error', code))}\n\n".encode()


@dataclass
class Upstream:
    url: str
    healthy: bool = True  # until the first check says otherwise
    kind: str = "unknown"  # "looprl" (its /health is JSON with "models") | "vllm"
    inflight: int = 0
    last_error: str | None = None

    def mark(self, healthy: bool, error: str | None = None) -> None:
        if healthy != self.healthy:
            (log.info if healthy else log.warning)("upstream " + ("up" if healthy else "down"), upstream=self.url,
                                                  error=error)
        self.healthy, self.last_error = healthy, error
        UPSTREAM_UP.labels(upstream=self.url).set(1 if healthy else 0)


class _Events:
    """Splits a server-sent-event byte stream into whole events, each with its separator, bytes
    unchanged."""

    def __init__(self) -> None:
        self.buf = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        self.buf += chunk
        out = []
        while True:
            i, j = self.buf.find(b"\n\n"), self.buf.find(b"\r\n\r\n")
            if i < 0 and j < 0:
                return out
            end = (j + 4) if i < 0 or (0 <= j < i) else (i + 2)
            out.append(self.buf[:end])
            self.buf = self.buf[end:]


def _data(event: bytes) -> bytes | None:
    """The ``data`` of an event (lines joined), or None if it has none."""
    lines = [ln.rstrip(b"\r") for ln in event.split(b"\n")]
    data = [ln[5:].lstrip(b" ") if ln.startswith(b"data:") else None for ln in lines]
    data = [d for d in data if d is not None]
    return b"\n".join(data) if data else None


def _with_version(event: bytes, version: str) -> bytes:
    """``event`` with the version field added as the first key of its JSON object."""
    k = event.find(b"{")
    if k < 0:
        return event
    rest = event[k + 1:]
    sep = b"" if rest.lstrip().startswith(b"}") else b", "
    return event[:k + 1] + f'"{VERSION_FIELD}": {json.dumps(version)}'.encode() + sep + rest


def _logprob_values(lp: dict, endpoint: str) -> list:
    """The sampled tokens' log-probs of an OpenAI ``logprobs`` object (chat or legacy shape)."""
    if endpoint == "chat":
        return [x.get("logprob") for x in lp.get("content") or [] if isinstance(x, dict)]
    return list(lp.get("token_logprobs") or [])


def _strip(obj: dict, added: frozenset[str]) -> bool:
    """Remove from an answer (or stream chunk) what the gateway asked for on its own (``added``:
    "logprobs", "token_ids"); True if ``obj`` changed."""
    changed = False
    places = [c for c in obj.get("choices") or [] if isinstance(c, dict)]
    if isinstance(obj.get(COMPARISON_FIELD), dict):
        places.append(obj[COMPARISON_FIELD])
    for place in places:
        if "token_ids" in added and "token_ids" in place:
            del place["token_ids"]
            changed = True
        if "logprobs" in added and place.get("logprobs") is not None:
            if place is obj.get(COMPARISON_FIELD):
                del place["logprobs"]
            else:
                place["logprobs"] = None
            changed = True
    return changed


class _Choice:
    """One choice of an answer: its text, served token ids and log-probs, how it ended."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.token_ids: list[int] | None = []
        self.logprobs: list[float] | None = []
        self.finish: str | None = None


class _Answer:
    """What a response says, gathered from its JSON or its streamed chunks, for the log: one
    ``_Choice`` per choice index (n > 1 answers have several, each logged on its own)."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint
        self.id: str | None = None
        self.model: str | None = None
        self.version: str | None = None
        self.choices: dict[int, _Choice] = {}
        self.error: str | None = None
        self.comparison: dict | None = None  # looprl_comparison: the second candidate of a targeted comparison

    @property
    def finish(self) -> str | None:
        """The finish reason, once every choice has one (None before)."""
        ends = [c.finish for c in self.choices.values()]
        return ends[0] if ends and all(ends) else None

    def add(self, obj: dict, whole: bool) -> bool:
        """Take one response object (``whole``) or stream chunk; True if it carries a token."""
        if "error" in obj and not obj.get("choices"):
            err = obj.get("error")
            self.error = str(err.get("message") if isinstance(err, dict) else err)[:500]
            return False
        self.id = self.id or obj.get("id")
        self.model = self.model or obj.get("model")
        self.version = self.version or obj.get(VERSION_FIELD)
        if isinstance(obj.get(COMPARISON_FIELD), dict):
            self.comparison = dict(obj[COMPARISON_FIELD])  # a copy: the client's may be stripped
        carried = False
        for choice in obj.get("choices") or []:
            if isinstance(choice, dict) and isinstance(choice.get("index", 0), int):
                carried = self._add_choice(choice, whole) or carried
        return carried

    def _add_choice(self, choice: dict, whole: bool) -> bool:
        c = self.choices.setdefault(choice.get("index", 0), _Choice())
        if self.endpoint == "chat":
            msg = choice.get("message" if whole else "delta") or {}
            text = msg.get("content") if isinstance(msg, dict) else None
        else:
            text = choice.get("text")
        if isinstance(text, str) and text:
            c.text.append(text)
        ids = choice.get("token_ids")
        if isinstance(ids, list) and c.token_ids is not None:
            c.token_ids.extend(ids)
        lp = choice.get("logprobs")
        if isinstance(lp, dict) and c.logprobs is not None:
            c.logprobs.extend(_logprob_values(lp, self.endpoint))
        if choice.get("finish_reason"):
            c.finish = choice["finish_reason"]
        return bool(text) or bool(ids)


@dataclass
class _Call:
    """One request on its way: where it goes and what it is."""

    endpoint: str
    path: str
    body: dict
    stream: bool
    version: str | None
    t0: float
    routed: bool = False  # the alias, rewritten to a versioned name
    added: frozenset[str] = frozenset()  # what the gateway asked for and the client did not: stripped
    refusal: tuple[Upstream, Response] | None = None  # an upstream that does not have that name (yet)


class Gateway:
    """The gateway's state and its ASGI app (``app``). ``upstreams``: base URLs; ``routing``: the
    controller's routing file; ``recorder``: where answers are logged (None: not logged)."""

    def __init__(self, upstreams: list[str], *, routing: RoutingFile, alias: str, base_name: str,
                 client_tokens: list[str] = (), upstream_key: str | None = None,
                 recorder: ResponseRecorder | None = None, connect_timeout: float = 2.0,
                 read_timeout: float = 600.0, max_attempts: int = 3, max_connections: int = 512,
                 health_interval: float = 2.0, request_token_ids: bool = True,
                 max_body_bytes: int = 1024 * 1024, seed: int | None = None, compare_across_canary: bool = True):
        if not upstreams:
            raise ValueError("gateway: no upstreams (gateway.upstreams or serving.endpoints)")
        self.upstreams = [Upstream(u.rstrip("/")) for u in dict.fromkeys(upstreams)]
        for u in self.upstreams:
            UPSTREAM_UP.labels(upstream=u.url).set(1)
        self.routing = routing
        self.alias = alias
        self.base_name = base_name
        self.client_tokens = [t.encode() for t in client_tokens]
        # identity: streamed bytes are relayed as they are, so they must not be compressed.
        self.upstream_headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
        if upstream_key:
            self.upstream_headers["Authorization"] = f"Bearer {upstream_key}"
        self.recorder = recorder
        self.timeout = httpx.Timeout(connect=connect_timeout, read=read_timeout, write=read_timeout,
                                     pool=connect_timeout)
        self.max_attempts = max_attempts
        # Several small connection pools instead of one: httpcore scans every connection of a pool
        # (a poll() each) whenever a request starts or ends, so one pool of 64 busy connections
        # cost more CPU than the proxying itself (measured: benchmarks/gateway.py).
        self.shards = max(1, min(POOL_SHARDS, max_connections // 8))
        per = -(-max_connections // self.shards)
        # Idle connections are dropped before the upstream's own keep-alive timeout (uvicorn, and so
        # vLLM: 5 s, httpx's default too), so none is reused just as the upstream closes it.
        self.limits = httpx.Limits(max_connections=per, max_keepalive_connections=per, keepalive_expiry=KEEPALIVE_S)
        self.health_interval = health_interval
        self.request_token_ids = request_token_ids
        self.max_body_bytes = max_body_bytes
        self.compare_across_canary = compare_across_canary
        self.rng = random.Random(seed)
        self._next = 0
        self._shard = 0
        self.pools: list[httpx.AsyncClient] = []
        self._health_task: asyncio.Task | None = None
        self.app = Starlette(routes=[
            HttpRoute("/v1/chat/completions", self.chat, methods=["POST"]),
            HttpRoute("/v1/completions", self.completions, methods=["POST"]),
            HttpRoute("/v1/models", self.models, methods=["GET"]),
            HttpRoute("/health", self.health, methods=["GET"]),
        ], lifespan=self._lifespan)

    # ------------------------------------------------------------------ lifecycle
    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Any) -> AsyncIterator[None]:
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    async def start(self) -> None:
        self.pools = [httpx.AsyncClient(timeout=self.timeout, limits=self.limits) for _ in range(self.shards)]
        await self.check_health()
        self._health_task = asyncio.create_task(self._health_loop())

    async def stop(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        for pool in self.pools:
            await pool.aclose()

    @property
    def http(self) -> httpx.AsyncClient:
        """The next connection pool, round robin."""
        self._shard = (self._shard + 1) % len(self.pools)
        return self.pools[self._shard]

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval)
            try:
                await self.check_health()
            except Exception as e:  # keep checking
                log.warning("health check round failed", error=str(e)[:300])

    async def check_health(self) -> None:
        await asyncio.gather(*(self._check(u) for u in self.upstreams))
        self._export_route()

    def _export_route(self) -> None:
        """Where the alias routes now, as version numbers (the dashboard's served version, and the
        controller-divergence alert's comparison with the promoted version)."""
        published = self.routing.current()
        route = published.route
        ROUTED_VERSION.labels(role="primary").set(version_number(published.version_of(route.primary, self.base_name)))
        ROUTED_VERSION.labels(role="canary").set(
            version_number(published.version_of(route.canary, self.base_name)) if route.canary else -1)

    async def _check(self, up: Upstream) -> None:
        try:
            r = await self.http.get(f"{up.url}/health", timeout=min(5.0, self.health_interval + 1.0))
        except httpx.HTTPError as e:
            up.mark(False, f"{type(e).__name__}: {e}"[:300])
            return
        if r.status_code != 200:
            up.mark(False, f"GET /health: HTTP {r.status_code}")
            return
        try:
            doc = r.json()
        except ValueError:
            doc = None
        up.kind = "looprl" if isinstance(doc, dict) and "models" in doc else "vllm"
        up.mark(True)

    # ------------------------------------------------------------------ upstream choice
    def _pick(self, tried: set[str]) -> Upstream | None:
        """The healthy untried upstream with the fewest requests in flight (round robin among
        equals); an untried unhealthy one if none is healthy (its check may be stale)."""
        left = [u for u in self.upstreams if u.url not in tried]
        if not left:
            return None
        pool = [u for u in left if u.healthy] or left
        least = min(u.inflight for u in pool)
        best = [u for u in pool if u.inflight == least]
        self._next += 1
        return best[self._next % len(best)]

    # ------------------------------------------------------------------ auth and body
    def _refused(self, request: Request) -> JSONResponse | None:
        if not self.client_tokens:
            return None
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        token = given.strip().encode()
        if scheme.lower() == "bearer" and token and any(hmac.compare_digest(token, t) for t in self.client_tokens):
            return None
        return _error(401, "missing or wrong bearer token (gateway.client_tokens)", code="unauthorized")

    async def _body(self, request: Request) -> dict | JSONResponse:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return _error(413, f"request body of {declared} bytes is over the limit of {self.max_body_bytes} "
                               "(gateway.max_body_bytes)", code="too_large")
        chunks, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > self.max_body_bytes:
                return _error(413, f"request body is over the limit of {self.max_body_bytes} bytes "
                                   "(gateway.max_body_bytes)", code="too_large")
            chunks.append(part)
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            return _error(400, f"request body is not JSON: {e}"[:300], code="bad_json")
        if not isinstance(body, dict):
            return _error(400, "request body must be a JSON object", code="invalid_request")
        if not isinstance(body.get("model"), str) or not body["model"]:
            return _error(400, "model: a model name is required", param="model", code="invalid_request")
        if body.get("user") is not None and not isinstance(body["user"], str):
            return _error(400, "user: must be a string", param="user", code="invalid_request")
        return body

    # ------------------------------------------------------------------ routes
    async def chat(self, request: Request) -> Response:
        return await self._inference(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._inference(request, "completions")

    async def _inference(self, request: Request, endpoint: str) -> Response:
        t0 = time.perf_counter()
        refused = self._refused(request)
        if refused is not None:
            return self._finish_early(endpoint, refused)
        body = await self._body(request)
        if isinstance(body, Response):
            return self._finish_early(endpoint, body)
        client_body = dict(body)
        requested = body["model"]
        if requested == self.alias:
            published = self.routing.current()
            route = published.route
            name, role = route.choose(self.alias, body.get("user"), self.rng)
            body["model"] = name or self.base_name
            version = published.version_of(name, self.base_name)
            if (self.compare_across_canary and endpoint == "chat" and route.canary is not None
                    and body.get("looprl_compare") in ("auto", "always") and body.get("n", 1) == 1):
                # The comparison's second candidate from the other arm: a paired canary vote.
                other = route.primary if role == "canary" else route.canary
                body["looprl_compare_model"] = other or self.base_name
        else:
            version = served_version(requested, self.base_name)
        path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
        call = _Call(endpoint, path, body, bool(body.get("stream")), version, t0, routed=requested == self.alias)
        self._ask_for_tokens(call)
        return await self._forward(call, client_body)

    def _finish_early(self, endpoint: str, response: Response) -> Response:
        REQUESTS.labels(endpoint=endpoint, upstream="none", adapter_version="none",
                        status=str(response.status_code)).inc()
        return response

    def _ask_for_tokens(self, call: _Call) -> None:
        """With ``gateway.request_token_ids``: ask the upstream (vLLM or looprl serve) for the served
        token ids and their log-probs, to log them; what the client did not ask for is stripped
        from its answer (``call.added``). A client's ``top_logprobs`` without ``logprobs`` is left
        as sent, for the upstream to refuse as OpenAI does."""
        body = call.body
        if not self.request_token_ids:
            return
        added = set()
        if not body.get("return_token_ids"):
            body["return_token_ids"] = True
            added.add("token_ids")
        if call.endpoint == "chat":
            if not body.get("logprobs") and body.get("top_logprobs") is None:
                body["logprobs"] = True
                added.add("logprobs")
        elif body.get("logprobs") is None:
            body["logprobs"] = 0  # the sampled tokens' only
            added.add("logprobs")
        call.added = frozenset(added)

    def _payload(self, call: _Call, up: Upstream) -> bytes:
        return json.dumps(call.body).encode()

    async def _forward(self, call: _Call, client_body: dict) -> Response:
        tried: set[str] = set()
        last_error = "no upstream"
        for attempt in range(self.max_attempts):
            up = self._pick(tried)
            if up is None:
                break
            tried.add(up.url)
            if attempt:
                RETRIES.labels(upstream=up.url).inc()
            up.inflight += 1
            handed_over = False
            try:
                result = await self._attempt(call, up, client_body)
                if isinstance(result, str):  # nothing reached the client: try another replica
                    last_error = result
                    continue
                handed_over = isinstance(result, StreamingResponse)  # the stream releases `up` itself
                return result
            finally:
                if not handed_over:
                    up.inflight -= 1
        if call.refusal is not None:  # every replica tried said "no such model": that is the answer
            up, response = call.refusal
            return self._done(call, up, call.version, response.status_code, response)
        version = call.version or "unknown"
        REQUESTS.labels(endpoint=call.endpoint, upstream="none", adapter_version=version, status="503").inc()
        ERRORS.labels(upstream="none", adapter_version=version, reason="no_upstream").inc()
        return _error(503, f"no upstream could answer ({last_error})", code="upstream_unavailable")

    async def _attempt(self, call: _Call, up: Upstream, client_body: dict) -> Response | str:
        """One upstream's answer; a string (the reason) if it failed before the client got anything."""
        version = call.version or "unknown"
        http = self.http
        req = http.build_request("POST", up.url + call.path, content=self._payload(call, up),
                                 headers=self.upstream_headers)
        try:
            try:
                resp = await http.send(req, stream=True)
            except (httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError):
                # A kept-alive connection the upstream closed just as it was reused (its idle
                # timeout): it took nothing of the request. Once more, on a new connection.
                ERRORS.labels(upstream=up.url, adapter_version=version, reason="stale_connection").inc()
                resp = await http.send(req, stream=True)
        except httpx.HTTPError as e:
            reason = f"{up.url}: {type(e).__name__}: {e}"[:300]
            up.mark(False, reason)
            ERRORS.labels(upstream=up.url, adapter_version=version, reason="connect").inc()
            return reason
        version = resp.headers.get(ADAPTER_HEADER) or call.version
        # A replica that has not loaded the routed version yet (it just restarted; the controller
        # loads it within a pass) may be the only one: another replica may have it.
        if resp.status_code in _RETRY_STATUSES or (resp.status_code == 404 and call.routed):
            raw = await self._read(resp)
            ERRORS.labels(upstream=up.url, adapter_version=version or "unknown",
                          reason=f"upstream_{resp.status_code}").inc()
            if resp.status_code == 404:
                call.refusal = (up, Response(raw, status_code=404, media_type=resp.headers.get("content-type")))
            return f"{up.url}: HTTP {resp.status_code}: {raw.decode(errors='replace')[:300]}"
        if resp.status_code != 200:  # the upstream's answer about this request: passed on as is
            raw = await self._read(resp)
            ERRORS.labels(upstream=up.url, adapter_version=version or "unknown",
                          reason=f"upstream_{resp.status_code}").inc()
            return self._done(call, up, version, resp.status_code, Response(
                raw, status_code=resp.status_code, media_type=resp.headers.get("content-type")))
        if call.stream:
            return await self._stream(call, up, resp, version, client_body)
        return await self._whole(call, up, resp, version, client_body)

    @staticmethod
    async def _read(resp: httpx.Response) -> bytes:
        try:
            return await resp.aread()
        except httpx.HTTPError:
            return b""
        finally:
            await resp.aclose()

    def _done(self, call: _Call, up: Upstream, version: str | None, status: int, response: Response) -> Response:
        labels = {"upstream": up.url, "adapter_version": version or "unknown"}
        REQUESTS.labels(endpoint=call.endpoint, status=str(status), **labels).inc()
        LATENCY.labels(**labels).observe(time.perf_counter() - call.t0)
        return response

    def _headers(self, version: str | None, response_id: str | None) -> dict[str, str]:
        h = {}
        if version:
            h[ADAPTER_HEADER] = version
        if response_id:
            h[RESPONSE_ID_HEADER] = str(response_id)
        return h

    # ------------------------------------------------------------------ whole answers
    async def _whole(self, call: _Call, up: Upstream, resp: httpx.Response, version: str | None,
                     client_body: dict) -> Response | str:
        try:
            raw = await resp.aread()
        except httpx.HTTPError as e:
            reason = f"{up.url}: {type(e).__name__} while reading the answer: {e}"[:300]
            up.mark(False, reason)
            ERRORS.labels(upstream=up.url, adapter_version=version or "unknown", reason="upstream_died").inc()
            return reason
        finally:
            await resp.aclose()
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            ERRORS.labels(upstream=up.url, adapter_version=version or "unknown", reason="bad_answer").inc()
            return self._done(call, up, version, 502, _error(502, f"upstream {up.url} answered with invalid JSON",
                                                             code="bad_upstream_answer"))
        answer = _Answer(call.endpoint)
        answer.add(doc, whole=True)
        version = version or answer.version or served_version(answer.model, self.base_name)
        changed = bool(call.added) and _strip(doc, call.added)
        if version and VERSION_FIELD not in doc:
            doc[VERSION_FIELD] = version
            changed = True
        if changed:
            raw = json.dumps(doc).encode()
        answer.version = version
        self._log(call, client_body, answer)
        STREAMED.labels(upstream=up.url, adapter_version=version or "unknown").inc(len(raw))
        return self._done(call, up, version, 200, Response(raw, media_type="application/json",
                                                           headers=self._headers(version, answer.id)))

    # ------------------------------------------------------------------ streams
    async def _stream(self, call: _Call, up: Upstream, resp: httpx.Response, version: str | None,
                      client_body: dict) -> Response | str:
        events = _Events()
        chunks = resp.aiter_raw()
        answer = _Answer(call.endpoint)
        pending: list[bytes] = []
        try:  # up to the first whole event: until then the client has nothing and may go elsewhere
            while not pending:
                pending = events.feed(await chunks.__anext__())
        except (StopAsyncIteration, httpx.HTTPError) as e:
            await resp.aclose()
            why = "closed the stream" if isinstance(e, StopAsyncIteration) else f"{type(e).__name__}: {e}"
            reason = f"{up.url}: {why} before its first event"[:300]
            up.mark(False, reason)
            ERRORS.labels(upstream=up.url, adapter_version=version or "unknown", reason="upstream_died").inc()
            return reason
        first = _data(pending[0])
        if first and first.startswith(b"{"):
            with contextlib.suppress(ValueError):
                obj = json.loads(first)
                answer.id = obj.get("id")
                version = version or obj.get(VERSION_FIELD) or served_version(obj.get("model"), self.base_name)
        answer.version = version
        labels = {"upstream": up.url, "adapter_version": version or "unknown"}
        return StreamingResponse(self._relay(call, up, resp, chunks, events, pending, answer, labels, client_body),
                                 media_type=resp.headers.get("content-type", "text/event-stream"),
                                 headers={**self._headers(version, answer.id), "Cache-Control": "no-cache"})

    async def _relay(self, call: _Call, up: Upstream, resp: httpx.Response, chunks: AsyncIterator[bytes],
                     events: _Events, pending: list[bytes], answer: _Answer, labels: dict[str, str],
                     client_body: dict) -> AsyncIterator[bytes]:
        streamed = STREAMED.labels(**labels)
        first_token = True
        done = False
        status = "200"
        # A reader task takes the upstream's chunks as they come; each send to the client carries
        # every chunk received by then. Chunks that arrived together (one read from the socket)
        # leave together, and one write per event would cost most of the gateway's CPU.
        arrived: asyncio.Queue = asyncio.Queue()
        reader = asyncio.create_task(_pump(chunks, arrived))
        try:
            while True:
                out = []
                for ev in pending:
                    data = _data(ev)
                    if data == b"[DONE]":
                        done = True
                        self._log(call, client_body, answer)  # before the client sees the end
                    elif data and data.startswith(b"{"):
                        try:
                            obj = json.loads(data)
                        except ValueError:
                            obj = None
                        if isinstance(obj, dict):
                            if answer.add(obj, whole=False) and first_token:
                                first_token = False
                                TTFT.labels(**labels).observe(time.perf_counter() - call.t0)
                            if call.added and _strip(obj, call.added):
                                ev = b"data: " + json.dumps(obj).encode() + b"\n\n"
                            if answer.version and VERSION_FIELD not in obj and "error" not in obj:
                                ev = _with_version(ev, answer.version)
                    out.append(ev)
                if out:
                    piece = b"".join(out)
                    streamed.inc(len(piece))
                    yield piece
                if done:
                    return
                got = [await arrived.get()]
                while not arrived.empty():
                    got.append(arrived.get_nowait())
                failure = next((g for g in got if isinstance(g, BaseException)), None)
                ended = any(g is _END for g in got)
                pending = events.feed(b"".join(g for g in got if isinstance(g, bytes)))
                if failure is not None and not pending:
                    raise failure
                if (ended or failure is not None) and not pending:
                    break
                if failure is not None:  # relay what came before the failure, then report it
                    arrived.put_nowait(failure)
                elif ended:
                    arrived.put_nowait(_END)
            # The upstream closed without [DONE]: complete only if the answer said it finished.
            if answer.error:
                status = "error"
                ERRORS.labels(reason="upstream_error", **labels).inc()
            elif answer.finish and not events.buf.strip():
                self._log(call, client_body, answer)
            else:
                status = "error"
                ERRORS.labels(reason="upstream_died", **labels).inc()
                log.warning("upstream ended a stream mid-answer", upstream=up.url, response_id=answer.id)
                err = _sse_error(f"the model server {up.url} ended the stream before the answer was complete",
                                 "upstream_disconnected")
                streamed.inc(len(err))
                yield err
        except httpx.HTTPError as e:
            status = "error"
            up.mark(False, f"{type(e).__name__} mid-stream: {e}"[:300])
            ERRORS.labels(reason="upstream_died", **labels).inc()
            log.warning("upstream died mid-stream", upstream=up.url, response_id=answer.id,
                        error=f"{type(e).__name__}: {e}"[:300])
            err = _sse_error(f"the model server {up.url} failed mid-stream ({type(e).__name__}); the answer "
                             "is incomplete", "upstream_disconnected")
            streamed.inc(len(err))
            yield err
        finally:
            up.inflight -= 1
            if done:  # let the reader take the stream's end, so the connection goes back to the pool
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(reader), timeout=1.0)
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
            await resp.aclose()  # before its end: closes the connection, so the upstream stops generating
            REQUESTS.labels(endpoint=call.endpoint, status=status, **labels).inc()
            LATENCY.labels(**labels).observe(time.perf_counter() - call.t0)

    # ------------------------------------------------------------------ logging
    def _log(self, call: _Call, client_body: dict, answer: _Answer) -> None:
        """Record a complete answer, each choice as its own event under ``choice_response_id``
        (as the embedded server logs them; never raises, never waits)."""
        if self.recorder is None or answer.error or not answer.id:
            return
        for index in sorted(answer.choices):
            c = answer.choices[index]
            self._record(call, client_body, answer, choice_response_id(str(answer.id), index), "".join(c.text),
                         index, c.token_ids or None, c.logprobs)
        if answer.comparison is not None:
            self._log_comparison(call, client_body, answer)

    def _log_comparison(self, call: _Call, client_body: dict, answer: _Answer) -> None:
        """Log the second candidate of a targeted comparison as its own answer (sampled as choice 1
        of the request: seed + 1), under the response id the upstream gave it."""
        b = answer.comparison or {}
        rid, text = b.get("response_id"), b.get("content")
        if not isinstance(rid, str) or not rid or not isinstance(text, str):
            LOGS_DROPPED.inc()
            log.warning("comparison not logged: no response_id or content", response_id=answer.id)
            return
        ids = b.get("token_ids") if isinstance(b.get("token_ids"), list) else None
        lps = _logprob_values(b["logprobs"], call.endpoint) if isinstance(b.get("logprobs"), dict) else None
        version = b.get(VERSION_FIELD) if isinstance(b.get(VERSION_FIELD), str) else None
        self._record(call, client_body, answer, rid, text, 1, ids or None, lps, version)

    def _record(self, call: _Call, client_body: dict, answer: _Answer, rid: str, text: str, index: int,
                token_ids: list[int] | None, logprobs: list | None, version: str | None = None) -> None:
        """One answered choice as a ResponseEvent (choice ``index`` of a seeded request was sampled
        with seed + index, as vLLM does); an event that cannot be built is counted and dropped."""
        try:
            prompt, messages = self._prompt(call.endpoint, client_body)
            if prompt is None:
                LOGS_DROPPED.inc()
                return
            sent = client_body
            if isinstance(client_body.get("seed"), int) and index:
                sent = {**client_body, "seed": choice_seed(client_body["seed"], index)}
            event = response_event(
                response_id=rid, model=str(client_body.get("model")), completion=text,
                version=version or answer.version,
                user=client_body.get("user"), prompt=prompt, messages=messages, sampling=sampling_of(sent),
                token_ids=token_ids, logprobs=logprobs if logprobs and None not in logprobs else None,
            )
        except Exception as e:
            LOGS_DROPPED.inc()
            log.warning("answer not logged: no valid ResponseEvent", response_id=rid, error=str(e)[:300])
            return
        self.recorder.record(event)

    @staticmethod
    def _prompt(endpoint: str, body: dict) -> tuple[str | None, list | None]:
        """(prompt text, messages) as the embedded server logs them; (None, None) if unusable."""
        if endpoint == "completions":
            p = body.get("prompt")
            p = p[0] if isinstance(p, list) and len(p) == 1 else p
            return (p, None) if isinstance(p, str) else (None, None)
        msgs = body.get("messages")
        if not isinstance(msgs, list):
            return None, None
        try:
            chat = Chat.from_messages({"role": m.get("role"), "content": _text(m.get("content"))}
                                      for m in msgs if isinstance(m, dict))
        except ChatError:
            return None, None
        return logged_conversation(chat)

    # ------------------------------------------------------------------ models and health
    async def models(self, request: Request) -> Response:
        refused = self._refused(request)
        if refused is not None:
            return refused
        tried: set[str] = set()
        while (up := self._pick(tried)) is not None:
            tried.add(up.url)
            try:
                r = await self.http.get(f"{up.url}/v1/models", headers=self.upstream_headers)
            except httpx.HTTPError as e:
                up.mark(False, f"{type(e).__name__}: {e}"[:300])
                continue
            try:
                doc = r.json() if r.status_code == 200 else None
            except ValueError:
                doc = None
            if not isinstance(doc, dict) or not isinstance(doc.get("data", []), list):
                return Response(r.content, status_code=r.status_code if r.status_code != 200 else 502,
                                media_type=r.headers.get("content-type"))
            data = doc.setdefault("data", [])
            if not any(isinstance(m, dict) and m.get("id") == self.alias for m in data):
                route = self.routing.current().route
                data.append({"id": self.alias, "object": "model", "created": int(time.time()), "owned_by": "looprl",
                             "root": route.primary or self.base_name, "parent": self.base_name,
                             "looprl_alias": route.to_json()})
            return JSONResponse(doc)
        return _error(503, "no upstream could list the models", code="upstream_unavailable")

    async def health(self, request: Request) -> Response:
        published = self.routing.current()
        up = any(u.healthy for u in self.upstreams)
        doc = {"status": "ok" if up else "no_upstream",
               "upstreams": {u.url: {"healthy": u.healthy, "kind": u.kind, "inflight": u.inflight,
                                     "error": u.last_error} for u in self.upstreams},
               "routing": {"alias": self.alias, **published.route.to_json(), "versions": published.versions,
                           "error": self.routing.error},
               "response_logs": {"pending": self.recorder.pending, "dropped": self.recorder.dropped}
               if self.recorder is not None else None}
        return JSONResponse(doc, status_code=200 if up else 503)


_END = object()  # the upstream's stream ended


async def _pump(chunks: AsyncIterator[bytes], into: asyncio.Queue) -> None:
    """Every chunk of ``chunks`` into ``into``, then ``_END`` or the exception that stopped it."""
    try:
        async for chunk in chunks:
            into.put_nowait(chunk)
        into.put_nowait(_END)
    except asyncio.CancelledError:
        raise
    except Exception as e:  # httpx.HTTPError: the upstream died; the relay reports it
        into.put_nowait(e)


def _text(content: Any) -> str:
    """An OpenAI message's content as text (a list of parts: its text parts joined)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    raise ChatError(f"message content of type {type(content).__name__}")


# ---------------------------------------------------------------------- assembly
def kafka_recorder(cfg: LooprlConfig) -> ResponseRecorder:
    """A recorder on ``kafka.topic_responses`` that connects in the background (the gateway starts
    and serves while Kafka is down), as the responses principal."""
    from looprl.ingest.broker import bootstrap_servers
    from looprl.ingest.client import ResponseLogger

    def connect(on_error: Callable[[Any, Exception], None]) -> ResponseLogger:
        servers = cfg.kafka.bootstrap_servers or bootstrap_servers(cfg, timeout=1.0)
        return ResponseLogger(servers, topic=cfg.kafka.topic_responses, client=cfg.kafka.client,
                              security=cfg.kafka.security("responses"), on_error=on_error)

    return ResponseRecorder(connect=connect, max_buffered=cfg.gateway.max_buffered_logs, dropped=LOGS_DROPPED,
                            buffered=LOGS_BUFFERED)


def build_gateway(cfg: LooprlConfig, *, recorder: ResponseRecorder | None | str = "kafka",
                  upstreams: list[str] | None = None, seed: int | None = None) -> Gateway:
    """The gateway the config describes. ``recorder``: "kafka" (``kafka_recorder``; none if
    ``gateway.log_responses`` is off), or one given (tests), or None."""
    g, s = cfg.gateway, cfg.serving
    if recorder == "kafka":
        recorder = kafka_recorder(cfg) if g.log_responses else None
    routing = RoutingFile(cfg.state_dir / ROUTING_FILE, alias=s.alias, base_name=s.served_model_name,
                          poll_seconds=g.routing_poll_seconds)
    return Gateway(
        upstreams if upstreams is not None else (g.upstreams or s.endpoints), routing=routing, alias=s.alias,
        base_name=s.served_model_name, client_tokens=[t.get_secret_value() for t in g.client_tokens],
        upstream_key=s.vllm_api_key.get_secret_value() if s.vllm_api_key else None, recorder=recorder,
        connect_timeout=g.connect_timeout_seconds, read_timeout=g.read_timeout_seconds, max_attempts=g.max_attempts,
        max_connections=g.max_connections, health_interval=g.health_interval_seconds,
        request_token_ids=g.request_token_ids, max_body_bytes=g.max_body_bytes, seed=seed,
        compare_across_canary=s.compare_across_canary,
    )


class GatewayServer(HttpThread):
    """uvicorn serving a ``Gateway`` in a daemon thread on a fixed or free port (tests, benchmarks,
    the demo's tests); ``stop()`` shuts it down and flushes the response recorder."""

    def __init__(self, gateway: Gateway, host: str = "127.0.0.1", port: int = 0):
        self.gateway = gateway
        recorder = gateway.recorder
        super().__init__(gateway.app, host, port, name="looprl-gateway", lifespan="on",
                         on_stop=(lambda: recorder.close(timeout=2.0)) if recorder is not None else None)


def serve_gateway(cfg: LooprlConfig, host: str | None = None, port: int | None = None) -> int:
    """Foreground gateway for ``looprl gateway`` (Ctrl-C to stop)."""
    from looprl.ops.core.listen import run_http
    from looprl.ops.core.metrics import serve_metrics

    g = cfg.gateway
    h, p = host or g.host, g.port if port is None else port
    require_token_off_loopback(h, g.client_tokens[0] if g.client_tokens else None, "gateway.host",
                               "gateway.client_tokens")
    gateway = build_gateway(cfg)
    serve_metrics(g.metrics_port, host=cfg.metrics_host, key="gateway.metrics_port")
    try:
        # port 0: a free port, logged ("gateway listening", url and port)
        run_http(gateway.app, h, p, what="gateway", key="gateway.port (or --port)", lifespan="on",
                 upstreams=[u.url for u in gateway.upstreams], alias=cfg.serving.alias,
                 log_responses=gateway.recorder is not None, auth=bool(g.client_tokens))
    finally:
        if gateway.recorder is not None:
            gateway.recorder.close()
    return 0
