"""The HTTP layer: an OpenAI-compatible API over ``ServingService`` (FastAPI).

Inference: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (both
with ``stream: true`` as server-sent events). A chat is rendered with the base's chat template
(``looprl.policy.model.render_prompt_ids``, as the trainer and the reward model render it); a
completion prompt is the user's turn of such a chat unless ``render_prompts`` is off. The logged
event keeps the messages as sent. Every answer carries the adapter version that
produced it: JSON field ``looprl_adapter_version`` and header ``X-Looprl-Adapter``; and is
logged as a ``ResponseEvent`` (response_id = the OpenAI response id) when a logger is set. With
``n > 1`` each choice is its own event, under ``choice_response_id`` (``<id>`` for choice 0,
``<id>-<i>`` for the others), which every choice also carries as ``looprl_response_id``. The event
records the served token ids, their raw log-probs (always, asked or not) and the sampling
parameters the engine used (effective values, defaults filled in: ``sampling_of_params``).

Log-probs (OpenAI's shapes): chat ``logprobs: true`` (+ ``top_logprobs``) gives
``choices[i].logprobs = {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}``;
completions ``logprobs: k`` gives ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``;
streamed chunks carry the entries of their own tokens. Raw log-probs, as vLLM reports by default
(``looprl.serving.sampling.token_logprobs``); -inf is reported as -9999.0, as vLLM does.

Comparisons (``looprl_compare: "auto"``, ``looprl.serving.compare``, or ``"always"``): the answer
may carry (with "always": carries) a top-level ``looprl_comparison = {"response_id", "content",
"looprl_adapter_version"}`` (plus ``token_ids`` / ``logprobs`` when asked), a second candidate
logged as its own event; streamed, in a chunk with no choices just before the usage chunk and
``[DONE]``. While the alias has a canary, the second candidate comes from the user's other arm
(``serving.compare_across_canary``): the user's choice is a paired canary vote.

Admin (Bearer token): vLLM's ``POST /v1/load_lora_adapter`` / ``POST /v1/unload_lora_adapter``,
and the looprl extensions ``POST /v1/looprl/alias`` and ``GET /v1/looprl/state``.
Also ``GET /health`` and ``GET /metrics`` (prometheus_client's ASGI app, mounted).

Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` on every route,
Starlette's 404 and 405 included; a body that fails validation gets one readable message naming
the field (``looprl.ops.core.validation``), and a field this server would not honour a 400 naming
it (``looprl.serving.protocol.UNSUPPORTED``).

Size limits keep one request from stalling the others: a body over ``max_body_bytes`` is refused
with 413 before it is parsed, a prompt over ``max_prompt_chars`` characters with 400 before it
is tokenized, and rendering and tokenizing run in a worker thread, never on the event loop
(``/health`` and streams keep answering while a long prompt is tokenized).

The routes live in module-level routers; a handler finds the service and the server's settings
(admin token, response logger, defaults) on ``request.app.state``, which ``create_app`` sets.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from looprl.ingest.schema import ChatMessage, Sampling
from looprl.ops.core.config import ServingConfig
from looprl.ops.core.errors import error_body, error_response
from looprl.ops.core.log import get_logger
from looprl.ops.core.metrics import metrics_app
from looprl.ops.core.validation import readable_error
from looprl.ops.core.chat import Chat
from looprl.policy.model import render_prompt_ids
from looprl.serving import metrics as m
from looprl.serving.adapters import AdapterError
from looprl.serving.attribution import (
    ADAPTER_HEADER, COMPARISON_FIELD, RESPONSE_ID_FIELD, ResponseRecorder, choice_response_id, logged_conversation,
    response_event, sampling_of,
)
from looprl.serving.compare import Comparer
from looprl.serving.engine import BASE_VERSION, Delta, EngineError, Finished
from looprl.serving.sampling import SamplingParams
from looprl.serving.protocol import (
    AliasRequest, ChatCompletionRequest, ChatMessageIn, CompletionRequest, LoadLoraRequest, UnloadLoraRequest,
)
from looprl.serving.service import ServingService, Submitted

log = get_logger(__name__)

ROUTES = {
    "/v1/completions": "completions", "/v1/chat/completions": "chat", "/v1/models": "models",
    "/v1/load_lora_adapter": "load_lora", "/v1/unload_lora_adapter": "unload_lora",
    "/v1/looprl/alias": "alias", "/v1/looprl/state": "state", "/health": "health", "/metrics": "metrics",
}
REQUEST_TIMEOUT_S = 600.0
# create_app's defaults are the config's (serving.max_body_bytes, serving.max_prompt_chars).
DEFAULT_MAX_BODY_BYTES: int = ServingConfig.model_fields["max_body_bytes"].default
DEFAULT_MAX_PROMPT_CHARS: int = ServingConfig.model_fields["max_prompt_chars"].default


# The engine and the adapter checks raise domain errors with a reason; HTTP statuses live here.
HTTP_STATUS = {"not_running": 503, "overloaded": 503, "unknown_model": 404, "not_found": 404,
               "outside_registry": 403, "in_use": 409, "refused_status": 409, "unauthorized": 401}


def http_status(reason: str) -> int:
    return HTTP_STATUS.get(reason, 400)


class _RequestMetrics:
    """ASGI middleware: count and time every request until its *last* body byte (so streamed
    answers are timed to the end, not to their headers)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = ROUTES.get(scope["path"], "other")
        t0 = time.perf_counter()
        status = {"code": 500}

        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                m.LATENCY.labels(endpoint=endpoint).observe(time.perf_counter() - t0)
                m.REQUESTS.labels(endpoint=endpoint, status=str(status["code"])).inc()
            await send(message)

        await self.app(scope, receive, wrapped)


class _BodyLimit:
    """ASGI middleware: read a request body only up to ``max_bytes``; a larger one gets a 413 as
    soon as its Content-Length (or, chunked, the bytes read so far) says so, before any parsing.
    The body read is handed on to the app as one message."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send, f"request body of {int(declared)} bytes")
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: nobody to answer
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send, "request body")
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:  # later reads wait for the disconnect, as streaming responses expect
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, what: str) -> None:
        m.ERRORS.labels(endpoint=ROUTES.get(scope["path"], "other"), reason="too_large").inc()
        response = _error(413, f"{what} is over the limit of {self.max_bytes} bytes", code="too_large")
        await response(scope, receive, send)


def chat_of(messages: list[ChatMessageIn]) -> Chat:
    """The request's conversation (OpenAI's ``developer`` role is the system prompt)."""
    return Chat.from_messages({"role": m.role, "content": m.text()} for m in messages)


def _service(request: Request) -> ServingService:
    return request.app.state.service


def _error(status: int, message: str, *, param: str | None = None, code: str | None = None) -> JSONResponse:
    # The shape shared with the gateway and the feedback collector (looprl.ops.core.errors).
    return error_response(status, message, param=param, code=code)


# ---------------------------------------------------------------------- errors
async def _bad_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    # One readable message naming the field as a client writes it (messages[0].content), union
    # members collapsed (looprl.ops.core.validation).
    param, message = readable_error(exc.errors(), getattr(exc, "body", None))
    m.ERRORS.labels(endpoint=ROUTES.get(request.url.path, "other"), reason="invalid_request").inc()
    return _error(400, message, param=param, code="invalid_request")


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own errors (unknown path, wrong method) in the OpenAI shape, not ``{"detail"}``."""
    status = exc.status_code
    if status == 404:
        message, code = f"no such route: {request.method} {request.url.path}", "not_found"
    elif status == 405:
        allowed = (exc.headers or {}).get("Allow") or (exc.headers or {}).get("allow")
        message = f"method {request.method} is not allowed on {request.url.path}" + \
            (f" (allowed: {allowed})" if allowed else "")
        code = "method_not_allowed"
    else:
        message, code = str(exc.detail), None
    m.ERRORS.labels(endpoint=ROUTES.get(request.url.path, "other"), reason=code or f"http_{status}").inc()
    return error_response(status, message, code=code, headers=dict(exc.headers) if exc.headers else None)


async def _engine_error(request: Request, exc: EngineError) -> JSONResponse:
    m.ERRORS.labels(endpoint=ROUTES.get(request.url.path, "other"), reason=exc.reason).inc()
    param = "model" if exc.reason == "unknown_model" else ("prompt" if "prompt" in exc.reason else None)
    return _error(http_status(exc.reason), str(exc), param=param, code=exc.reason)


async def _adapter_error(request: Request, exc: AdapterError) -> JSONResponse:
    endpoint = ROUTES.get(request.url.path, "other")
    m.ERRORS.labels(endpoint=endpoint, reason=exc.reason).inc()
    if endpoint == "load_lora":
        m.LOAD_FAILURES.labels(reason=exc.reason).inc()
    log.warning("admin request refused", endpoint=endpoint, reason=exc.reason, error=str(exc))
    return _error(http_status(exc.reason), str(exc), code=exc.reason)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # The trace goes to the server log; the client gets OpenAI's error shape and no internals.
    log.exception("request failed", path=request.url.path, error=f"{type(exc).__name__}: {exc}"[:500])
    m.ERRORS.labels(endpoint=ROUTES.get(request.url.path, "other"), reason="internal").inc()
    return _error(500, f"internal server error ({type(exc).__name__}); see the server log", code="internal")


def require_admin(request: Request) -> None:
    token = request.app.state.admin_token
    if token is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise AdapterError("admin endpoint: missing or wrong bearer token", reason="unauthorized")


# ---------------------------------------------------------------------- generation
# vLLM's floor for a log-prob in JSON (which has no -inf).
LOGPROB_FLOOR = -9999.0


def sampling_of_params(p: SamplingParams) -> Sampling | None:
    """The sampling the engine used for an answer, every default filled in (so a trainer can tell
    whether the tokens were drawn from the plain temperature-1 distribution: temperature 1, top_p
    1, top_k None = no limit, penalties 0). ``seed`` None: drawn from the server's own generator.
    ``max_tokens``: as asked (or the server's default); the engine may cut it to the context left."""
    return sampling_of({
        "temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k if p.top_k > 0 else None,
        "seed": p.seed, "stop": list(p.stop) or None, "presence_penalty": p.presence_penalty,
        "frequency_penalty": p.frequency_penalty, "max_tokens": p.max_tokens,
    })


def _log_response(request: Request, rid: str, index: int, body: CompletionRequest | ChatCompletionRequest,
                  prompt: str, messages: list[ChatMessage] | None, fin: Finished) -> None:
    """Log choice ``index`` of the answer with id ``rid`` as its own event, under
    ``choice_response_id(rid, index)``, with the sampling it was generated with and the raw
    log-probs of its tokens (``looprl.serving.attribution``: the gateway logs the same way)."""
    recorder: ResponseRecorder | None = request.app.state.response_logger
    if recorder is None:
        return
    rid = choice_response_id(rid, index)
    try:
        params = body.to_sampling_params(request.app.state.default_max_tokens, index)
        event = response_event(
            response_id=rid, model=body.model, completion=fin.text, version=fin.version, user=body.user,
            prompt=prompt, messages=messages, sampling=sampling_of_params(params), token_ids=fin.token_ids,
            logprobs=fin.logprobs,
        )
    except Exception as e:  # logging is best effort: never fail a served answer because of it
        m.RESPONSE_LOG_FAILURES.inc()
        log.warning("response not logged", response_id=rid, error=str(e)[:300])
        return
    recorder.record(event)  # never raises; counts what it drops in RESPONSE_LOG_FAILURES


class TokenTexts:
    """One token as text, for log-probs: ``tokenizer.decode([id])`` with special tokens kept (what
    vLLM reports for a token), cached; its ``bytes`` are that text's UTF-8 (a token holding part of
    a character decodes to U+FFFD, as in vLLM)."""

    def __init__(self, tokenizer: Any, size: int = 65536):
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}
        self.size = size

    def __call__(self, token_id: int) -> str:
        text = self.cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            if len(self.cache) < self.size:
                self.cache[token_id] = text
        return text


def _lp(x: float) -> float:
    return max(float(x), LOGPROB_FLOOR)


def chat_logprobs(texts: TokenTexts, ids: Any, lps: Any, tops: Any) -> dict:
    """OpenAI's chat ``logprobs``: ``{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}``
    (``top_logprobs``: the most likely tokens, most likely first; [] when none were asked)."""
    def entry(tid: int, lp: float) -> dict:
        t = texts(tid)
        return {"token": t, "logprob": _lp(lp), "bytes": list(t.encode("utf-8"))}

    content = []
    for k, (tid, lp) in enumerate(zip(ids, lps)):
        alt = tops[k] if tops is not None else ()
        content.append({**entry(tid, lp), "top_logprobs": [entry(a, alp) for a, alp in alt]})
    return {"content": content}


def completion_logprobs(texts: TokenTexts, ids: Any, lps: Any, tops: Any, offset: int = 0) -> dict:
    """OpenAI's legacy ``logprobs``: ``tokens``, ``token_logprobs``, ``top_logprobs`` (per token, a
    dict of the asked most likely tokens plus the sampled one: up to k + 1 entries) and
    ``text_offset`` (each token's start in the text, counting from ``offset``)."""
    tokens, token_lps, top_lps, offsets = [], [], [], []
    for k, (tid, lp) in enumerate(zip(ids, lps)):
        t = texts(tid)
        tokens.append(t)
        token_lps.append(_lp(lp))
        alts = {texts(a): _lp(alp) for a, alp in (tops[k] if tops is not None else ())}
        alts.setdefault(t, _lp(lp))
        top_lps.append(alts)
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": top_lps, "text_offset": offsets}


class _Stream:
    """Per choice of a streamed answer: tokens whose log-probs were sent, and the text offset."""

    def __init__(self) -> None:
        self.tokens = 0
        self.offset = 0


async def _generate(
    request: Request, *, endpoint: str, body: CompletionRequest | ChatCompletionRequest, prompt_ids: list[int],
    chunk: Callable[[Submitted, int, str | None, str | None, dict | None], dict],
    final: Callable[[Submitted, list[Finished]], dict],
    first: Callable[[Submitted, int], dict] | None, on_done: Callable[[int, Finished], None],
    logprobs_of: Callable[[Any, Any, Any, _Stream], dict] | None = None,
    second: Callable[[Finished, Finished], Awaitable[dict | None]] | None = None,
) -> Response:
    """Generate ``body.n`` choices of one prompt and answer them, whole or streamed. ``chunk(sub,
    index, delta, finish, logprobs)``: a stream chunk of one choice; ``final(sub, finished)``: the
    whole answer; ``first(sub, index)``: a choice's opening chunk (chat); ``on_done(index,
    finished)``: a choice is complete (logged before the client sees its end); ``logprobs_of(ids,
    lps, tops, state)``: a streamed piece's log-probs (None: the client did not ask).
    ``second(a, b)``: also generate a hidden candidate (next seed) beside choice 0; once both are
    done, it returns the fields to add to the answer's top level (None: nothing)."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    n = body.n
    total = n + (1 if second is not None else 0)

    def sink_of(index: int) -> Callable[[tuple[str, Any]], None]:
        def sink(ev: tuple[str, Any]) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (index, ev))
        return sink

    default_max_tokens = request.app.state.default_max_tokens
    params = [body.to_sampling_params(default_max_tokens, i) for i in range(total)]
    sub = _service(request).submit(body.model, body.user, prompt_ids, params, [sink_of(i) for i in range(total)],
                                   last_model=getattr(body, "looprl_compare_model", None) if second else None,
                                   last_across_canary=second is not None and request.app.state.compare_across_canary)
    headers = {ADAPTER_HEADER: sub.version}

    async def next_event() -> tuple[int, tuple[str, Any]]:
        return await asyncio.wait_for(events.get(), timeout=REQUEST_TIMEOUT_S)

    async def extension(done: list[Finished | None]) -> dict | None:
        """The hidden candidate's fields, once it and choice 0 are done (a failed one: none)."""
        if second is None:
            return None
        b = done[n]
        if b is None or b.finish_reason == "error" or done[0] is None:
            return None
        try:
            return await second(done[0], b)
        except Exception as e:  # the comparison is an extra: never fail the answer for it
            m.ERRORS.labels(endpoint=endpoint, reason="compare").inc()
            log.warning("comparison dropped", error=f"{type(e).__name__}: {e}"[:300])
            return None

    if not body.stream:
        done: list[Finished | None] = [None] * total
        answered = False
        try:
            while not all(f is not None for f in done):
                index, (kind, payload) = await next_event()
                if kind != "done":
                    continue
                done[index] = payload
                if payload.finish_reason == "error" and index < n:
                    break
            answered = all(f is not None and f.finish_reason != "error" for f in done[:n])
        except asyncio.TimeoutError:
            m.ERRORS.labels(endpoint=endpoint, reason="timeout").inc()
            m.REQUESTS_FAILED.labels(adapter=sub.adapter or BASE_VERSION, reason="timeout").inc()
            return _error(504, "generation timed out", code="timeout")
        finally:
            if not answered:  # timed out, cancelled or a choice failed: stop generating the others
                sub.cancel()
        if not answered:
            fin = next(f for f in done[:n] if f is not None and f.finish_reason == "error")
            m.ERRORS.labels(endpoint=endpoint, reason="engine").inc()
            return _error(503 if fin.fault == "shutdown" else 500, fin.error or "engine error", code=fin.fault)
        fins = [f for f in done[:n] if f is not None]
        for index, fin in enumerate(fins):
            on_done(index, fin)
        extra = await extension(done)
        answer = final(sub, fins)
        if body.return_token_ids:  # vLLM's extension: the completion's token ids, per choice
            for index, fin in enumerate(fins):
                answer["choices"][index]["token_ids"] = list(fin.token_ids)
        if extra:
            answer.update(extra)
        return JSONResponse(answer, headers=headers)

    async def stream() -> AsyncIterator[str]:
        finished = False
        done: list[Finished | None] = [None] * total
        state = [_Stream() for _ in range(n)]
        try:
            if first is not None:
                for index in range(n):
                    yield f"data: {json.dumps(first(sub, index))}\n\n"
            while not all(f is not None for f in done):
                index, (kind, payload) = await next_event()
                if index >= n:  # the hidden candidate: only its end matters
                    if kind == "done":
                        done[index] = payload
                    continue
                if kind == "delta":
                    lp = None
                    if logprobs_of is not None and isinstance(payload, Delta):
                        lp = logprobs_of(payload.token_ids, payload.logprobs, payload.top_logprobs, state[index])
                        state[index].tokens += len(payload.token_ids)
                    yield f"data: {json.dumps(chunk(sub, index, payload, None, lp))}\n\n"
                    continue
                if payload.finish_reason == "error":  # the other choices are cancelled (finally)
                    m.ERRORS.labels(endpoint=endpoint, reason="engine").inc()
                    err = error_body(payload.error or "engine error", type="server_error", code=payload.fault)
                    yield f"data: {json.dumps(err)}\n\n"
                    return
                done[index] = payload
                on_done(index, payload)  # logged before the client sees its end: feedback never outruns it
                lp = None
                if logprobs_of is not None:  # the tokens no piece of text carried (held back, or past a stop)
                    k = state[index].tokens
                    tops = payload.top_logprobs[k:] if payload.top_logprobs is not None else None
                    lp = logprobs_of(payload.token_ids[k:], payload.logprobs[k:], tops, state[index])
                last = chunk(sub, index, None, payload.finish_reason, lp)
                if body.return_token_ids:  # all token ids in the choice's last chunk (vLLM: each chunk's own)
                    last["choices"][0]["token_ids"] = list(payload.token_ids)
                yield f"data: {json.dumps(last)}\n\n"
            finished = True
            extra = await extension(done)
            if extra:
                yield f"data: {json.dumps({**chunk(sub, 0, None, None, None), 'choices': [], **extra})}\n\n"
            fins = [f for f in done[:n] if f is not None]
            if body.include_usage():
                usage = {**chunk(sub, 0, None, None, None), "choices": [], "usage": _usage(fins)}
                yield f"data: {json.dumps(usage)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # client went away, timed out, or a choice failed: stop generating for it
                sub.cancel()

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={**headers, "Cache-Control": "no-cache"})


def _refused(request: Request, endpoint: str, body: CompletionRequest | ChatCompletionRequest) -> JSONResponse | None:
    """The 400 for a request this server would not honour as asked (``protocol.UNSUPPORTED``), a
    ``logit_bias`` naming a token outside the vocabulary, or more choices than the queue holds."""
    engine = _service(request).engine
    refused = body.unsupported()
    if refused is not None:
        param, message = refused
        m.ERRORS.labels(endpoint=endpoint, reason="unsupported").inc()
        return _error(400, message, param=param, code="unsupported")
    invalid = body.invalid()
    if invalid is not None:
        param, message = invalid
        m.ERRORS.labels(endpoint=endpoint, reason="invalid_request").inc()
        return _error(400, message, param=param, code="invalid_request")
    outside = sorted(t for t in (body.logit_bias or {}) if t >= engine.vocab_size)
    if outside:
        m.ERRORS.labels(endpoint=endpoint, reason="invalid_request").inc()
        return _error(400, f"logit_bias: token id {outside[0]} is not in the vocabulary (ids 0 to "
                           f"{engine.vocab_size - 1})", param="logit_bias", code="invalid_request")
    if body.n > engine.max_queue:
        m.ERRORS.labels(endpoint=endpoint, reason="invalid_request").inc()
        return _error(400, f"n: {body.n} choices are more than the server queues at once ({engine.max_queue}, "
                           "serving.max_queue)", param="n", code="invalid_request")
    return None


def _too_long(request: Request, endpoint: str, chars: int, param: str) -> JSONResponse | None:
    """The 400 for a prompt over the character cap, checked before any tokenizing; else None."""
    cap = request.app.state.max_prompt_chars
    if chars <= cap:
        return None
    m.ERRORS.labels(endpoint=endpoint, reason="prompt_too_long").inc()
    return _error(400, f"{param}: {chars} characters, over the limit of {cap} (serving.max_prompt_chars)",
                  param=param, code="prompt_too_long")


router = APIRouter()


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    if (refused := _refused(request, "completions", body)) is not None:
        return refused
    prompt = body.prompt_text()
    if (refused := _too_long(request, "completions", len(prompt), "prompt")) is not None:
        return refused
    rid = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())

    def base(sub: Submitted) -> dict:
        return {"id": rid, "object": "text_completion", "created": created, "model": sub.model_name,
                "looprl_adapter_version": sub.version}

    engine = _service(request).engine
    texts: TokenTexts = request.app.state.token_texts

    def chunk(sub: Submitted, index: int, delta: str | None, finish: str | None, lp: dict | None) -> dict:
        choice = {"index": index, "text": delta or "", "finish_reason": finish, "logprobs": lp}
        if finish is not None:  # a choice's last chunk names the response id its feedback uses
            choice[RESPONSE_ID_FIELD] = choice_response_id(rid, index)
        return {**base(sub), "choices": [choice]}

    def final(sub: Submitted, fins: list[Finished]) -> dict:
        return {**base(sub), "choices": [
            {"index": i, "text": fin.text, "finish_reason": fin.finish_reason,
             "logprobs": completion_logprobs(texts, fin.token_ids, fin.logprobs, fin.top_logprobs)
             if body.wants_logprobs() else None,
             RESPONSE_ID_FIELD: choice_response_id(rid, i)} for i, fin in enumerate(fins)], "usage": _usage(fins)}

    def logprobs_of(ids: Any, lps: Any, tops: Any, state: _Stream) -> dict:
        out = completion_logprobs(texts, ids, lps, tops, state.offset)
        state.offset += sum(len(t) for t in out["tokens"])
        return out

    render = request.app.state.render_prompts
    prompt_ids = await run_in_threadpool(
        lambda: render_prompt_ids(engine.tokenizer, Chat.user(prompt)) if render else engine.encode(prompt))
    return await _generate(
        request, endpoint="completions", body=body, prompt_ids=prompt_ids,
        chunk=chunk, final=final, first=None,
        on_done=lambda i, fin: _log_response(request, rid, i, body, prompt, None, fin),
        logprobs_of=logprobs_of if body.wants_logprobs() else None,
    )


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    if (refused := _refused(request, "chat", body)) is not None:
        return refused
    engine = _service(request).engine
    chars = sum(len(msg.text()) for msg in body.messages)
    if (refused := _too_long(request, "chat", chars, "messages")) is not None:
        return refused

    chat = chat_of(body.messages)
    prompt_ids = await run_in_threadpool(render_prompt_ids, engine.tokenizer, chat)
    logged_prompt, messages = logged_conversation(chat)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())

    def base(sub: Submitted) -> dict:
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": sub.model_name,
                "looprl_adapter_version": sub.version}

    texts: TokenTexts = request.app.state.token_texts
    wants = body.wants_logprobs()

    def lp_of(fin: Finished) -> dict | None:
        return chat_logprobs(texts, fin.token_ids, fin.logprobs, fin.top_logprobs) if wants else None

    def first(sub: Submitted, index: int) -> dict:
        return {**base(sub), "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                          "finish_reason": None, "logprobs": None}]}

    def chunk(sub: Submitted, index: int, delta: str | None, finish: str | None, lp: dict | None) -> dict:
        d = {"content": delta} if delta is not None else {}
        choice = {"index": index, "delta": d, "finish_reason": finish, "logprobs": lp}
        if finish is not None:  # a choice's last chunk names the response id its feedback uses
            choice[RESPONSE_ID_FIELD] = choice_response_id(rid, index)
        return {**base(sub), "choices": [choice]}

    def final(sub: Submitted, fins: list[Finished]) -> dict:
        return {**base(sub), "object": "chat.completion",
                "choices": [{"index": i, "message": {"role": "assistant", "content": fin.text},
                             "finish_reason": fin.finish_reason, "logprobs": lp_of(fin),
                             RESPONSE_ID_FIELD: choice_response_id(rid, i)} for i, fin in enumerate(fins)],
                "usage": _usage(fins)}

    async def second(a: Finished, b: Finished) -> dict | None:
        """"always": log B and answer with it. "auto": ask the comparison if the reward model is
        unsure and the budget allows; log B if so."""
        if mode == "auto":
            decision = await run_in_threadpool(comparer.decide, chat, a.text, b.text)
            if not decision.ask:
                return None
        else:
            m.COMPARISONS.labels(outcome="requested").inc()
        _log_response(request, rid, 1, body, logged_prompt, messages, b)
        extra: dict[str, Any] = {"response_id": choice_response_id(rid, 1), "content": b.text,
                                 "looprl_adapter_version": b.version}
        if body.return_token_ids:
            extra["token_ids"] = list(b.token_ids)
        if wants:
            extra["logprobs"] = lp_of(b)
        return {COMPARISON_FIELD: extra}

    comparer: Comparer | None = request.app.state.comparer
    mode = body.looprl_compare or request.app.state.compare
    compare = mode in ("auto", "always") and body.n == 1
    if compare and mode == "auto" and comparer is None:
        m.COMPARISONS.labels(outcome="disabled").inc()
        compare = False
    if compare and mode == "auto" and comparer.worth_generating() is not None:  # counted; no second candidate
        compare = False

    return await _generate(
        request, endpoint="chat", body=body, prompt_ids=prompt_ids,
        chunk=chunk, final=final, first=first,
        on_done=lambda i, fin: _log_response(request, rid, i, body, logged_prompt, messages, fin),
        logprobs_of=(lambda ids, lps, tops, state: chat_logprobs(texts, ids, lps, tops)) if wants else None,
        second=second if compare else None,
    )


@router.get("/v1/models")
async def models(request: Request) -> dict:
    return {"object": "list", "data": _service(request).models()}


@router.get("/health")
async def health(request: Request) -> dict:
    # 200 while the server runs (a load balancer must not drop it for one bad adapter);
    # "degraded" and the per-model states say which adapter fails.
    engine = _service(request).engine
    per_model = engine.health()
    status = "ok" if all(h["healthy"] for h in per_model.values()) else "degraded"
    return {"status": status, "models": per_model, **engine.stats()}


# ---------------------------------------------------------------------- admin
admin_router = APIRouter(dependencies=[Depends(require_admin)])


@admin_router.post("/v1/load_lora_adapter")
async def load_lora(body: LoadLoraRequest, request: Request) -> dict:
    # Reading and checking the weights takes a while: off the event loop.
    info = await run_in_threadpool(_service(request).load, body.lora_name, body.lora_path, body.force)
    return {"message": f"Success: LoRA adapter '{body.lora_name}' added successfully.", "adapter": info}


@admin_router.post("/v1/unload_lora_adapter")
async def unload_lora(body: UnloadLoraRequest, request: Request) -> dict:
    info = _service(request).unload(body.lora_name)
    return {"message": f"Success: LoRA adapter '{body.lora_name}' removed successfully.", "adapter": info}


@admin_router.post("/v1/looprl/alias")
async def set_alias(body: AliasRequest, request: Request) -> dict:
    service = _service(request)
    canary = body.canary
    route = service.set_alias(body.alias, body.lora_name, canary.lora_name if canary else None,
                              canary.share if canary else 0.0)
    return {"alias": body.alias, "route": route.to_json(), "state": service.state()["aliases"][body.alias]}


@admin_router.get("/v1/looprl/state")
async def state(request: Request) -> dict:
    return _service(request).state()


def _metrics_route() -> Mount:
    """prometheus_client's ASGI app at exactly ``/metrics`` (as vLLM mounts it): a plain mount
    matches only ``/metrics/...`` and would answer ``/metrics`` with a redirect."""
    route = Mount("/metrics", app=metrics_app())
    route.path_regex = re.compile("^/metrics(?P<path>.*)$")
    return route


def create_app(
    service: ServingService,
    *,
    admin_token: str | None = None,
    response_logger: Any = None,
    default_max_tokens: int = 32,
    render_prompts: bool = True,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS,
    comparer: Comparer | None = None,
    compare: str = "never",
    compare_across_canary: bool = True,
) -> FastAPI:
    """The server's app. ``comparer``: decides targeted comparisons (None: looprl_compare "auto"
    never compares); ``compare``: the mode of requests that do not say (serving.compare);
    ``compare_across_canary``: a comparison's second candidate comes from the canary split's other
    arm (serving.compare_across_canary)."""
    app = FastAPI(title="looprl serving", version="1", docs_url=None, redoc_url=None)
    app.state.service = service
    app.state.admin_token = admin_token
    # Logged through the recorder the gateway uses: never blocks or fails a request.
    app.state.response_logger = (ResponseRecorder(response_logger, dropped=m.RESPONSE_LOG_FAILURES)
                                 if response_logger is not None else None)
    app.state.default_max_tokens = default_max_tokens
    app.state.render_prompts = render_prompts
    app.state.max_prompt_chars = max_prompt_chars
    app.state.token_texts = TokenTexts(service.engine.tokenizer)
    app.state.comparer = comparer
    app.state.compare = compare
    app.state.compare_across_canary = compare_across_canary
    app.add_middleware(_BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(_RequestMetrics)  # added last: outermost, so refused bodies are counted too
    app.add_exception_handler(RequestValidationError, _bad_body)
    app.add_exception_handler(StarletteHTTPException, _http_error)  # 404 / 405 in the OpenAI shape
    app.add_exception_handler(EngineError, _engine_error)
    app.add_exception_handler(AdapterError, _adapter_error)
    app.add_exception_handler(Exception, _unexpected)
    app.include_router(router)
    app.include_router(admin_router)
    app.router.routes.append(_metrics_route())
    return app


def _usage(fins: list[Finished]) -> dict[str, int]:
    """One prompt, every choice's completion (as OpenAI and vLLM count n > 1)."""
    prompt = fins[0].prompt_tokens if fins else 0
    completion = sum(f.completion_tokens for f in fins)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
