"""systemd integration without dependencies: sd_notify over $NOTIFY_SOCKET, and the watchdog.

`Type=notify` units learn from us when the daemon serves (`READY=1`), that its event loop still
turns (`WATCHDOG=1`, from a task on that loop, so a blocked loop stops the pings and systemd
restarts us), what the cluster looks like (`STATUS=`, shown by `systemctl status`) and that we
are stopping (`STOPPING=1`). Outside systemd (no $NOTIFY_SOCKET) every call is a no-op.
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable

log = logging.getLogger("kevlard.systemd")

DEFAULT_WATCHDOG_INTERVAL_S = 5.0  # $NOTIFY_SOCKET without $WATCHDOG_USEC: status updates anyway


class Notifier:
    """Sends sd_notify messages to `$NOTIFY_SOCKET` (a path, or '@name' in the abstract namespace)."""

    def __init__(self, environ: dict[str, str] | None = None, unset_environment: bool = False) -> None:
        """`unset_environment` (as sd_notify's): take the variables out of os.environ, so that no
        process started from here on (the workers) inherits them and could speak for the service."""
        env = os.environ if environ is None else environ
        self.socket_name = env.get("NOTIFY_SOCKET", "")
        self.address = _socket_address(self.socket_name)
        self.watchdog_interval_s = watchdog_interval(env) if self.address else None
        if unset_environment and environ is None:
            for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                os.environ.pop(key, None)
        self._sock: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, *fields: str) -> bool:
        """Send `KEY=value` fields as one datagram; False (logged once) when it cannot."""
        if self.address is None:
            return False
        message = "\n".join(f.replace("\n", " ") for f in fields).encode("utf-8", "replace")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)  # never stall the event loop on a full socket
            self._sock.sendto(message, self.address)
            return True
        except OSError as e:
            if not self._warned:
                log.warning("cannot notify systemd at %r: %s", self.socket_name, e)
                self._warned = True
            return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def watchdog(self, status: Callable[[], str]) -> None:
        """`WATCHDOG=1` and a fresh `STATUS=` every interval, until cancelled. It runs on the
        daemon's loop, so the pings stop when the loop does."""
        if self.watchdog_interval_s is None:
            return
        while True:
            await asyncio.sleep(self.watchdog_interval_s)
            try:
                line = status()
            except Exception:  # the ping matters more than the status text
                log.exception("cannot build the status line")
                line = "running"
            self.notify("WATCHDOG=1", f"STATUS={line}")


def _socket_address(value: str) -> str | None:
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]  # abstract namespace
    if value.startswith("/"):
        return value
    log.warning("NOTIFY_SOCKET=%r is not a unix socket path; systemd notifications disabled", value)
    return None


def watchdog_interval(environ: dict[str, str]) -> float:
    """Half of WatchdogSec (as sd_watchdog_enabled reads it), or the default without a watchdog."""
    usec, pid = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return DEFAULT_WATCHDOG_INTERVAL_S  # meant for another process (our parent, say)
    try:
        value = int(usec)
    except ValueError:
        return DEFAULT_WATCHDOG_INTERVAL_S
    return value / 2e6 if value > 0 else DEFAULT_WATCHDOG_INTERVAL_S


def status_line(snap: dict) -> str:
    """One line for `systemctl status`, from `engine.snapshot()`:
    'serving: 2/2 pipelines, 4 workers healthy, 1 spare, 3 running, 0 waiting'."""
    pipelines = snap.get("pipelines", [])
    states = [w.get("state") for w in snap.get("workers", [])]
    alive = sum(1 for p in pipelines if p.get("state") != "down")
    if pipelines and all(p.get("state") == "serving" for p in pipelines):
        word = "serving"
    elif alive:
        word = "degraded"
    else:
        word = "no route"
    parts = [f"{alive}/{len(pipelines)} pipelines", f"{states.count('healthy')} workers healthy",
             f"{states.count('spare')} spare"]
    for label in ("rehosting", "starting", "dead"):
        if states.count(label):
            parts.append(f"{states.count(label)} {label}")
    parts += [f"{snap.get('num_running', 0)} running", f"{snap.get('num_waiting', 0)} waiting"]
    return f"{word}: " + ", ".join(parts)
