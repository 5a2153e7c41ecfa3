"""A stub OpenAI upstream for the gateway's tests and benchmark (nothing here runs in production).

It answers ``/v1/chat/completions`` and ``/v1/completions`` like vLLM (and its runtime LoRA
load/unload, for the adapter controller) (or like `looprl serving serve`
with ``looprl=True``: version field in every chunk, JSON ``/health``), streaming pre-made tokens.
Every answer is a function of the request (id from ``user``, a fixed ``created``), so two requests
with the same body get byte-identical streams. Knobs for faults: ``gate`` (hold the stream after
its first token until set), ``die_after`` (drop the connection after that many events),
``status`` (answer every request with that HTTP status). ``bodies`` keeps what it was sent.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

CREATED = 1_700_000_000


class StubUpstream:
    def __init__(self, tokens: tuple[str, ...] = ("Hello", ",", " world", "!"), *, looprl: bool = False,
                 version: str = "v3", delay_s: float = 0.0, port: int = 0):
        self.tokens = tokens
        self.looprl = looprl
        self.version = version
        self.delay_s = delay_s
        self.gate: threading.Event | None = None
        self.die_after: int | None = None
        self.status = 200
        self.bodies: list[dict] = []
        self.loaded: dict[str, str] = {}  # vLLM's runtime LoRA API: name -> lora_path
        self._port = port
        app = Starlette(routes=[
            Route("/v1/chat/completions", self._chat, methods=["POST"]),
            Route("/v1/completions", self._completions, methods=["POST"]),
            Route("/v1/models", self._models, methods=["GET"]),
            Route("/v1/load_lora_adapter", self._load, methods=["POST"]),
            Route("/v1/unload_lora_adapter", self._unload, methods=["POST"]),
            Route("/health", self._health, methods=["GET"]),
        ])
        self.app = app
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None
        self.url = ""

    # ------------------------------------------------------------------ process
    def start(self) -> "StubUpstream":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # TCP_NODELAY by asyncio
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self._port))
        self._port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self._port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="critical", access_log=False, lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
            self.server.force_exit = True
            self.thread.join(10)

    # ------------------------------------------------------------------ answers
    def _base(self, body: dict, obj: str) -> dict[str, Any]:
        prefix = "chatcmpl" if obj.startswith("chat") else "cmpl"
        out = {"id": f"{prefix}-{body.get('user') or 'anon'}", "object": obj, "created": CREATED,
               "model": body.get("model")}
        if self.looprl:
            out["looprl_adapter_version"] = self.version
        return out

    def _headers(self) -> dict[str, str]:
        return {"X-Looprl-Adapter": self.version} if self.looprl else {}

    async def _chat(self, request: Request) -> Response:
        return await self._answer(request, chat=True)

    async def _completions(self, request: Request) -> Response:
        return await self._answer(request, chat=False)

    async def _answer(self, request: Request, chat: bool) -> Response:
        body = await request.json()
        self.bodies.append(body)
        if self.status != 200:
            return JSONResponse({"error": {"message": "stub refuses", "type": "server_error", "param": None,
                                           "code": None}}, status_code=self.status)
        ids = list(range(100, 100 + len(self.tokens)))
        want_ids = bool(body.get("return_token_ids"))
        want_lp = body.get("logprobs") is not None and body.get("logprobs") is not False  # 0: completions' sampled only
        if not body.get("stream"):
            choice: dict[str, Any] = {"index": 0, "finish_reason": "stop", "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": "".join(self.tokens)}
            else:
                choice["text"] = "".join(self.tokens)
            if want_ids:
                choice["token_ids"] = ids
            if want_lp:
                choice["logprobs"] = ({"content": [{"token": t, "logprob": -0.5} for t in self.tokens]} if chat
                                      else {"tokens": list(self.tokens), "token_logprobs": [-0.5] * len(self.tokens)})
            out = {**self._base(body, "chat.completion" if chat else "text_completion"), "choices": [choice],
                   "usage": {"prompt_tokens": 3, "completion_tokens": len(ids), "total_tokens": 3 + len(ids)}}
            return JSONResponse(out, headers=self._headers())
        return StreamingResponse(self._events(body, chat, ids, want_ids, want_lp), media_type="text/event-stream",
                                 headers=self._headers())

    async def _events(self, body: dict, chat: bool, ids: list[int], want_ids: bool, want_lp: bool):
        base = self._base(body, "chat.completion.chunk" if chat else "text_completion")
        sent = 0

        def event(choice: dict) -> bytes:
            return f"data: {json.dumps({**base, 'choices': [choice]})}\n\n".encode()

        async def emit(data: bytes):
            nonlocal sent
            if self.die_after is not None and sent >= self.die_after:
                raise ConnectionAbortedError("stub upstream dies mid-stream")
            sent += 1
            return data

        if chat:
            yield await emit(event({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                                    "logprobs": None}))
        for i, tok in enumerate(self.tokens):
            choice: dict[str, Any] = {"index": 0, "finish_reason": None, "logprobs": None}
            if chat:
                choice["delta"] = {"content": tok}
            else:
                choice["text"] = tok
            if want_ids:
                choice["token_ids"] = [ids[i]]
            if want_lp:
                choice["logprobs"] = ({"content": [{"token": tok, "logprob": -0.5}]} if chat
                                      else {"tokens": [tok], "token_logprobs": [-0.5]})
            yield await emit(event(choice))
            if i == 0 and self.gate is not None:
                await asyncio.to_thread(self.gate.wait, 30)
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
        last: dict[str, Any] = {"index": 0, "finish_reason": "stop", "logprobs": None}
        last["delta" if chat else "text"] = {} if chat else ""
        yield await emit(event(last))
        yield await emit(b"data: [DONE]\n\n")

    async def _models(self, request: Request) -> Response:
        data = [{"id": "base", "object": "model", "parent": None}]
        data += [{"id": n, "object": "model", "root": p, "parent": "base"} for n, p in self.loaded.items()]
        return JSONResponse({"object": "list", "data": data})

    async def _load(self, request: Request) -> Response:
        body = await request.json()
        self.loaded[body["lora_name"]] = body["lora_path"]
        return Response(b"Success")

    async def _unload(self, request: Request) -> Response:
        self.loaded.pop((await request.json())["lora_name"], None)
        return Response(b"Success")

    async def _health(self, request: Request) -> Response:
        if self.looprl:
            return JSONResponse({"status": "ok", "models": {}})
        return Response(b"", status_code=200)
