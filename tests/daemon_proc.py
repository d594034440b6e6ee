"""Run a real `kevlard serve` in a subprocess for end-to-end tests, and stop it cleanly."""
from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A free port below the kernel's ephemeral range: a port the kernel hands out for port 0 could be
    taken again before the daemon binds it, by the daemon's own link sockets (seen in CI: "address
    already in use")."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    if low > 11000:
        for _ in range(200):
            port = random.randrange(10000, low)
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shm_segments(pid: int) -> list[str]:
    return [p for p in os.listdir("/dev/shm") if p.startswith(f"kevlard-{pid}-")]


class Daemon:
    def __init__(self, proc: subprocess.Popen, url: str, log_path: Path):
        self.proc = proc
        self.url = url
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, timeout: float = 120.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"daemon did not stop within {timeout} s:\n{self.log()[-3000:]}")


def start_daemon(args: list[str], tmp_path: Path, ready_timeout: float = 240.0,
                 env: dict | None = None, new_session: bool = False) -> Daemon:
    """`new_session`: the daemon leads a process group of its own (with its workers), as under
    systemd or in a terminal, so that a test can signal the whole group."""
    port = free_port()
    log_path = tmp_path / f"kevlard-{port}.log"
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **(env or {}))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "kevlard", "serve", "--port", str(port), *args],
                                stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=tmp_path,
                                start_new_session=new_session)
    url = f"http://127.0.0.1:{port}"
    daemon = Daemon(proc, url, log_path)
    deadline = time.monotonic() + ready_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited with {proc.returncode}:\n{daemon.log()[-5000:]}")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return daemon
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    daemon.stop(signal.SIGKILL)
    raise AssertionError(f"daemon not ready after {ready_timeout} s:\n{daemon.log()[-5000:]}")


@contextlib.contextmanager
def running_daemon(args: list[str], tmp_path: Path, **kw):
    daemon = start_daemon(args, tmp_path, **kw)
    try:
        yield daemon
    except BaseException:
        # the daemon's own account of what happened goes into the failure report (CI shows it)
        print(f"--- daemon log (last 8000 characters) ---\n{daemon.log()[-8000:]}", file=sys.stderr)
        raise
    finally:
        code = daemon.stop()
        assert code == 0, f"daemon exited with {code}:\n{daemon.log()[-3000:]}"
        assert shm_segments(daemon.proc.pid) == [], "shared memory left behind"
