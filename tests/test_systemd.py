"""systemd operation: the daemon notifies $NOTIFY_SOCKET as systemd would see it (READY=1, WATCHDOG=1,
STATUS=, STOPPING=1), /ready turns 503 while no worker serves a stage, and the daemon gives
up (exit code 3) only when no route exists and nothing can bring one back."""
from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
import uuid
from types import SimpleNamespace

import anyio
import httpx
import pytest

from kevlard import daemon as kevlard_daemon
from kevlard.systemd import (
    DEFAULT_WATCHDOG_INTERVAL_S,
    Notifier,
    status_line,
    watchdog_interval,
)
from tests.daemon_proc import running_daemon
from tests.tiny_models import make_tiny_model

TOKEN = "test-admin-token"


class NotifyListener(threading.Thread):
    """A datagram socket standing in for systemd's notify socket; keeps every message it gets."""

    def __init__(self, address: str):
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.1)
        self.messages: list[dict[str, str]] = []
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines()))

    def wait_for(self, key: str, value: str | None = None, timeout: float = 30.0) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for msg in list(self.messages):
                if key in msg and (value is None or msg[key] == value):
                    return msg
            time.sleep(0.05)
        raise AssertionError(f"no {key}={value or '*'} within {timeout} s; got {self.messages}")

    def close(self) -> None:
        self._done.set()
        self.join(5)
        self.sock.close()


# ---------------------------------------------------------------- the notifier on its own


@pytest.mark.parametrize("abstract", [False, True])
def test_notifier_sends_to_a_path_or_an_abstract_socket(abstract):
    with tempfile.TemporaryDirectory(prefix="kv-") as tmp:  # short: unix socket paths are limited
        name = f"kevlard-test-{uuid.uuid4().hex}"
        bind, env = (("\0" + name, "@" + name) if abstract else
                     (os.path.join(tmp, "notify"), os.path.join(tmp, "notify")))
        listener = NotifyListener(bind)
        listener.start()
        try:
            notifier = Notifier({"NOTIFY_SOCKET": env, "WATCHDOG_USEC": "3000000"})
            assert notifier.enabled and notifier.watchdog_interval_s == 1.5
            assert notifier.notify("READY=1", "STATUS=serving: two\nlines")
            assert listener.wait_for("READY", "1", timeout=5) == {"READY": "1", "STATUS": "serving: two lines"}
            notifier.close()
        finally:
            listener.close()


def test_without_notify_socket_nothing_is_sent():
    notifier = Notifier({})
    assert not notifier.enabled and notifier.watchdog_interval_s is None
    assert notifier.notify("READY=1") is False


def test_watchdog_interval_is_half_of_watchdog_sec():
    assert watchdog_interval({"WATCHDOG_USEC": "10000000"}) == 5.0
    assert watchdog_interval({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}) == 0.5
    # meant for another process, absent or nonsense: status updates at the default pace
    assert watchdog_interval({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}) == DEFAULT_WATCHDOG_INTERVAL_S
    assert watchdog_interval({}) == DEFAULT_WATCHDOG_INTERVAL_S
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) == DEFAULT_WATCHDOG_INTERVAL_S


def test_status_line_summarises_the_cluster():
    snap = {"pipelines": [{"state": "serving"}, {"state": "serving"}], "num_running": 3, "num_waiting": 0,
            "workers": [{"state": "healthy"}] * 4 + [{"state": "spare"}]}
    assert status_line(snap) == "serving: 2/2 pipelines, 4 workers healthy, 1 spare, 3 running, 0 waiting"
    snap["pipelines"][0]["state"] = "rerouted"
    snap["workers"] = [{"state": "healthy"}] * 3 + [{"state": "dead"}, {"state": "rehosting"}]
    assert status_line(snap) == ("degraded: 2/2 pipelines, 3 workers healthy, 0 spare, 1 rehosting, "
                                 "1 dead, 3 running, 0 waiting")
    snap["pipelines"] = [{"state": "down"}, {"state": "down"}]
    assert status_line(snap).startswith("no route: 0/2 pipelines")


# ---------------------------------------------------------------- giving up, and only then


def fake_engine(worker_states: list[str], route_alive: bool = False, recovery_busy: bool = False,
                start_timeout_s: float = 60.0):
    workers = {i: SimpleNamespace(state=s) for i, s in enumerate(worker_states)}
    cluster = SimpleNamespace(routes=[[0, 1]], workers=workers, route_alive=lambda p: route_alive,
                              start_timeout_s=start_timeout_s)
    snapshot = {"pipelines": [{"state": "serving" if route_alive else "down"}], "workers": [],
                "num_running": 0, "num_waiting": 0}
    return SimpleNamespace(cluster=cluster, recovery=SimpleNamespace(busy=recovery_busy),
                           snapshot=lambda: snapshot)


async def gives_up(engine, grace_s: float, within_s: float) -> bool:
    """Whether _watch_capacity gives up within `within_s`."""
    lost = anyio.Event()
    with anyio.move_on_after(within_s):
        async with anyio.create_task_group() as tg:
            tg.start_soon(kevlard_daemon._watch_capacity, engine, grace_s, lost.set, 0.01)
            await lost.wait()
            tg.cancel_scope.cancel()
    return lost.is_set()


async def test_gives_up_when_no_route_and_nothing_can_restore_one():
    with anyio.fail_after(10):
        assert await gives_up(fake_engine(["dead", "dead"]), grace_s=0.1, within_s=5)


@pytest.mark.parametrize("engine", [
    fake_engine(["dead", "healthy"], route_alive=True),  # serving
    fake_engine(["dead", "dead"], recovery_busy=True),  # a reroute, restore or restart is under way
    fake_engine(["dead", "dead", "starting"]),  # a replacement is starting
    fake_engine(["dead", "dead", "spare"]),
    fake_engine(["dead", "dead", "rehosting"]),
], ids=["route", "recovering", "starting", "spare", "rehosting"])
async def test_keeps_serving_while_capacity_may_come_back(engine):
    with anyio.fail_after(10):
        assert not await gives_up(engine, grace_s=0.05, within_s=0.5)


@pytest.mark.parametrize("state", ["starting", "spare"])
async def test_a_worker_nobody_puts_to_use_does_not_hold_it_up_forever(state):
    # no recovery task waits for it: after the start timeout, it will not bring a route back
    with anyio.fail_after(10):
        assert await gives_up(fake_engine(["dead", "dead", state], start_timeout_s=0.2), grace_s=0.05, within_s=5)


# ---------------------------------------------------------------- a real daemon under systemd's eye


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("sd"), "llama", num_layers=4)


def test_daemon_notifies_systemd_and_ready_turns_503_while_a_stage_has_no_worker(model_dir, tmp_path):
    name = f"kevlard-notify-{uuid.uuid4().hex}"
    listener = NotifyListener("\0" + name)
    listener.start()
    conf = tmp_path / "kevlard.toml"
    conf.write_text(f'[server]\nadmin_token = "{TOKEN}"\n'
                    "[health]\nheartbeat_interval_s = 0.1\nheartbeat_timeout_s = 1.0\n")
    # no spare: the route cannot come back until replacement workers have started
    args = ["--config", str(conf), "--model", str(model_dir), "--devices", "cpu:4", "--pipelines", "2",
            "--stages", "2", "--spares", "0"]
    env = {"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "1000000"}
    try:
        with running_daemon(args, tmp_path, env=env) as daemon:
            ready = listener.wait_for("READY", "1")
            assert ready["STATUS"].startswith("serving: 2/2 pipelines, 4 workers healthy")
            listener.wait_for("WATCHDOG", "1")
            assert all(m.get("STATUS") for m in listener.messages if "WATCHDOG" in m)

            url = daemon.url
            routes = [pl["route"] for pl in httpx.get(url + "/api/cluster").json()["pipelines"]]
            # only the daemon speaks for the service: no worker inherited the notify socket
            for w in httpx.get(url + "/api/cluster").json()["workers"]:
                with open(f"/proc/{w['pid']}/environ", "rb") as f:
                    assert b"NOTIFY_SOCKET=" not in f.read(), f"worker {w['id']} can notify systemd"
            # every worker of stage 1 is killed, back to back: until a replacement worker has
            # hosted the stage (a few tenths of a second) no route exists. (Hangs are detected a
            # heartbeat check apart, long enough for the first one's replacement to restore a
            # route before the second is noticed: then a route always exists, as it should.)
            with httpx.Client(timeout=5) as client:
                for pipeline in routes:
                    r = client.post(url + "/api/faults", json={"worker": pipeline[1], "kind": "kill"},
                                    headers={"Authorization": f"Bearer {TOKEN}"})
                    assert r.status_code == 202, r.text
                codes = []
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and 503 not in codes:
                    codes.append(client.get(url + "/ready").status_code)
                    time.sleep(0.01)
            assert 503 in codes, "/ready never said 503 while no route existed"
            snap = httpx.get(url + "/api/cluster").json()
            gone = {w["id"]: w for w in snap["workers"] if w["id"] in {p[1] for p in routes}}
            assert all(w["state"] == "dead" and w["failure"] == "kill" for w in gone.values()), gone
            # replacement workers restore a route, and readiness with it; the daemon did not give up
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and httpx.get(url + "/ready", timeout=5).status_code != 200:
                time.sleep(0.1)
            assert httpx.get(url + "/ready", timeout=5).status_code == 200, daemon.log()[-3000:]
            assert daemon.proc.poll() is None
            with daemon.client() as c:
                assert c.post("/v1/completions", json={"prompt": "hello", "max_tokens": 4}).status_code == 200
            n_before_stop = len(listener.messages)
        # running_daemon sent SIGTERM and saw exit code 0
        stopping = listener.wait_for("STOPPING", "1", timeout=10)
        assert listener.messages.index(stopping) >= n_before_stop
    finally:
        listener.close()
