"""Operations routes: liveness, readiness and a JSON snapshot of the cluster.

`/health` only says the web process answers; `/ready` asks the engine whether a full route
exists and steps progress, so a load balancer stops sending work to a daemon that cannot serve.
"""
from __future__ import annotations

import inspect
import logging

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kevlard.api_types import Engine
from kevlard.web import errors

log = logging.getLogger(__name__)


class OpsAPI:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def routes(self) -> list[Route]:
        return [
            Route("/health", self.health, methods=["GET"]),
            Route("/ready", self.ready, methods=["GET"]),
            Route("/api/cluster", self.cluster, methods=["GET"]),
        ]

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        try:
            ready = bool(await _resolve(self._engine.is_ready()))
        except Exception:  # an engine that cannot even say is not ready
            log.exception("engine.is_ready() failed")
            ready = False
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    async def cluster(self, request: Request) -> Response:
        try:
            return JSONResponse(await _resolve(self._engine.snapshot()))
        except Exception:
            log.exception("engine.snapshot() failed")
            return errors.internal_error_response()


async def _resolve(value):
    """The engine may answer directly or with an awaitable; the web layer takes either."""
    return await value if inspect.isawaitable(value) else value
