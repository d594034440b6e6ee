"""The daemon's web app: OpenAI API, operations API, one error shape, optional API key on /v1."""
from __future__ import annotations

import hmac
from typing import Sequence

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Lifespan, Receive, Scope, Send

from kevlard.api_types import Engine
from kevlard.config import Config
from kevlard.web import errors
from kevlard.web.openai_api import OpenAIAPI
from kevlard.web.ops_api import OpsAPI

API_PREFIX = "/v1"


def create_app(engine: Engine, config: Config, *, extra_routes: Sequence[BaseRoute] = (),
               lifespan: Lifespan | None = None) -> Starlette:
    """The Starlette app serving `engine`. `extra_routes` (dashboard, metrics, events, faults)
    share the error handlers; the API key guards only /v1/*."""
    routes = [*OpenAIAPI(engine, config).routes(), *OpsAPI(engine).routes(), *extra_routes]
    middleware = []
    if config.server.api_key:
        middleware.append(Middleware(APIKeyMiddleware, api_key=config.server.api_key))
    app = Starlette(routes=routes, middleware=middleware,
                    exception_handlers=errors.exception_handlers(), lifespan=lifespan)
    app.state.engine = engine
    app.state.config = config
    return app


class APIKeyMiddleware:
    """`Authorization: Bearer <key>` on /v1/*, else 401 in OpenAI's shape."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self._app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _under(scope.get("path", ""), API_PREFIX):
            given = dict(scope.get("headers") or ()).get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):
                response = errors.error_response(
                    "Incorrect API key provided" if given else "Missing API key: send "
                    "'Authorization: Bearer <key>'", status=401, type="invalid_request_error",
                    code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self._app(scope, receive, send)


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")
