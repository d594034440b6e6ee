"""Operations routes: liveness, readiness, a JSON snapshot of the cluster, the event stream, and
`metrics_route` for Prometheus (added by the daemon, which owns the metrics).

`/health` only says the web process answers; `/ready` asks the engine whether a full route
exists and steps progress, so a load balancer stops sending work to a daemon that cannot serve.
`/api/events` replays the latest events, then streams new ones as Server-Sent Events.
"""
from __future__ import annotations

import asyncio
import inspect
import json
import logging
import threading
from typing import AsyncIterator

from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kevlard.api_types import Engine
from kevlard.events import Event
from kevlard.web import errors

log = logging.getLogger(__name__)

EVENT_REPLAY = 100  # events a new /api/events subscriber gets first, the latest ones
PING_INTERVAL_S = 15  # comment lines that keep idle proxies from closing the stream
SEND_TIMEOUT_S = 30  # a client that stops reading is dropped instead of holding a task forever
_END = object()  # put in a stream's queue to end it after the events already queued


class OpsAPI:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._lock = threading.Lock()  # close_streams may be called from another thread
        self._closing = False
        self._streams: dict[asyncio.Queue, asyncio.AbstractEventLoop] = {}

    def routes(self) -> list[Route]:
        return [
            Route("/health", self.health, methods=["GET"]),
            Route("/ready", self.ready, methods=["GET"]),
            Route("/api/cluster", self.cluster, methods=["GET"]),
            Route("/api/events", self.events, methods=["GET"]),
        ]

    def close_streams(self) -> None:
        """End every open event stream, and answer later ones with an empty stream.

        An event stream never ends by itself, and uvicorn's graceful shutdown waits for every
        open response, so the daemon calls this when it starts shutting down. sse-starlette's
        own shutdown detection only fires when uvicorn installs its signal handlers, which a
        programmatically run `uvicorn.Server` (the daemon's, the tests') does not. Thread-safe.
        """
        with self._lock:
            self._closing = True
            streams = list(self._streams.items())
        for queue, loop in streams:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, _END)
            except RuntimeError:  # its loop is closed, and the stream with it
                pass

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(self, request: Request) -> Response:
        try:
            ready = bool(await resolve(self._engine.is_ready()))
        except Exception:  # an engine that cannot even say is not ready
            log.exception("engine.is_ready() failed")
            ready = False
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    async def cluster(self, request: Request) -> Response:
        try:
            return JSONResponse(await resolve(self._engine.snapshot()))
        except Exception:
            log.exception("engine.snapshot() failed")
            return errors.internal_error_response()


    async def events(self, request: Request) -> Response:
        # No auth: the stream is read-only and the server binds to localhost by default. The
        # dashboard issue may put it behind the admin token (or the API key) if it says too much.
        return EventSourceResponse(self._event_stream(), ping=PING_INTERVAL_S,
                                   send_timeout=SEND_TIMEOUT_S)

    async def _event_stream(self) -> AsyncIterator[ServerSentEvent]:
        events = self._engine.events
        # Subscribe, then copy the replay, with no await in between: every event lands in
        # exactly one of the two, none twice and none lost.
        queue = events.subscribe()
        with self._lock:
            closing = self._closing
            if not closing:
                self._streams[queue] = asyncio.get_running_loop()
        try:
            if closing:
                return
            for event in list(events.recent)[-EVENT_REPLAY:]:
                yield _sse(event)
            while True:
                event = await queue.get()
                if event is _END:
                    return
                yield _sse(event)
        finally:
            # Runs on a client disconnect too: sse-starlette cancels (or closes) this generator.
            with self._lock:
                self._streams.pop(queue, None)
            events.unsubscribe(queue)


def metrics_route(metrics) -> Route:
    """`GET /metrics`: Prometheus text exposition of a `kevlard.metrics.Metrics`. Open like
    vLLM's: it says how busy the server is, nothing about requests' content."""
    from kevlard.metrics import CONTENT_TYPE

    async def scrape(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return Route("/metrics", scrape, methods=["GET"])


def _sse(event: Event) -> ServerSentEvent:
    data = json.dumps(event.as_dict(), ensure_ascii=False, separators=(",", ":"), default=str)
    return ServerSentEvent(data=data, event=event.kind)


async def resolve(value):
    """The engine may answer directly or with an awaitable; the web layer takes either."""
    return await value if inspect.isawaitable(value) else value
