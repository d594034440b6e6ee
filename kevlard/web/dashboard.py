"""The dashboard: `GET /` (Jinja2 page from templates/), its files under `/static`, and
`GET /api/stats` (TTFT and latency percentiles for its charts).

The page itself is static; its script polls `/api/cluster` and `/api/stats` every second and on
every event of `/api/events` (read through htmx's SSE extension), and sends faults and prompts
with `fetch`. `/?token=<admin token>`, the URL the daemon prints at start-up, trades the token for
an HttpOnly, SameSite=Strict cookie and redirects to `/`, so the token leaves the address bar and
the history; the fault buttons then authenticate by that cookie.
"""
from __future__ import annotations

import hmac
import sys
from pathlib import Path

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from kevlard.api_types import Engine
from kevlard.config import Config
from kevlard.web.admin_api import ADMIN_COOKIE, FAULT_KINDS
from kevlard.web.request_timing import RequestTimings


def _data_dir() -> Path:
    """The folder holding templates/ and static/: the source tree (an editable install, a
    checkout), else <prefix>/share/kevlard where a wheel puts them (pyproject's data-files)."""
    source = Path(__file__).resolve().parents[2]
    if (source / "templates" / "dashboard.html").is_file():
        return source
    return Path(sys.prefix) / "share" / "kevlard"


DATA_DIR = _data_dir()
TEMPLATES_DIR = DATA_DIR / "templates"
STATIC_DIR = DATA_DIR / "static"

# The event kinds the page listens for: htmx's SSE extension subscribes by name, so a kind not
# listed here is neither logged nor triggers a refresh. Add new kinds as the engine grows them.
EVENT_KINDS = (
    "worker_state", "failure", "fault_injected", "reroute", "reroute_failed", "rehost",
    "rehost_failed", "restore", "restore_waiting", "request_resumed", "request_failed", "replica_lag",
    "replica_paired", "replica_pairing_failed", "handback_failed", "route_linked", "route_link_failed",
    "pipeline_down", "no_route", "step_deadline", "spare_failed", "restart", "restart_failed",
    "restart_reload_emulated", "monitor_stalled",
)  # every kind the daemon emits (tests/web/test_dashboard.py checks the source against it)

# The page loads only its own files and talks only to its own origin; it may not be framed
# (its buttons inject faults), and it leaks no URL through Referer.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
                               "script-src 'self'; connect-src 'self'; frame-ancestors 'none'; "
                               "base-uri 'none'; form-action 'self'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class Dashboard:
    def __init__(self, engine: Engine, config: Config, admin_token: str, timings: RequestTimings) -> None:
        self._engine = engine
        health = config.health
        # a healthy worker whose heartbeat is this late is shown as suspect, before it is fenced
        self._suspect_after_s = max(3 * health.heartbeat_interval_s, health.heartbeat_timeout_s / 2)
        self._token = admin_token.encode()
        self._timings = timings
        self._templates = Jinja2Templates(directory=TEMPLATES_DIR)

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/", self.index, methods=["GET"]),
            Route("/api/stats", self.stats, methods=["GET"]),
            # check_dir=False: a missing asset folder breaks the page, never the API's start-up
            Mount("/static", app=StaticFiles(directory=STATIC_DIR, check_dir=False), name="static"),
        ]

    async def index(self, request: Request) -> Response:
        given = request.query_params.get("token")
        if given is not None:
            if self._token and hmac.compare_digest(given.encode(), self._token):
                response = RedirectResponse("/", status_code=303, headers=SECURITY_HEADERS)
                response.set_cookie(ADMIN_COOKIE, given, httponly=True, samesite="strict", path="/",
                                    secure=request.url.scheme == "https")
                return response
            return self._page(request, "unauthorized.html", {
                "admin_enabled": bool(self._token)}, status_code=401)
        return self._page(request, "dashboard.html", {
            "model": getattr(self._engine, "model_name", ""),
            "is_admin": self._is_admin(request),
            "admin_enabled": bool(self._token),
            "fault_kinds": FAULT_KINDS,
            "event_kinds": EVENT_KINDS,
            "suspect_after_s": self._suspect_after_s,
        })

    async def stats(self, request: Request) -> Response:
        return JSONResponse(self._timings.summary())

    def _is_admin(self, request: Request) -> bool:
        cookie = request.cookies.get(ADMIN_COOKIE)
        return bool(self._token) and cookie is not None and hmac.compare_digest(cookie.encode(), self._token)

    def _page(self, request: Request, name: str, context: dict, status_code: int = 200) -> Response:
        return self._templates.TemplateResponse(request, name, context, status_code=status_code,
                                                headers=SECURITY_HEADERS)
