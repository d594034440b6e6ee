"""Bursts of failures: workers dying while others are still being brought in.

Real daemon, real worker processes; the single faults of every kind and stage are in
test_fault_tolerance.py, whose model, load and failure-free answers this file reuses.
"""
from __future__ import annotations

import os
import re
import signal
import threading
import time

import httpx
import psutil

from tests.daemon_proc import running_daemon
from tests.test_fault_tolerance import (  # noqa: F401  (model_dir, reference: fixtures)
    assert_same, daemon_args, inject, model_dir, reference, run_load, wait_restored)


def fork_server(daemon_pid: int) -> psutil.Process:
    """The process every worker is forked from (the daemon's child running multiprocessing's forkserver)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for child in psutil.Process(daemon_pid).children():
            if "forkserver" in " ".join(child.cmdline()):
                return child
        time.sleep(0.05)
    raise AssertionError("no fork server under the daemon")


class StartUpKiller(threading.Thread):
    """SIGKILLs (or sends `sig` to) the next `count` workers the fork server forks, the moment they
    appear: before they can have started (a worker takes tens of milliseconds to report ready)."""

    def __init__(self, server: psutil.Process, count: int, sig: int = signal.SIGKILL):
        super().__init__(daemon=True)
        self.server, self.count, self.sig = server, count, sig
        self.known = {p.pid for p in server.children()}
        self.killed: list[int] = []
        self.stop_flag = threading.Event()

    def children(self) -> list[int]:
        # the kernel's list of the fork server's children: a few microseconds, where psutil's scan of
        # /proc took long enough on a busy host for a warm worker to be ready first (~15 ms)
        try:
            with open(f"/proc/{self.server.pid}/task/{self.server.pid}/children") as f:
                return [int(pid) for pid in f.read().split()]
        except OSError:
            return [child.pid for child in self.server.children()]

    def run(self) -> None:
        while len(self.killed) < self.count and not self.stop_flag.is_set():
            for pid in self.children():
                if pid not in self.known:
                    self.known.add(pid)
                    os.kill(pid, self.sig)
                    self.killed.append(pid)
            time.sleep(0.0005)


def wait_for_log(daemon, pattern: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not re.search(pattern, daemon.log()):
        assert time.monotonic() < deadline, f"no {pattern!r} in the log:\n{daemon.log()[-3000:]}"
        time.sleep(0.05)


def test_spares_killed_during_their_start_up_are_spawned_again_and_capacity_comes_back(
        model_dir, reference, tmp_path):
    """A worker is killed, and so are the first two replacement spares forked for its device, each
    before it is ready (a burst of kills, or the OOM killer, does that). The pipeline serves through
    the buddy meanwhile, nothing is lost, and a third spare is spawned and restores capacity: a spare
    that died starting up is not taken as a broken device after one try."""
    with running_daemon(daemon_args(model_dir, tmp_path), tmp_path) as daemon:
        url = daemon.url
        routes = [pl["route"] for pl in httpx.get(url + "/api/cluster").json()["pipelines"]]
        killer = StartUpKiller(fork_server(daemon.proc.pid), count=2)

        def kill_and_its_replacements():
            killer.start()
            inject(url, routes[0][1], "kill")

        try:
            assert_same(run_load(url, kill_and_its_replacements), reference)
            killer.join(30)
        finally:
            killer.stop_flag.set()
        assert len(killer.killed) == 2, killer.killed
        snap = wait_restored(url)  # the spare (pipeline 0's stage 1 restored from it) and a new spare
        # each was killed before it was ready: it failed starting, not as a spare (which is simply replaced)
        wait_for_log(daemon, r"event spare_failed .*attempt=2 ")
        assert snap["recovery"]["rehosts"] >= 1
        assert snap["ready"] is True


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_a_long_lived_daemon_and_workers_keep_nothing_of_the_workers_that_died(model_dir, tmp_path):
    """Six deaths of the worker next to the same long-lived one: the daemon closes each dead
    worker's channel and process handle, and the survivor closes its links to it (each a Gloo group:
    threads, sockets, pipes). Before, the daemon kept ~2.6 descriptors per dead worker (it would run
    out of them after a few hundred failures) and the survivor ~4 descriptors and 3 threads."""
    with running_daemon(daemon_args(model_dir, tmp_path), tmp_path) as daemon:
        url = daemon.url
        snap = httpx.get(url + "/api/cluster").json()
        survivor = next(w for w in snap["workers"] if w["id"] == snap["pipelines"][0]["route"][0])
        before = open_fds(daemon.proc.pid), open_fds(survivor["pid"]), threads(survivor["pid"])
        for _ in range(6):
            victim = httpx.get(url + "/api/cluster").json()["pipelines"][0]["route"][1]
            inject(url, victim, "kill")
            wait_restored(url, gone=victim)
        time.sleep(3)  # (a dead worker's handle is closed 2 s after its death)
        after = open_fds(daemon.proc.pid), open_fds(survivor["pid"]), threads(survivor["pid"])
        assert httpx.get(url + "/api/cluster").json()["recovery"]["failures"] == 6
    assert after[0] <= before[0] + 4, f"daemon: {before[0]} fds before, {after[0]} after six deaths"
    assert after[1] <= before[1] + 4, f"survivor: {before[1]} fds before, {after[1]} after six neighbour deaths"
    assert after[2] <= before[2] + 2, f"survivor: {before[2]} threads before, {after[2]} after"


def test_a_worker_computing_one_step_past_the_step_timeout_is_fenced_and_nothing_is_lost(
        model_dir, reference, tmp_path):
    """A device stuck in a kernel (here: made slow past `step_timeout_s`) stops no heartbeat: the
    worker reports how long its step has computed, and the daemon fences it as it would a hung one.
    Before, the late steps were only run again, as slowly, until every request failed."""
    args = daemon_args(model_dir, tmp_path, extra="[scheduler]\nstep_timeout_s = 0.15\n")
    with running_daemon(args, tmp_path) as daemon:
        url = daemon.url
        victim = httpx.get(url + "/api/cluster").json()["pipelines"][0]["route"][1]
        assert_same(run_load(url, lambda: inject(url, victim, "slow", 30.0)), reference)
        snap = wait_restored(url, gone=victim)
        dead = {w["id"]: w for w in snap["workers"] if w["state"] == "dead"}
        assert dead[victim]["failure"] == "step_timeout", dead
        assert re.search(rf"event failure worker={victim} reason=step_timeout", daemon.log())


def test_neighbouring_stages_restored_side_by_side_are_linked_to_each_other(model_dir, reference, tmp_path):
    """Pipeline 0's first and second stage workers are killed together: two spares restore them side
    by side, each linking itself to the other stage's worker of that moment (its buddy). Once both
    have switched, the two spares are neighbours: they must be linked, or every step on them fails
    and both are fenced as broken (they were). Nothing is lost either way; here no healthy worker
    may be fenced, and the requests after the restore answer as before."""
    args = daemon_args(model_dir, tmp_path)
    args[args.index("--spares") + 1] = "2"
    with running_daemon(args, tmp_path) as daemon:
        url = daemon.url
        routes = [pl["route"] for pl in httpx.get(url + "/api/cluster").json()["pipelines"]]

        def kill_two_neighbours():
            inject(url, routes[0][0], "kill")
            inject(url, routes[0][1], "kill")

        assert_same(run_load(url, kill_two_neighbours), reference)
        snap = wait_restored(url)
        deaths = [w for w in snap["workers"] if w["state"] == "dead"]
        assert sorted(w["id"] for w in deaths) == sorted(routes[0][:2]), snap["workers"]
        assert snap["recovery"]["failures"] == 2
        assert_same(run_load(url), reference)


def test_a_restarted_worker_that_hangs_while_starting_is_fenced_and_the_restart_tried_again(
        model_dir, reference, tmp_path):
    """recovery = "restart": a worker is killed, and the first worker forked to replace it stops
    (SIGSTOP) as it starts. It is judged hung by its missing heartbeats, fenced, and the restart is
    tried again: not left `starting` with the pipeline down until the start timeout (120 s)."""
    with running_daemon(daemon_args(model_dir, tmp_path, recovery="restart"), tmp_path) as daemon:
        url = daemon.url
        routes = [pl["route"] for pl in httpx.get(url + "/api/cluster").json()["pipelines"]]
        stopper = StartUpKiller(fork_server(daemon.proc.pid), count=1, sig=signal.SIGSTOP)

        def kill_and_stop_a_replacement():
            stopper.start()
            inject(url, routes[0][1], "kill")

        try:
            got = run_load(url, kill_and_stop_a_replacement)
            stopper.join(30)
        finally:
            stopper.stop_flag.set()
        assert len(stopper.killed) == 1
        stopped = next(w["id"] for w in httpx.get(url + "/api/cluster").json()["workers"]
                       if w["pid"] == stopper.killed[0])
        wait_for_log(daemon, rf"event failure worker={stopped} reason=hang ", timeout=60)
        assert_same(got, reference)
        wait_for_log(daemon, r"event restore .*how=restart", timeout=60)


def test_a_stage_and_its_buddy_killed_together_are_replayed_and_each_dead_worker_keeps_what_it_served(
        model_dir, reference, tmp_path):
    """Both workers of stage 1 killed 0.1 s apart (the second while it serves both pipelines): every
    request completes by replay, and /api/cluster (and the page) still says which stages each dead
    worker served; the second one's used to read "no stage" once both stages were restored."""
    with running_daemon(daemon_args(model_dir, tmp_path), tmp_path) as daemon:
        url = daemon.url
        routes = [pl["route"] for pl in httpx.get(url + "/api/cluster").json()["pipelines"]]

        def kill_stage_and_buddy():
            inject(url, routes[0][1], "kill")
            time.sleep(0.1)
            inject(url, routes[1][1], "kill")

        assert_same(run_load(url, kill_stage_and_buddy), reference)
        snap = wait_restored(url)
        served = {w["id"]: w["served"] for w in snap["workers"] if w["state"] == "dead"}
        assert served[routes[0][1]] and served[routes[1][1]], served
        assert {(s["pipeline"], s["stage"]) for s in served[routes[1][1]]} >= {(1, 1)}
