"""Admin routes: `POST /api/faults` injects a fault into a worker (kill, hang, slow, device error).

Guarded by the admin token (`Authorization: Bearer <token>`, or the `kevlard_admin` cookie the
dashboard sets), compared in constant time. Because a browser sends that cookie on its own, a
state-changing request that names a foreign `Origin` is refused, and one that authenticates by
cookie alone must be JSON (a cross-site form cannot send that without a CORS preflight, which
this server never grants).
"""
from __future__ import annotations

import hmac
import logging
import math
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kevlard.api_types import Engine, EngineError
from kevlard.messages import FAULT_KINDS
from kevlard.web import errors
from kevlard.web.errors import APIError
from kevlard.web.ops_api import resolve
from kevlard.web.request_params import read_json_body

log = logging.getLogger(__name__)

ADMIN_COOKIE = "kevlard_admin"
MAX_FAULT_BODY_BYTES = 64 * 1024
_DEFAULT_PORTS = {"http": 80, "https": 443}


class AdminAPI:
    def __init__(self, engine: Engine, admin_token: str) -> None:
        self._engine = engine
        self._token = admin_token.encode()

    def routes(self) -> list[Route]:
        return [Route("/api/faults", self.faults, methods=["POST"])]

    async def faults(self, request: Request) -> Response:
        self._authorize(request)
        body = await read_json_body(request, MAX_FAULT_BODY_BYTES)
        worker, kind, duration_s = parse_fault(body)
        try:
            result = await resolve(self._engine.inject_fault(worker, kind, duration_s))
        except KeyError:
            raise APIError(f"No worker {worker}", status=404, type="not_found_error",
                           param="worker", code="unknown_worker") from None
        except ValueError as e:
            raise APIError(str(e) or "Invalid fault", code="invalid_value") from None
        except EngineError:
            raise
        except Exception:
            log.exception("inject_fault(%r, %r, %r) failed", worker, kind, duration_s)
            return errors.internal_error_response()
        log.warning("fault injected by admin: worker=%s kind=%s duration_s=%s", worker, kind, duration_s)
        return JSONResponse({"accepted": True, "worker": worker, "kind": kind, **(result or {})},
                            status_code=202)

    def _authorize(self, request: Request) -> None:
        """Raises the APIError (403 or 401) that refuses `request`, or returns when it may act."""
        if not self._token:
            raise APIError("Admin disabled: no admin token is configured", status=403,
                           code="admin_disabled")
        if not is_same_origin(request):
            raise APIError("Cross-origin admin requests are refused", status=403,
                           code="origin_not_allowed")
        bearer = _bearer(request)
        if bearer is not None:
            if hmac.compare_digest(bearer, self._token):
                return
            raise _unauthorized("Incorrect admin token")
        cookie = request.cookies.get(ADMIN_COOKIE)
        if cookie is not None and hmac.compare_digest(cookie.encode(), self._token):
            content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if content_type != "application/json":
                raise APIError("Admin requests authenticated by cookie must be application/json",
                               status=415, code="unsupported_media_type")
            return
        raise _unauthorized("Incorrect admin token" if cookie is not None else
                            "Missing admin token: send 'Authorization: Bearer <admin token>'")


TIMED_KINDS = ("hang", "slow", "step_error")  # the kinds that end after duration_s (default: never)


def parse_fault(body: dict[str, Any]) -> tuple[int, str, float | None]:
    """(worker, kind, duration_s) from a `POST /api/faults` body; every fault a 400 naming its param."""
    unknown = sorted(set(body) - {"worker", "kind", "duration_s"})
    if unknown:
        raise APIError(f"Unknown field '{unknown[0]}'", param=unknown[0], code="unknown_parameter")
    worker = body.get("worker")
    if worker is None:
        raise APIError("'worker' is required", param="worker", code="missing_required_parameter")
    if isinstance(worker, bool) or not isinstance(worker, int):
        raise APIError(f"'worker' must be an integer worker id, got {worker!r}", param="worker",
                       code="invalid_type")
    kind = body.get("kind")
    if kind is None:
        raise APIError("'kind' is required", param="kind", code="missing_required_parameter")
    if kind not in FAULT_KINDS:
        raise APIError(f"'kind' must be one of {', '.join(FAULT_KINDS)}, got {kind!r}", param="kind",
                       code="invalid_value")
    duration_s = body.get("duration_s")
    if duration_s is not None:
        if isinstance(duration_s, bool) or not isinstance(duration_s, (int, float)):
            raise APIError(f"'duration_s' must be a number, got {duration_s!r}", param="duration_s",
                           code="invalid_type")
        try:
            finite = math.isfinite(duration_s)
        except OverflowError:  # an integer with hundreds of digits
            finite = False
        if not (finite and duration_s > 0):
            raise APIError("'duration_s' must be a finite number > 0", param="duration_s", code="invalid_value")
        if kind not in TIMED_KINDS:
            raise APIError(f"'duration_s' applies to {', '.join(TIMED_KINDS)} only; a {kind} fault is not timed",
                           param="duration_s", code="invalid_value")
        duration_s = float(duration_s)
    return worker, kind, duration_s


def is_same_origin(request: Request) -> bool:
    """True when the request names no `Origin`, or the one it names is this server's own
    (scheme, host and port of the request as the client addressed it)."""
    origin = request.headers.get("origin")
    if origin is None:
        return True  # not a browser's cross-site request: curl, the CLI, server-to-server
    own = _origin_key(request.url.scheme, request.headers.get("host", ""))
    try:
        parts = urlsplit(origin)
        theirs = _origin_key(parts.scheme, parts.netloc)
    except ValueError:  # "null" parses, but a malformed port does not
        return False
    return own is not None and own == theirs


def _origin_key(scheme: str, netloc: str) -> tuple[str, str, int] | None:
    scheme = scheme.lower()
    try:
        parts = urlsplit(f"{scheme}://{netloc}")
        port = parts.port or _DEFAULT_PORTS.get(scheme)
    except ValueError:
        return None
    if not parts.hostname or port is None or parts.username or parts.password:
        return None
    return scheme, parts.hostname.lower(), port


def _bearer(request: Request) -> bytes | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer":
        return b""  # some other scheme: a wrong token, not a missing one
    # headers arrive latin-1 decoded; back to their bytes for a byte-wise comparison
    return value.strip().encode("latin-1")


def _unauthorized(message: str) -> APIError:
    return APIError(message, status=401, code="invalid_admin_token",
                    headers={"WWW-Authenticate": "Bearer"})
