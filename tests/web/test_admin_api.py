"""Fault injection (`POST /api/faults`), the event stream (`GET /api/events`) and the admin token,
over real HTTP (uvicorn on a free port) against a fake engine."""
from __future__ import annotations

import json
import stat
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette

from kevlard.admin_token import remove_token_file, resolve_admin_token, token_file_for_url
from kevlard.config import Config
from kevlard.web.app import close_streams, create_app
from tests.live_server import serve_in_thread
from tests.web.fake_engine import FakeEngine

DEADLINE_S = 10.0
TOKEN = "s3cret-admin-token"


@contextmanager
def live_server(engine: FakeEngine, admin_token: str = TOKEN, *,
                graceful_timeout: int | None = 1) -> Iterator[tuple[str, Starlette]]:
    """Serve create_app(engine, ...) with uvicorn in a thread; yield its base URL and the app."""
    app = create_app(engine, Config(), admin_token=admin_token)
    with serve_in_thread(app, graceful_timeout, before_stop=lambda: close_streams(app)) as url:
        yield url, app


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def server(engine) -> Iterator[tuple[str, Starlette]]:
    with live_server(engine) as served:
        yield served


@pytest.fixture
def client(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server[0], timeout=DEADLINE_S) as c:
        yield c


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


# --- POST /api/faults ----------------------------------------------------------------------------

def test_fault_with_token_is_accepted_and_reaches_the_engine(client, engine):
    r = client.post("/api/faults", json={"worker": 2, "kind": "hang", "duration_s": 1.5}, headers=auth())
    assert r.status_code == 202, r.text
    assert r.json() == {"accepted": True, "worker": 2, "kind": "hang", "fault_id": 1}
    r = client.post("/api/faults", json={"worker": 0, "kind": "kill"}, headers=auth())
    assert r.status_code == 202, r.text
    assert engine.faults == [(2, "hang", 1.5), (0, "kill", None)]


def test_fault_without_token_is_401(client, engine):
    r = client.post("/api/faults", json={"worker": 0, "kind": "kill"})
    assert_error(r, 401, code="invalid_admin_token")
    assert r.headers["www-authenticate"] == "Bearer"
    assert engine.faults == []


@pytest.mark.parametrize("headers", [auth("wrong"), auth(TOKEN + "x"), {"Authorization": "Bearer"}, {"Authorization": TOKEN},
                                     {"Authorization": f"Basic {TOKEN}"}])
def test_fault_with_wrong_token_is_401(client, engine, headers):
    r = client.post("/api/faults", json={"worker": 0, "kind": "kill"}, headers=headers)
    assert_error(r, 401, code="invalid_admin_token")
    assert engine.faults == []


def test_fault_token_in_cookie(server, engine):
    url, _ = server
    with httpx.Client(base_url=url, timeout=DEADLINE_S, cookies={"kevlard_admin": TOKEN}) as c:
        assert c.post("/api/faults", json={"worker": 1, "kind": "slow"}).status_code == 202
        # a cross-site form cannot send JSON without a preflight; by cookie alone, only JSON acts
        r = c.post("/api/faults", content=json.dumps({"worker": 1, "kind": "kill"}),
                   headers={"Content-Type": "text/plain"})
        assert_error(r, 415)
    with httpx.Client(base_url=url, timeout=DEADLINE_S, cookies={"kevlard_admin": "wrong"}) as c:
        assert_error(c.post("/api/faults", json={"worker": 1, "kind": "kill"}), 401)
    assert engine.faults == [(1, "slow", None)]


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://127.0.0.1:1",
                                    "https://127.0.0.1:{port}", "http://localhost:{port}"])
def test_fault_from_a_foreign_origin_is_403(client, engine, server, origin):
    port = server[0].rsplit(":", 1)[1]
    r = client.post("/api/faults", json={"worker": 0, "kind": "kill"},
                    headers={**auth(), "Origin": origin.format(port=port)})
    assert_error(r, 403, code="origin_not_allowed")
    assert engine.faults == []


def test_fault_from_the_own_origin_is_accepted(client, engine, server):
    r = client.post("/api/faults", json={"worker": 3, "kind": "device_error"},
                    headers={**auth(), "Origin": server[0]})
    assert r.status_code == 202, r.text
    assert engine.faults == [(3, "device_error", None)]


def test_fault_on_unknown_worker_is_404(client, engine):
    r = client.post("/api/faults", json={"worker": 99, "kind": "kill"}, headers=auth())
    assert_error(r, 404, param="worker", code="unknown_worker")


@pytest.mark.parametrize("body,param", [
    ({"worker": 0, "kind": "explode"}, "kind"),
    ({"worker": 0, "kind": 3}, "kind"),
    ({"worker": 0}, "kind"),
    ({"kind": "kill"}, "worker"),
    ({"worker": "0", "kind": "kill"}, "worker"),
    ({"worker": True, "kind": "kill"}, "worker"),
    ({"worker": 0, "kind": "hang", "duration_s": 0}, "duration_s"),
    ({"worker": 0, "kind": "hang", "duration_s": -1}, "duration_s"),
    ({"worker": 0, "kind": "hang", "duration_s": "5"}, "duration_s"),
    ({"worker": 0, "kind": "hang", "duration_s": True}, "duration_s"),
    ({"worker": 0, "kind": "hang", "duration": 5}, "duration"),
    ({"worker": 0, "kind": "hang", "duration_s": 10 ** 400}, "duration_s"),
    ({"worker": 0, "kind": "kill", "duration_s": 5}, "duration_s"),  # a kill is not timed
    ({"worker": 0, "kind": "device_error", "duration_s": 5}, "duration_s"),
])
def test_fault_with_bad_body_is_400(client, engine, body, param):
    assert_error(client.post("/api/faults", json=body, headers=auth()), 400, param=param)
    assert engine.faults == []


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'{"worker": 0, "kind": "hang", "duration_s": NaN}'])
def test_fault_with_malformed_json_is_400(client, engine, content):
    r = client.post("/api/faults", content=content, headers={**auth(), "Content-Type": "application/json"})
    assert_error(r, 400)
    assert engine.faults == []


def test_engine_refusing_the_duration_is_400(client, engine):
    engine.workers.add(7)
    r = client.post("/api/faults", json={"worker": 7, "kind": "hang", "duration_s": 1e-300}, headers=auth())
    assert r.status_code == 202  # a tiny positive duration is the engine's call; it takes it here

    def refuse(worker, kind, duration_s):
        raise ValueError("duration_s is too long")

    engine.inject_fault = refuse
    r = client.post("/api/faults", json={"worker": 7, "kind": "hang", "duration_s": 1e9}, headers=auth())
    assert "too long" in assert_error(r, 400)["message"]


def test_faults_disabled_without_admin_token(engine):
    with live_server(engine, admin_token="") as (url, _):
        for headers in ({}, {"Authorization": "Bearer"}, auth("anything")):
            r = httpx.post(f"{url}/api/faults", json={"worker": 0, "kind": "kill"}, headers=headers)
            assert_error(r, 403, code="admin_disabled")
    assert engine.faults == []


def test_faults_only_takes_post(client):
    assert_error(client.get("/api/faults", headers=auth()), 405)


# --- GET /api/events -----------------------------------------------------------------------------

def read_events(lines: Iterator[str], count: int) -> list[tuple[str, dict]]:
    """The next `count` SSE events from `lines` as (event name, data); comments are skipped."""
    out: list[tuple[str, dict]] = []
    name, data = None, []
    for line in lines:
        if line.startswith(":"):
            continue
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            data.append(line[len("data: "):])
        elif line == "" and data:
            out.append((name, json.loads("\n".join(data))))
            name, data = None, []
            if len(out) == count:
                return out
    raise AssertionError(f"stream ended after {len(out)} of {count} events")


def wait_until(predicate, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)


def test_events_replay_the_latest_then_stream_live_ones(client, engine):
    for i in range(105):
        engine.events.emit("worker_state", worker=i % 4, state="ready", seq=i)
    with client.stream("GET", "/api/events") as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        replayed = read_events(lines, 100)
        assert [kind for kind, _ in replayed] == ["worker_state"] * 100
        assert [data["seq"] for _, data in replayed] == list(range(5, 105))
        assert replayed[0][1]["kind"] == "worker_state" and replayed[0][1]["worker"] == 5 % 4
        assert engine.events.num_subscribers == 1
        # live events come from the server's own loop, as the engine's would
        for worker, kind in [(1, "kill"), (2, "slow")]:
            assert client.post("/api/faults", json={"worker": worker, "kind": kind},
                               headers=auth()).status_code == 202
        live = read_events(lines, 2)
    assert [(name, data["worker"], data["fault"]) for name, data in live] == [
        ("fault_injected", 1, "kill"), ("fault_injected", 2, "slow")]
    assert live[0][1]["time"] <= live[1][1]["time"]
    # the client hung up: the stream lets go of its subscription
    wait_until(lambda: engine.events.num_subscribers == 0, "the stream unsubscribed")


def test_event_streams_are_independent(client, engine):
    engine.events.emit("worker_state", worker=0, state="ready")
    with client.stream("GET", "/api/events") as a, client.stream("GET", "/api/events") as b:
        lines_a, lines_b = a.iter_lines(), b.iter_lines()
        assert read_events(lines_a, 1)[0][0] == read_events(lines_b, 1)[0][0] == "worker_state"
        assert engine.events.num_subscribers == 2
        client.post("/api/faults", json={"worker": 0, "kind": "kill"}, headers=auth())
        assert read_events(lines_a, 1)[0][1]["fault"] == read_events(lines_b, 1)[0][1]["fault"] == "kill"
    wait_until(lambda: engine.events.num_subscribers == 0, "both streams unsubscribed")


def test_shutdown_is_not_held_up_by_an_open_event_stream(engine):
    """Without a graceful-shutdown timeout, uvicorn waits for every open response: close_streams
    ends the event stream, which ends cleanly for its client."""
    engine.events.emit("worker_state", worker=0, state="ready")
    app = create_app(engine, Config(), admin_token=TOKEN)
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                       lifespan="off", timeout_graceful_shutdown=None))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    wait_until(lambda: uv.started, "uvicorn started")
    port = uv.servers[0].sockets[0].getsockname()[1]
    try:
        with httpx.Client(timeout=DEADLINE_S) as c, c.stream("GET", f"http://127.0.0.1:{port}/api/events") as r:
            lines = r.iter_lines()
            assert read_events(lines, 1)[0][0] == "worker_state"
            close_streams(app)
            uv.should_exit = True
            assert list(lines) == []  # the stream ends: no error, no truncated chunk
        thread.join(DEADLINE_S)
        assert not thread.is_alive(), "uvicorn's shutdown waited on the event stream"
        assert engine.events.num_subscribers == 0
    finally:
        uv.force_exit = uv.should_exit = True
        thread.join(DEADLINE_S)


def test_event_stream_opened_after_close_ends_at_once(engine, server):
    url, app = server
    engine.events.emit("worker_state", worker=0, state="ready")
    close_streams(app)
    r = httpx.get(f"{url}/api/events", timeout=DEADLINE_S)
    assert r.status_code == 200 and "event:" not in r.text
    assert engine.events.num_subscribers == 0


# --- admin token ---------------------------------------------------------------------------------

def test_generated_token_is_written_for_the_owner_only(tmp_path):
    state_dir = tmp_path / "state" / "kevlard"
    token, path = resolve_admin_token("", 8000, state_dir)
    assert path == state_dir / "admin_token.8000"
    assert len(token) >= 40 and token.replace("-", "").replace("_", "").isalnum()
    assert path.read_text() == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    again, same_path = resolve_admin_token("", 8000, state_dir)
    assert same_path == path and again != token and path.read_text() == again


def test_daemons_on_other_ports_keep_their_own_token_files(tmp_path):
    """Two daemons on one host: each client finds the token of the daemon its URL names, and a
    daemon that exits takes its file along, not another daemon's."""
    a, path_a = resolve_admin_token("", 8000, tmp_path)
    b, path_b = resolve_admin_token("", 8001, tmp_path)
    assert path_a != path_b and path_a.read_text() == a and path_b.read_text() == b
    assert token_file_for_url("http://127.0.0.1:8001/", tmp_path) == path_b
    assert token_file_for_url("http://localhost", tmp_path).name == "admin_token.80"
    remove_token_file(path_b, a)  # not its token: left alone
    assert path_b.read_text() == b
    remove_token_file(path_b, b)
    assert not path_b.exists() and path_a.read_text() == a


def test_generated_token_tightens_a_loose_old_file(tmp_path):
    old = tmp_path / "admin_token.8000"
    old.write_text("an old, longer token that must be replaced entirely")
    old.chmod(0o644)
    token, path = resolve_admin_token("", 8000, tmp_path)
    assert path == old and path.read_text() == token
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_configured_token_is_used_as_is(tmp_path):
    assert resolve_admin_token("my-token", 8000, tmp_path / "state") == ("my-token", None)
    assert not (tmp_path / "state").exists()


def test_generated_token_opens_the_admin_api(tmp_path, engine):
    token, _ = resolve_admin_token("", 8000, tmp_path)
    with live_server(engine, admin_token=token) as (url, _):
        r = httpx.post(f"{url}/api/faults", json={"worker": 0, "kind": "kill"}, headers=auth(token))
    assert r.status_code == 202
    assert engine.faults == [(0, "kill", None)]


def test_idle_event_stream_is_pinged_with_comments(engine, monkeypatch):
    monkeypatch.setattr("kevlard.web.ops_api.PING_INTERVAL_S", 0.05)
    with live_server(engine) as (url, _), httpx.stream("GET", f"{url}/api/events", timeout=DEADLINE_S) as r:
        first = next(line for line in r.iter_lines() if line)
    assert first.startswith(": ping")  # a comment: EventSource clients ignore it
