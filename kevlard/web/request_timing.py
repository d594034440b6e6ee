"""Time to first token and end-to-end latency of the completions the server answers, measured at
the HTTP layer, over a sliding window: what the dashboard charts.

Measured on the wire, so every client counts (the dashboard's prompt box, `kevlard bench`, any
OpenAI client). The response starts only once the engine returned the first token (the web layer
pulls it before it answers), so the first body chunk of a streamed answer marks the first token;
a non-streamed answer gives its latency only.
"""
from __future__ import annotations

import collections
import math
import threading
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

TIMED_PATHS = ("/v1/chat/completions", "/v1/completions")
WINDOW_S = 30.0  # percentiles are over the requests that finished in the last WINDOW_S seconds
KEEP = 10_000  # at most this many finished requests are remembered


class RequestTimings:
    """Finished requests' (end, ttft, latency) over the last `window_s` seconds. Thread-safe."""

    def __init__(self, window_s: float = WINDOW_S, keep: int = KEEP) -> None:
        self.window_s = window_s
        self._lock = threading.Lock()
        self._done: collections.deque[tuple[float, float | None, float]] = collections.deque(maxlen=keep)

    def record(self, ttft_s: float | None, latency_s: float, now: float | None = None) -> None:
        with self._lock:
            self._done.append((time.monotonic() if now is None else now, ttft_s, latency_s))

    def summary(self, now: float | None = None) -> dict:
        """Count and p50/p99 of TTFT and latency (seconds, None when no request finished)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            while self._done and self._done[0][0] < now - self.window_s:
                self._done.popleft()
            done = list(self._done)
        ttfts = sorted(t for _, t, _ in done if t is not None)
        latencies = sorted(lat for _, _, lat in done)
        return {"window_s": self.window_s, "requests": len(done),
                "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
                "latency_p50_s": percentile(latencies, 50), "latency_p99_s": percentile(latencies, 99)}


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list; None for an empty one."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return round(sorted_values[rank - 1], 6)


class RequestTimingMiddleware:
    """Records each successful completion's TTFT and latency into `timings`."""

    def __init__(self, app: ASGIApp, timings: RequestTimings) -> None:
        self._app = app
        self._timings = timings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in TIMED_PATHS:
            await self._app(scope, receive, send)
            return
        start = time.monotonic()
        state = {"ok": False, "first": None, "streamed": False}

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                state["ok"] = message["status"] == 200
                headers = dict(message.get("headers") or ())
                state["streamed"] = headers.get(b"content-type", b"").startswith(b"text/event-stream")
            elif message["type"] == "http.response.body" and state["ok"]:
                now = time.monotonic()
                if state["first"] is None and message.get("body"):
                    state["first"] = now
                if not message.get("more_body", False):
                    ttft = state["first"] - start if state["streamed"] and state["first"] else None
                    self._timings.record(ttft, now - start, now)
            await send(message)

        await self._app(scope, receive, timed_send)
