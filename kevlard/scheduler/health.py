"""Health checks as pure functions of what the daemon observed: which workers missed their
heartbeats, which steps passed their deadline. The engine acts on the answers (fencing)."""
from __future__ import annotations

# A worker hosting a stage (a spare taking over) gets this many heartbeat timeouts: on a loaded CPU
# it builds the stage in a low-priority thread, which, preempted while it holds the interpreter
# lock, can hold the heartbeat thread off for more than a timeout (seen: five spares in a row fenced
# as hung a second into their rehost, with the host at a load of 4.5 on 2 cores). Its pipeline
# serves through the buddy meanwhile; a dead one is still seen at once, and a rehost that never
# ends fails at `cluster.worker_start_timeout_s`. A worker still starting (a replacement spare, a
# restarted pipeline's worker loading its stage from disk) is judged the same way: one that hung
# there was seen only at that start timeout (120 s), its pipeline down all along in restart mode.
REHOSTING_TIMEOUT_FACTOR = 10
LOADING = ("rehosting", "starting")
LIVE = ("healthy", "spare", *LOADING)


class HealthMonitor:
    def __init__(self, heartbeat_timeout_s: float, step_timeout_s: float):
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.step_timeout_s = step_timeout_s

    def timeout_s(self, state: str) -> float:
        return self.heartbeat_timeout_s * (REHOSTING_TIMEOUT_FACTOR if state in LOADING else 1)

    def stale_workers(self, now: float, beats: dict[int, tuple[str, float]]) -> list[tuple[int, str]]:
        """(worker, "hang") for each live worker whose last heartbeat is older than its timeout."""
        return [(wid, "hang") for wid, (state, last) in beats.items()
                if state in LIVE and last > 0
                and now - last > self.timeout_s(state)]

    @staticmethod
    def quiet_workers(now: float, beats: dict[int, tuple[str, float]], after_s: float) -> set[int]:
        """Healthy workers whose last heartbeat is older than `after_s` (a few intervals) but that
        are not judged yet: perhaps hung. New requests go elsewhere meanwhile if they can."""
        return {wid for wid, (state, last) in beats.items() if state == "healthy" and last > 0 and now - last > after_s}

    def next_expiry(self, beats: dict[int, tuple[str, float]]) -> float | None:
        """When the first live worker's heartbeat will be too old, if no new one comes."""
        times = [last + self.timeout_s(state) for state, last in beats.values()
                 if state in LIVE and last > 0]
        return min(times) if times else None

    @staticmethod
    def blind(late_s: float, interval_s: float) -> bool:
        """Whether the check itself ran so late (by more than an interval) that the heartbeats
        it sees may be old only because the daemon did not read them: then it must not judge."""
        return late_s > interval_s

    def stuck_workers(self, computing: dict[int, tuple[str, float]]) -> list[int]:
        """Serving workers that have computed one step for longer than the step timeout: a device
        stuck in a kernel releases the interpreter, so the heartbeat thread goes on beating."""
        return [wid for wid, (state, seconds) in computing.items()
                if state == "healthy" and seconds > self.step_timeout_s]

    def late_steps(self, now: float, dispatched_at: dict[int, float]) -> list[int]:
        return [step for step, sent in dispatched_at.items() if now - sent > self.step_timeout_s]


# What recovery tries again after a failure (a spare that died starting, a rehost, a restart) waits
# RETRY_S after the first failure in a row, twice as long after each next one, at most RETRY_MAX_S:
# a failure that repeats (a broken device) must not spawn and kill workers in a loop.
RETRY_S, RETRY_MAX_S = 0.5, 30.0


def retry_pause_s(failures: int) -> float:
    """The pause before the next try, after `failures` (>= 1) failures in a row."""
    return min(RETRY_MAX_S, RETRY_S * 2 ** (failures - 1))
