"""The dashboard's routes over real HTTP against a fake engine: the page, the token-for-cookie
exchange, its vendored files, and `/api/stats` fed by the completions it times.
(tests/test_dashboard.py drives the page itself in Chromium against a real daemon.)"""
from __future__ import annotations

import re
from typing import Iterator

import httpx
import pytest

from kevlard.web.admin_api import ADMIN_COOKIE
from kevlard.web.request_timing import RequestTimings, percentile
from tests.web.fake_engine import FakeEngine
from tests.web.test_admin_api import TOKEN, live_server


@pytest.fixture
def url() -> Iterator[str]:
    with live_server(FakeEngine(delay_s=0.01)) as (base, _app):
        yield base


def test_page_without_token_is_read_only(url):
    r = httpx.get(url + "/", timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert 'data-admin="false"' in r.text
    assert "Read-only view" in r.text
    assert 'data-sse-url="/api/events"' in r.text  # static/event_stream.js connects it in one tab
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]


def test_right_token_sets_cookie_and_leaves_the_url(url):
    r = httpx.get(url + "/", params={"token": TOKEN}, timeout=10)
    assert r.status_code == 303
    assert r.headers["location"] == "/"
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"{ADMIN_COOKIE}={TOKEN};")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    assert r.headers["referrer-policy"] == "no-referrer"
    with httpx.Client(base_url=url, timeout=10, follow_redirects=True) as c:
        page = c.get("/", params={"token": TOKEN})
        assert str(page.url) == url + "/"
        assert 'data-admin="true"' in page.text
        assert "Read-only view" not in page.text
        # the cookie alone now authenticates the fault buttons' JSON requests
        fault = c.post("/api/faults", json={"worker": 1, "kind": "kill"})
        assert fault.status_code == 202, fault.text


def test_wrong_token_is_401_and_sets_no_cookie(url):
    r = httpx.get(url + "/", params={"token": "wrong"}, timeout=10)
    assert r.status_code == 401
    assert "set-cookie" not in r.headers
    assert "admin token refused" in r.text


def test_no_admin_token_configured_refuses_every_token():
    with live_server(FakeEngine(), admin_token="") as (base, _app):
        r = httpx.get(base + "/", params={"token": ""}, timeout=10)
        assert r.status_code == 401
        assert "no admin token configured" in r.text
        assert "fault injection is disabled" in httpx.get(base + "/", timeout=10).text


def test_vendored_static_files_are_served(url):
    page = httpx.get(url + "/", timeout=10).text
    scripts = re.findall(r'src="(/static/[^"]+)"', page)
    assert {"/static/htmx.min.js", "/static/htmx-ext-sse.min.js", "/static/dashboard.js",
            "/static/event_stream.js"} <= set(scripts)
    for path in [*scripts, *re.findall(r'href="(/static/[^"]+)"', page)]:
        r = httpx.get(url + path, timeout=10)
        assert r.status_code == 200, path
        assert r.content, path
    assert "defineExtension(\"sse\"" in httpx.get(url + "/static/htmx-ext-sse.min.js", timeout=10).text
    assert not any("//" in s for s in scripts), "no script from another host"


def test_stats_time_streamed_and_plain_completions(url):
    empty = httpx.get(url + "/api/stats", timeout=10).json()
    assert empty["requests"] == 0 and empty["ttft_p50_s"] is None and empty["latency_p99_s"] is None
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    with httpx.Client(base_url=url, timeout=10) as c:
        assert c.post("/v1/chat/completions", json={**body, "stream": True}).status_code == 200
        assert c.post("/v1/chat/completions", json=body).status_code == 200
        assert c.post("/v1/chat/completions", json={"messages": []}).status_code == 400  # not timed
        stats = c.get("/api/stats").json()
    assert stats["requests"] == 2
    assert stats["ttft_p50_s"] is not None and stats["ttft_p50_s"] > 0  # only the streamed one has a TTFT
    assert stats["latency_p99_s"] >= stats["latency_p50_s"] >= stats["ttft_p50_s"]


def test_request_timings_window_and_percentiles():
    timings = RequestTimings(window_s=10)
    for i in range(100):
        timings.record(ttft_s=i / 100, latency_s=i, now=1000.0 + i * 0.05)
    s = timings.summary(now=1005.0)
    assert s["requests"] == 100
    assert s["ttft_p50_s"] == 0.49 and s["ttft_p99_s"] == 0.98
    assert s["latency_p50_s"] == 49 and s["latency_p99_s"] == 98
    assert timings.summary(now=1100.0)["requests"] == 0  # all older than the window
    assert percentile([], 50) is None and percentile([3.0], 99) == 3.0


def test_the_page_listens_for_every_event_kind_the_daemon_emits():
    """The event log subscribes to named SSE events: a kind missing from EVENT_KINDS never shows
    (replica_paired, handback_failed, request_failed... did not)."""
    from pathlib import Path

    from kevlard.web.dashboard import EVENT_KINDS

    source = "".join(p.read_text() for p in (Path(__file__).parents[2] / "kevlard").rglob("*.py"))
    emitted = set(re.findall(r'\.emit\(\s*"([a-z_]+)"', source))
    assert len(emitted) > 20 and emitted <= set(EVENT_KINDS), sorted(emitted - set(EVENT_KINDS))
