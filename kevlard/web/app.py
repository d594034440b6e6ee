"""The daemon's web app: OpenAI API, operations and admin API, the dashboard, one error shape,
optional API key on /v1, admin token on the admin routes."""
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
from kevlard.web.admin_api import AdminAPI
from kevlard.web.dashboard import Dashboard
from kevlard.web.openai_api import OpenAIAPI
from kevlard.web.ops_api import OpsAPI
from kevlard.web.request_timing import RequestTimingMiddleware, RequestTimings

API_PREFIX = "/v1"


def create_app(engine: Engine, config: Config, *, extra_routes: Sequence[BaseRoute] = (),
               lifespan: Lifespan | None = None, admin_token: str = "") -> Starlette:
    """The Starlette app serving `engine`, dashboard at `/` included. `extra_routes` (metrics)
    share the error handlers; the API key guards only /v1/*; `admin_token` guards the admin
    routes (empty: they answer 403) and is what the dashboard's `/?token=` accepts. Call
    `close_streams(app)` when shutdown begins."""
    ops = OpsAPI(engine)
    timings = RequestTimings()
    routes = [*OpenAIAPI(engine, config).routes(), *ops.routes(),
              *AdminAPI(engine, admin_token).routes(), *extra_routes,
              *Dashboard(engine, config, admin_token, timings).routes()]
    middleware = [Middleware(RequestTimingMiddleware, timings=timings)]
    if config.server.api_key:
        middleware.append(Middleware(APIKeyMiddleware, api_key=config.server.api_key))
    app = Starlette(routes=routes, middleware=middleware,
                    exception_handlers=errors.exception_handlers(), lifespan=lifespan)
    app.state.engine = engine
    app.state.config = config
    app.state.ops = ops
    return app


def close_streams(app: Starlette) -> None:
    """End the app's open event streams (and refuse new ones) so that uvicorn's graceful
    shutdown does not wait on them; call it beside `server.should_exit = True`. Thread-safe."""
    app.state.ops.close_streams()


class APIKeyMiddleware:
    """`Authorization: Bearer <key>` on /v1/*, else 401 in OpenAI's shape."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self._app = app
        self._expected = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _under(scope.get("path", ""), API_PREFIX):
            given = dict(scope.get("headers") or ()).get(b"authorization", b"")
            scheme, _, key = given.partition(b" ")  # the scheme is case-insensitive (RFC 7235)
            if not (scheme.lower() == b"bearer" and hmac.compare_digest(key.strip(), self._expected)):
                response = errors.error_response(
                    "Incorrect API key provided" if given else "Missing API key: send "
                    "'Authorization: Bearer <key>'", status=401, type="invalid_request_error",
                    code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self._app(scope, receive, send)


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")
