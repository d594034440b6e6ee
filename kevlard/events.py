"""The event log: every state change (worker state, reroute, rehost, replica lag, request resumed
or replayed) as a timestamped event, logged as one line and fanned out to live subscribers."""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("kevlard.events")


@dataclass(frozen=True)
class Event:
    kind: str  # worker_state | failure | reroute | rehost | restore | replica_lag | request_resumed | ...
    time: float  # wall clock, seconds since the epoch
    worker: int | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict:
        out = {"kind": self.kind, "time": round(self.time, 6)}
        if self.worker is not None:
            out["worker"] = self.worker
        out.update(self.data)
        return out


class EventLog:
    def __init__(self, keep: int = 1000):
        self.recent: collections.deque[Event] = collections.deque(maxlen=keep)
        self._subscribers: set[asyncio.Queue] = set()

    def emit(self, kind: str, worker: int | None = None, level: int = logging.INFO, **data: Any) -> Event:
        event = Event(kind, time.time(), worker, data)
        self.recent.append(event)
        details = " ".join(f"{k}={v}" for k, v in data.items())
        log.log(level, "event %s%s %s", kind, f" worker={worker}" if worker is not None else "", details)
        for q in list(self._subscribers):
            if q.qsize() < 1000:  # a stalled subscriber loses events rather than growing forever
                q.put_nowait(event)
        return event

    def subscribe(self) -> asyncio.Queue:
        q: asyncio.Queue = asyncio.Queue()
        self._subscribers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue) -> None:
        self._subscribers.discard(q)
