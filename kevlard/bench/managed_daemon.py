"""A `kevlard serve` that the benchmark starts, waits for and stops itself (`--config`).

The daemon gets a copy of the user's config with the settings of the run written over it
(`server.port`, `server.admin_token`, and per mode `recovery` or `kv.replication`), so that
the fault schedule knows the admin token without reading the user's token file, and so that
each mode of a comparison is the same config with one field changed. It runs in its own
session: a Ctrl-C meant for the benchmark reaches the daemon only as our SIGTERM, and a daemon
that ignores SIGTERM is SIGKILLed with its whole process group (its workers).
"""
from __future__ import annotations

import json
import math
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any, Sequence

import httpx

from kevlard.bench.errors import BenchError

READY_TIMEOUT_S = 300.0  # a first start converts a GGUF once (~20 s on 2 cores); generous
STOP_TIMEOUT_S = 60.0  # SIGTERM drains in-flight requests first (server.drain_timeout_s)
KILL_TIMEOUT_S = 10.0
POLL_S = 0.2
LOG_TAIL_CHARS = 3000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_toml(path: str | os.PathLike) -> dict[str, Any]:
    """The config file as a dict; BenchError naming the file when it is missing or not TOML."""
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise BenchError(f"--config {path}: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise BenchError(f"--config {path}: not valid TOML: {e}") from e


def with_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of `raw` with dotted `overrides` ({"kv.replication": False}) set."""
    out = {key: dict(value) if isinstance(value, dict) else value for key, value in raw.items()}
    for dotted, value in overrides.items():
        section, _, key = dotted.rpartition(".")
        target = out.setdefault(section, {}) if section else out
        if not isinstance(target, dict):
            raise BenchError(f"--config: {section} must be a table")
        target[key] = value
    return out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("nan" if math.isnan(value) else
                                                         ("inf" if value > 0 else "-inf"))
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise BenchError(f"--config: cannot write {type(value).__name__} value {value!r} back as TOML")


def toml_dumps(data: dict[str, Any]) -> str:
    """TOML for a kevlard config: top-level values, then one table per section (one level deep)."""
    lines = [f"{key} = {_toml_value(value)}" for key, value in data.items() if not isinstance(value, dict)]
    for section, table in data.items():
        if isinstance(table, dict):
            if any(isinstance(value, dict) for value in table.values()):
                raise BenchError(f"--config: [{section}] has nested tables, which kevlard does not read")
            lines += ["", f"[{section}]", *(f"{key} = {_toml_value(value)}" for key, value in table.items())]
    return "\n".join(lines) + "\n"


class ManagedDaemon:
    """`python -m kevlard serve --config <copy>` on a free port, for one benchmark run."""

    def __init__(self, config_path: str | os.PathLike, work_dir: Path, name: str, *,
                 overrides: dict[str, Any] | None = None, serve_args: Sequence[str] = (),
                 ready_timeout_s: float = READY_TIMEOUT_S) -> None:
        raw = load_toml(config_path)
        server = raw.get("server") if isinstance(raw.get("server"), dict) else {}
        self.port = free_port()
        self.admin_token = str(server.get("admin_token") or secrets.token_urlsafe(24))
        self.api_key = str(server.get("api_key") or "") or None
        host = str(server.get("host") or "127.0.0.1")
        # A wildcard bind is reached on loopback; a named address is reached there.
        self.url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{self.port}"
        settings = {"server.port": self.port, "server.admin_token": self.admin_token, **(overrides or {})}
        work_dir.mkdir(parents=True, exist_ok=True)
        self.config_path = work_dir / f"{name}.toml"
        self.config_path.write_text(toml_dumps(with_overrides(raw, settings)), encoding="utf-8")
        os.chmod(self.config_path, 0o600)  # it holds the admin token
        self.log_path = work_dir / f"{name}.log"
        self.serve_args = list(serve_args)
        self.ready_timeout_s = ready_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        except OSError:
            return ""

    def start(self) -> None:
        """Start the daemon and wait until /ready answers 200; BenchError (daemon stopped) if it
        exits first or is not ready within ready_timeout_s."""
        command = [sys.executable, "-m", "kevlard", "serve", "--config", str(self.config_path),
                   *self.serve_args, "--port", str(self.port)]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + self.ready_timeout_s
        with httpx.Client(trust_env=False, timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise BenchError(f"kevlard serve exited with {self.proc.returncode} before it was "
                                     f"ready (log {self.log_path}):\n{self.log_tail()}")
                try:
                    if client.get(self.url + "/ready").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(POLL_S)
        self.stop()
        raise BenchError(f"kevlard serve not ready after {self.ready_timeout_s:g} s "
                         f"(log {self.log_path}):\n{self.log_tail()}")

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, wait up to timeout_s, then SIGKILL the process group; the exit code."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                return proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # its own session: the daemon and its workers
                except ProcessLookupError:
                    pass
                try:
                    return proc.wait(KILL_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    return None
        return proc.returncode

    def __enter__(self) -> "ManagedDaemon":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
