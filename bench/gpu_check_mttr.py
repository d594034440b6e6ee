"""Part c of bench/gpu_check.py: end-to-end MTTR. A real `kevlard serve` (2 pipelines x 2 stages
+ 1 spare) on a tiny random Llama; pipeline 0's last stage is killed while two streams run; the
time to the next request's first token and to the daemon's `restore` event. Skipped, with the
reason, where the daemon's dependencies do not import or the devices cannot hold five workers.
"""
from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.client import HTTPConnection
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DAEMON_DEPS = ("starlette", "uvicorn", "transformers", "safetensors", "httpx", "anyio", "sse_starlette",
               "jinja2", "prometheus_client")
ADMIN_TOKEN = "gpu-check"


def check_mttr(device: str, out: Path, deadline: float) -> dict:
    """Part c: `kevlard serve` 2 pipelines x 2 stages + 1 spare on a tiny random Llama; kill
    pipeline 0's last stage while two streams run; time the next first token and the recovery."""
    missing = [name for name in DAEMON_DEPS if not _imports(name)]
    if missing:
        return {"skipped": f"daemon dependencies do not import: {', '.join(missing)}"}
    from kevlard.config import ConfigError, parse_devices
    from tests.tiny_models import make_tiny_model

    if device.startswith("cuda"):
        count = max(1, torch.cuda.device_count())
        devices = "cuda:" + ",".join(str(i % count) for i in range(5))  # one GPU: cuda:0,0,0,0,0
    else:
        devices = "cpu:5"
    try:
        parse_devices(devices)
    except ConfigError as e:
        return {"skipped": f"kevlard cannot put 5 workers on {torch.cuda.device_count()} GPU(s): {e}"}
    with tempfile.TemporaryDirectory(prefix="gpu-check-mttr-") as work:
        model = make_tiny_model(Path(work), "llama", num_layers=4)
        conf = Path(work) / "kevlard.toml"
        conf.write_text(f'[server]\nadmin_token = "{ADMIN_TOKEN}"\n[model]\ndtype = '
                        f'"{"bfloat16" if device.startswith("cuda") else "float32"}"\n[kv]\nmemory_mb = 64\n')
        port = _free_port()
        log_path = out / "mttr-daemon.log"
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(
            filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        with open(log_path, "wb") as log:
            daemon = subprocess.Popen(
                [sys.executable, "-m", "kevlard", "serve", "--config", str(conf), "--model", str(model),
                 "--devices", devices, "--pipelines", "2", "--stages", "2", "--spares", "1", "--port", str(port)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        try:
            result = {"devices": devices, "daemon_log": log_path.name}
            result.update(measure_mttr(port, daemon, deadline))
            return result
        finally:
            _stop(daemon)


def measure_mttr(port: int, daemon: subprocess.Popen, deadline: float) -> dict:
    """Ready -> 3 baseline requests -> 2 long streams -> kill -> a probe request -> `restore`."""
    t0 = time.perf_counter()
    while not _ready(port):
        if daemon.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"daemon not ready (exit code {daemon.poll()}); see its log")
        time.sleep(0.2)
    result = {"ready_s": round(time.perf_counter() - t0, 2)}
    events = EventReader(port)
    events.start()
    result["ttft_before_s"] = [round(stream(port, 8)["first_token_s"], 4) for _ in range(3)]
    snap = json.loads(_request(port, "GET", "/api/cluster")[1])
    victim = snap["pipelines"][0]["route"][-1]
    running = [Stream(port, 96) for _ in range(2)]
    for s in running:
        s.start()
    while not all(s.got_token.is_set() for s in running) and time.monotonic() < deadline:
        time.sleep(0.01)
    kill_wall, kill_t = time.time(), time.perf_counter()
    status, body = _request(port, "POST", "/api/faults", {"worker": victim, "kind": "kill"},
                            {"Authorization": f"Bearer {ADMIN_TOKEN}"})
    if status != 202:
        raise RuntimeError(f"POST /api/faults answered {status}: {body[:300]!r}")
    probe = stream(port, 8, since=kill_t)
    restore = events.wait_for("restore", deadline)
    for s in running:
        s.join(max(1.0, deadline - time.monotonic()))
    reroute = events.first("reroute")
    result.update(
        killed_worker=victim, kill_to_first_token_s=round(probe["first_token_s"], 4),
        reroute_s=reroute and reroute.get("seconds"),
        restore_since_failure_s=restore and restore.get("since_failure_s"),
        rehost_s=restore and restore.get("rehost_s"),
        kill_to_restore_event_s=restore and round(restore["time"] - kill_wall, 4),
        inflight_streams=[{"tokens": s.tokens, "max_tokens": s.max_tokens, "error": s.error,
                           "max_gap_s": round(max(s.gaps, default=0.0), 4)} for s in running],
        events=[e["kind"] for e in events.seen if e.get("time", 0) >= kill_wall])
    if restore is None:
        result["error"] = "no restore event before the part's deadline"
    events.close()
    return result


def stream(port: int, max_tokens: int, since: float | None = None) -> dict:
    """One streamed completion; first_token_s counts from `since` (default: the request's start)."""
    s = Stream(port, max_tokens)
    start = since if since is not None else time.perf_counter()
    s.run()
    if s.error or s.first_token_at is None:
        raise RuntimeError(f"streamed request failed: {s.error or 'no token'}")
    return {"first_token_s": s.first_token_at - start, "tokens": s.tokens}


class Stream(threading.Thread):
    """A streamed /v1/completions; remembers when text chunks came (a token whose bytes do not end
    a character comes with the next one), the gaps between them, and the tokens in `usage`."""

    def __init__(self, port: int, max_tokens: int):
        super().__init__(daemon=True)
        self.port, self.max_tokens = port, max_tokens
        self.got_token = threading.Event()
        self.first_token_at: float | None = None
        self.tokens, self.gaps, self.error = 0, [], None

    def run(self) -> None:
        body = {"prompt": "tell me more " * 8, "max_tokens": self.max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        conn = HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
            response = conn.getresponse()
            if response.status != 200:
                self.error = f"HTTP {response.status}: {response.read(300)!r}"
                return
            last = None
            for raw in response:
                line = raw.decode().strip()
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    self.error = str(chunk["error"])[:300]
                    return
                if chunk.get("usage"):
                    self.tokens = chunk["usage"]["completion_tokens"]
                if not chunk.get("choices"):
                    continue
                now = time.perf_counter()
                if last is None:
                    self.first_token_at = now
                    self.got_token.set()
                else:
                    self.gaps.append(now - last)
                last = now
        except OSError as e:
            self.error = f"{type(e).__name__}: {e}"
        finally:
            conn.close()


class EventReader(threading.Thread):
    """Follows GET /api/events (SSE) and keeps every event's JSON."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port = port
        self.seen: list[dict] = []
        self.changed = threading.Condition()
        self.conn = HTTPConnection("127.0.0.1", port, timeout=60)

    def run(self) -> None:
        try:
            self.conn.request("GET", "/api/events")
            for raw in self.conn.getresponse():
                line = raw.decode().strip()
                if line.startswith("data: {"):
                    with self.changed:
                        self.seen.append(json.loads(line[len("data: "):]))
                        self.changed.notify_all()
        except (OSError, ValueError, AttributeError):
            pass  # the stream ends with the daemon (or close(), which may land mid-read)

    def first(self, kind: str) -> dict | None:
        return next((e for e in self.seen if e.get("kind") == kind), None)

    def wait_for(self, kind: str, deadline: float) -> dict | None:
        with self.changed:
            self.changed.wait_for(lambda: self.first(kind) is not None, max(0.0, deadline - time.monotonic()))
        return self.first(kind)

    def close(self) -> None:
        self.conn.close()


def _imports(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except Exception:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(port: int, method: str, path: str, body: dict | None = None,
             headers: dict | None = None) -> tuple[int, bytes]:
    conn = HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, json.dumps(body) if body is not None else None,
                     {"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _ready(port: int) -> bool:
    try:
        return _request(port, "GET", "/ready")[0] == 200
    except OSError:
        return False


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM (the daemon drains and stops its workers), then SIGKILL its whole session."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
            return
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


# ---------------------------------------------------------------- report
