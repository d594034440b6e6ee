"""Log lines of the daemon and of its worker processes, in one format (`log_format`)."""
from __future__ import annotations

import json
import logging
import sys


class _JsonFormatter(logging.Formatter):
    def __init__(self, worker: int | None = None):
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": round(record.created, 3), "level": record.levelname.lower(),
                "logger": record.name, "message": record.getMessage()}
        if self.worker is not None:
            line["worker"] = self.worker
        return json.dumps(line)


def setup_logging(log_format: str, worker: int | None = None) -> None:
    """The `kevlard` loggers to stderr, as text or one JSON object a line; a worker process
    names itself in each line (its stderr is the daemon's)."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(_JsonFormatter(worker))
    else:
        who = "" if worker is None else f" [worker {worker}]"
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s %(name)s{who}: %(message)s"))
    root = logging.getLogger("kevlard")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False


def announce(log_format: str, message: str) -> None:
    """A line for whoever started the daemon (where it serves, the dashboard link), on stdout: as
    typed, or with `log_format = "json"` as one JSON object like every log line, so that a journal
    read as JSON holds no plain line."""
    if log_format == "json":
        import time

        message = json.dumps({"time": round(time.time(), 3), "level": "info", "logger": "kevlard",
                              "message": message})
    print(message, flush=True)
