"""The one HTTP error shape of every looprl server (serving, gateway, feedback collector): OpenAI's

    {"error": {"message": str, "type": str, "param": str | None, "code": str | None}}

so one client-side handler (the official ``openai`` client's included) reads them all. A server may
add its own keys beside ``"error"`` (the collector's per-event ``errors``); the object itself keeps
these four.

Starlette is imported only by ``error_response``: the SDK imports the ground floor and must not
need a web framework.
"""

from __future__ import annotations

from typing import Any

# OpenAI's error types by HTTP status; any other status is a server error.
ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    405: "invalid_request_error", 409: "conflict_error", 413: "invalid_request_error", 422: "invalid_request_error",
    429: "rate_limit_error", 503: "overloaded_error",
}


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "server_error")


def error_body(message: str, *, type: str, param: str | None = None, code: str | None = None,
               **extra: Any) -> dict[str, Any]:
    """``{"error": {...}}`` plus ``extra`` keys beside it."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}, **extra}


def error_response(status: int, message: str, *, param: str | None = None, code: str | None = None,
                   type: str | None = None, headers: dict[str, str] | None = None, **extra: Any):
    """A Starlette ``JSONResponse`` with the error shape; ``type`` defaults to the status's."""
    from starlette.responses import JSONResponse

    body = error_body(message, type=type or error_type(status), param=param, code=code, **extra)
    return JSONResponse(body, status_code=status, headers=headers)
