"""Errors in OpenAI's JSON shape: `{"error": {"message", "type", "param", "code"}}`.

Every failure the web layer answers — a bad parameter, an unknown route, an engine that refuses,
an exception nobody expected — leaves through `error_response`, so clients see one shape.
"""
from __future__ import annotations

import logging
import math

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from kevlard.api_types import EngineError

log = logging.getLogger(__name__)


class APIError(Exception):
    """A request the web layer refuses; raised by validation, mapped to its HTTP status."""

    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(message: str, *, status: int, type: str, param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


def api_error_response(exc: APIError) -> JSONResponse:
    return error_response(exc.message, status=exc.status, type=exc.type, param=exc.param,
                          code=exc.code, headers=exc.headers)


def engine_error_body(exc: EngineError) -> dict:
    return error_body(engine_error_message(exc), exc.type, None, exc.code)


def engine_error_message(exc: EngineError) -> str:
    return str(exc) or exc.code or exc.type


def engine_error_response(exc: EngineError) -> JSONResponse:
    headers = None
    if exc.retry_after is not None:
        # Retry-After takes whole seconds; round up so a client never retries too early.
        headers = {"Retry-After": str(max(0, math.ceil(exc.retry_after)))}
    return error_response(engine_error_message(exc), status=exc.status, type=exc.type,
                          code=exc.code, headers=headers)


def internal_error_response() -> JSONResponse:
    return error_response("The server had an error while processing your request.",
                          status=500, type="server_error")


_HTTP_MESSAGES = {
    404: ("not_found_error", "unknown_url"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
}


async def _on_http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    type_, code = _HTTP_MESSAGES.get(exc.status_code, ("invalid_request_error", None))
    if exc.status_code == 404:
        message = f"Invalid URL ({request.method} {request.url.path})"
    elif exc.status_code == 405:
        message = f"Method {request.method} not allowed for {request.url.path}"
    else:
        message = str(exc.detail)
    if exc.status_code >= 500:
        type_ = "server_error"
    return error_response(message, status=exc.status_code, type=type_, code=code,
                          headers=dict(exc.headers) if exc.headers else None)


async def _on_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return api_error_response(exc)


async def _on_engine_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, EngineError)
    return engine_error_response(exc)


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Last resort: endpoints catch their own exceptions; this covers middleware and routing.
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return internal_error_response()


def exception_handlers() -> dict:
    """Handlers for `Starlette(exception_handlers=...)`: every error leaves in OpenAI's shape."""
    return {
        HTTPException: _on_http_exception,
        APIError: _on_api_error,
        EngineError: _on_engine_error,
        Exception: _on_unexpected,
    }
