"""The workers as the daemon sees them: spawn, wait for ready, host stages, open links, routes.

All of it runs on the daemon's event loop; worker replies arrive from reader threads through
`loop.call_soon_threadsafe`. Every wait is bounded; a worker that dies while we wait is reported
with its exit code.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

from kevlard import messages as m
from kevlard.launcher import WorkerHandle

log = logging.getLogger("kevlard.cluster")


class WorkerStartError(RuntimeError):
    pass


@dataclass
class WorkerState:
    handle: WorkerHandle
    state: str = "starting"  # starting | spare | rehosting | healthy | dead
    failure: str | None = None  # why it was fenced: kill | hang | device_error | step_deadline
    stage: int | None = None
    layers: tuple[int, int] | None = None
    pipelines: set[int] = field(default_factory=set)
    last_heartbeat: float = 0.0
    steps_done: int = 0
    computing_s: float = 0.0  # its last heartbeat: how long its current step had computed
    ready: asyncio.Future | None = None
    replica_share: tuple[int, int, int] | None = None  # (pid, fd, size) of its shared replica pool (CPU)
    born: float = 0.0  # when it was spawned (time.monotonic())


SHM_DIR = "/dev/shm"
PREPARE_WAIT_S = 10.0  # a new spare waits at most this long for a rehost to end before preparing
RELEASE_AFTER_S = 2.0  # a dead worker's handle is closed this long after its death (then retried)
DEAD_SHOWN = 8  # dead workers listed in a snapshot: the most recent ones


class Cluster:
    def __init__(self, topology, launcher, link_timeout_s: float,
                 start_timeout_s: float, threads_per_worker: int, replication: bool = False):
        self.topology = topology
        self.launcher = launcher
        self.link_timeout_s = link_timeout_s
        self.start_timeout_s = start_timeout_s
        self.threads_per_worker = threads_per_worker
        self.workers: dict[int, WorkerState] = {}
        self.routes: list[list[int]] = [topology.route(p) for p in range(topology.pipelines)]
        P = topology.pipelines
        # which KV pool of routes[p][s] holds pipeline p's stage s: its own, or its replica pool (buddy)
        self.pools: dict[tuple[int, int], str] = {}
        # who keeps the replica of (pipeline, stage): the worker of the same stage in the next pipeline
        self.replica_holder: dict[tuple[int, int], int | None] = {
            (p, s): (self.routes[(p + 1) % P][s] if replication and P > 1 else None)
            for p in range(P) for s in range(topology.stages)}
        self.replication = replication and P > 1
        self._next_worker_id = topology.num_workers
        self.stopping = False
        self.cpu_sets: list[set[int]] | None = None  # cpu_budget = "pipeline": pipeline p's cores
        self.act_pairs: set[tuple[int, int]] = set()  # activation links open, (upstream, downstream)
        self._act_opening: dict[tuple[int, int], asyncio.Future] = {}  # activation links being opened
        self._cmd_ids = itertools.count(1)
        self._pending: dict[int, tuple[int, asyncio.Future]] = {}  # cmd_id -> (worker, reply)
        self.links_dir: str | None = None  # where each link's rendezvous file is made
        self.spawning: asyncio.Task | None = None  # the pipelines' workers being spawned (daemon start)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.on_message: Callable[[int, object], None] = lambda wid, msg: None
        self.on_death: Callable[[int], None] = lambda wid: None
        # the PrepareKV a spare gets once ready (daemon.py knows the KV's geometry); None: none
        self.prepare_command: Callable[[], m.PrepareKV] | None = None
        self._preparing: set[asyncio.Task] = set()

    # ---------------------------------------------------------------- start-up

    async def spawn_pipeline_workers(self) -> None:
        """Start the pipelines' workers: their fork server imports torch while the daemon loads the
        model (the first start blocks until it has; a thread waits for that, not the loop)."""
        self.loop = asyncio.get_running_loop()
        ids = range(self.topology.pipelines * self.topology.stages)
        handles = await asyncio.to_thread(
            lambda: [self.launcher.spawn(wid, self.topology.devices[wid], self.threads_per_worker) for wid in ids])
        for handle in handles:
            self._register(handle)

    async def start_spares(self) -> None:
        """Spares are spawned once the pipelines serve, so they do not slow the cold start."""
        for wid in self.topology.spare_ids:
            self._spawn(wid, self.topology.devices[wid])
        try:
            await self._wait_ready(self.topology.spare_ids)
        except WorkerStartError as e:
            log.error("spare worker failed to start: %s", e)
            return
        for wid in self.topology.spare_ids:
            if self.workers[wid].state == "starting":
                self.workers[wid].state = "spare"
                self.prepare_spare(wid)
        log.info("%d spare worker(s) ready", len(self.topology.spare_ids))

    def prepare_spare(self, wid: int) -> None:
        """The spare allocates its KV memory now, so that a rehost after a failure need not (a few
        tenths of a second of a busy host's CPU): once no other spare is rehosting, whose CPU this
        would take. A spare taken meanwhile allocates it as it hosts its stage, as before."""
        if self.prepare_command is None:
            return

        async def prepare() -> None:
            deadline = time.monotonic() + PREPARE_WAIT_S
            while any(w.state == "rehosting" for w in self.workers.values()) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            w = self.workers.get(wid)
            if w is None or w.state != "spare":
                return
            try:
                info = await self.command(wid, self.prepare_command())
                log.debug("spare %d prepared its KV memory in %s s", wid, info.get("prepare_s"))
            except Exception as e:  # its HostStage allocates the memory then; a dead spare is seen elsewhere
                log.warning("spare %d could not prepare its KV memory: %s", wid, e)

        task = self.loop.create_task(prepare())
        self._preparing.add(task)
        task.add_done_callback(self._preparing.discard)

    async def start(self, stage_commands: Callable[[int], m.HostStage]) -> None:
        """Host each pipeline's stages and open each pipeline's links."""
        t0 = time.monotonic()
        if self.spawning is not None:
            await asyncio.shield(self.spawning)  # cancelled start-up: the daemon still awaits it, then stops them
        elif not self.workers:
            await self.spawn_pipeline_workers()
        self.start_links_dir()
        await self._wait_ready(list(self.workers))
        t_ready = time.monotonic()
        hosts = []
        for p, route in enumerate(self.routes):
            for s, wid in enumerate(route):
                cmd = stage_commands(s)
                w = self.workers[wid]
                w.stage, w.layers = s, (cmd.first_layer, cmd.last_layer)
                w.pipelines.add(p)
                w.state = "healthy"
                self.pin(wid, p)
                hosts.append(self.command(wid, cmd))
        hosted = await asyncio.gather(*hosts)
        t_hosted = time.monotonic()
        pairs = [(a, b) for route in self.routes for a, b in zip(route, route[1:])]
        # standby links: the buddy of (p, s) is already linked to p's stage s-1 and s+1 workers,
        # so a reroute switches routes without opening anything
        for (p, s), buddy in self.replica_holder.items():
            if buddy is None:
                continue
            if s > 0:
                pairs.append((self.routes[p][s - 1], buddy))
            if s + 1 < len(self.routes[p]):
                pairs.append((buddy, self.routes[p][s + 1]))
        pairs = list(dict.fromkeys(pairs))
        links = [self.open_link(a, b) for a, b in pairs]
        links += [self.open_link(self.routes[p][s], holder, "repl")
                  for (p, s), holder in self.replica_holder.items() if holder is not None]
        await asyncio.gather(*links)
        # the phases of a start, to see which one a slow start spent its time in
        slowest = max((r for r in hosted if isinstance(r, dict)), key=lambda r: r.get("host_s", 0.0), default={})
        log.info("start: weight store built and workers ready after %.2f s, stages hosted in %.2f s "
                 "(slowest worker %.2f s: attach %s s, KV %s s, pack %s s), links open in %.2f s",
                 t_ready - t0, t_hosted - t_ready, slowest.get("host_s", 0.0), slowest.get("attach_s"),
                 slowest.get("kv_s"), slowest.get("pack_s"), time.monotonic() - t_hosted)

    def start_links_dir(self) -> None:
        """The directory of the files through which pairs of workers find each other to open a link:
        `kevlard-<pid>-links` in /dev/shm (removed at stop, or at the next start if this daemon dies)."""
        base = SHM_DIR if os.path.isdir(SHM_DIR) else tempfile.gettempdir()
        self.links_dir = os.path.join(base, f"kevlard-{os.getpid()}-links")
        os.makedirs(self.links_dir, mode=0o700, exist_ok=True)

    async def ensure_link(self, a: int, b: int) -> None:
        """An activation link from a to b, opened unless it already is. Callers at the same time
        (a reroute, a restore, a route's repair) share one opening: two links for one pair would
        leave each worker holding whichever registered last, perhaps not the same one."""
        if (a, b) in self.act_pairs:
            return
        opening = self._act_opening.get((a, b))
        if opening is None:
            opening = self._act_opening[(a, b)] = asyncio.ensure_future(self.open_link(a, b))
            opening.add_done_callback(lambda f: (self._act_opening.pop((a, b), None),
                                                 f.cancelled() or f.exception()))  # retrieved: never "unretrieved"
        await asyncio.shield(opening)

    def _spawn(self, wid: int, device: str) -> None:
        self._register(self.launcher.spawn(wid, device, self.threads_per_worker))

    def _register(self, handle) -> None:
        # counted from its spawn until its first heartbeat: one stopped before it ever beat is seen too
        now = time.monotonic()
        self.workers[handle.id] = WorkerState(handle, ready=self.loop.create_future(), last_heartbeat=now, born=now)
        handle.start_reader(self._from_thread, self._eof_from_thread)

    async def _wait_ready(self, ids: list[int]) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        for wid in ids:
            w = self.workers[wid]
            while not w.ready.done():
                if not w.handle.is_alive():
                    raise WorkerStartError(f"worker {wid} on {w.handle.device} died during start-up "
                                           f"with exit code {w.handle.exitcode}")
                if time.monotonic() > deadline:
                    raise WorkerStartError(f"worker {wid} on {w.handle.device} not ready after "
                                           f"{self.start_timeout_s:.0f} s (cluster.worker_start_timeout_s)")
                await asyncio.wait([w.ready], timeout=0.05)

    async def command(self, wid: int, msg) -> dict:
        """Send a command that the worker answers with CommandDone; raise if it fails or dies."""
        fut = self.loop.create_future()
        self._pending[msg.cmd_id] = (wid, fut)
        if not self.workers[wid].handle.send(msg):
            self._pending.pop(msg.cmd_id, None)
            raise WorkerStartError(f"worker {wid} is gone")
        try:
            done: m.CommandDone = await asyncio.wait_for(fut, self.start_timeout_s)
        finally:
            self._pending.pop(msg.cmd_id, None)
        if done.error:
            raise WorkerStartError(f"worker {wid}: {type(msg).__name__} failed: {done.error}")
        if isinstance(msg, m.HostStage) and wid in self.workers:
            share = (done.info or {}).get("replica_share")
            self.workers[wid].replica_share = tuple(share) if share else None
        return done.info

    def stop_replicating(self, source: int, holder: int) -> None:
        """The holder is gone: the source closes its link to it. On CPU it writes into the holder's
        pool and sends nothing over that link, so nothing else would tell it to stop copying."""
        w = self.workers.get(source)
        if w is not None and w.state == "healthy":
            w.handle.send(m.CloseLink(self.next_cmd_id(), holder, "repl-out"))

    def next_cmd_id(self) -> int:
        return next(self._cmd_ids)

    async def open_link(self, a: int, b: int, purpose: str = "act") -> None:
        """A two-party link between workers a (rank 0) and b (rank 1); nobody else takes part."""
        name = f"{purpose}-{a}-{b}-{self.next_cmd_id()}"
        path = os.path.join(self.links_dir, name)  # new for each link: nothing stale is ever read
        timeout = self.link_timeout_s
        try:
            await asyncio.gather(
                self.command(a, m.OpenLink(self.next_cmd_id(), b, name, 0, path, timeout, purpose)),
                self.command(b, m.OpenLink(self.next_cmd_id(), a, name, 1, path, timeout, purpose)))
        finally:  # both have found each other (or one is gone): the file has served
            with contextlib.suppress(OSError):
                os.unlink(path)
        if purpose == "act":
            self.act_pairs.add((a, b))

    def pool(self, pipeline: int, stage: int) -> str:
        return self.pools.get((pipeline, stage), "primary")

    def pin(self, wid: int, pipeline: int) -> None:
        """cpu_budget = "pipeline": confine every thread of the worker to the pipeline's cores
        (threads it starts later inherit them)."""
        w = self.workers.get(wid)
        if self.cpu_sets is None or w is None or not w.handle.pid:
            return
        cores = self.cpu_sets[pipeline % len(self.cpu_sets)]
        try:
            threads = os.listdir(f"/proc/{w.handle.pid}/task")
        except OSError:
            return  # gone
        for tid in threads:
            try:
                os.sched_setaffinity(int(tid), cores)
            except OSError:
                pass  # that thread ended, or the worker did

    def spawn_worker(self, device: str) -> int:
        """A new worker (a replacement spare) on `device`; returns its id."""
        wid = self._next_worker_id
        self._next_worker_id += 1
        self._spawn(wid, device)
        return wid

    async def wait_ready(self, wid: int) -> None:
        await self._wait_ready([wid])

    def take_spare(self) -> int | None:
        for wid, w in sorted(self.workers.items()):
            if w.state == "spare":
                w.state = "rehosting"
                return wid
        return None

    def fence(self, wid: int, why: str) -> None:
        """Mark dead, SIGKILL if still running; its EOF then finds it already handled."""
        w = self.workers.get(wid)
        if w is None or w.state == "dead":
            return
        w.failure = w.failure or why
        self._worker_gone(wid, eof=False)

    # ---------------------------------------------------------------- traffic from reader threads

    def _from_thread(self, wid: int, msg: object) -> None:
        if isinstance(msg, m.Heartbeat):
            # stamped as it is read, not when the event loop gets to it: a busy or stalled loop must
            # not make a live worker's heartbeat look old
            w = self.workers.get(wid)
            if w is not None:
                w.last_heartbeat = time.monotonic()
        self._to_loop(self._dispatch, wid, msg)

    def _eof_from_thread(self, wid: int) -> None:
        self._to_loop(self._worker_gone, wid)

    def _to_loop(self, fn, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: the cluster was stopped, nobody listens
            pass

    def _dispatch(self, wid: int, msg: object) -> None:
        w = self.workers.get(wid)
        if w is None:
            return
        if isinstance(msg, m.Heartbeat):
            w.steps_done, w.computing_s = msg.steps_done, msg.computing_s
        elif isinstance(msg, m.WorkerReady):
            w.last_heartbeat = time.monotonic()
            if not w.ready.done():
                w.ready.set_result(msg)
        elif isinstance(msg, m.CommandDone):
            pending = self._pending.get(msg.cmd_id)
            if pending is not None and not pending[1].done():
                pending[1].set_result(msg)
        else:
            self.on_message(wid, msg)

    def _worker_gone(self, wid: int, eof: bool = True) -> None:
        w = self.workers.get(wid)
        if w is None or w.state == "dead":
            return
        if self.stopping:  # we asked it to exit
            w.state = "stopped"
            return
        w.state = "dead"
        w.failure = w.failure or "kill"
        self.act_pairs = {pair for pair in self.act_pairs if wid not in pair}
        if eof:  # its channel closed because it is exiting: let it, so its exit code is its own
            w.handle.process.join(0.005)
            self.loop.call_later(0.5, w.handle.kill)  # ... but make sure
        else:
            w.handle.kill()
        for cmd_id, (owner, fut) in list(self._pending.items()):
            if owner == wid and not fut.done():
                fut.set_exception(WorkerStartError(f"worker {wid} died (exit code {w.handle.exitcode})"))
        for other in self.workers.values():  # their links to it: threads, sockets and pipes each
            if other.state not in ("dead", "stopped"):
                other.handle.send(m.CloseLink(self.next_cmd_id(), wid, "all"))
        self.loop.call_later(RELEASE_AFTER_S, self._release, wid)
        self.on_death(wid)

    def _release(self, wid: int) -> None:
        """A dead worker's channel and process handle are closed once it has exited: a daemon that
        outlives thousands of failures must not keep their file descriptors."""
        w = self.workers.get(wid)
        if w is not None and not w.handle.release() and not self.stopping:
            self.loop.call_later(RELEASE_AFTER_S, self._release, wid)  # not reaped yet

    # ---------------------------------------------------------------- views and shutdown

    def route_alive(self, pipeline: int) -> bool:
        return all(self.workers[w].state == "healthy" for w in self.routes[pipeline])

    def pipeline_state(self, pipeline: int) -> str:
        if not self.route_alive(pipeline):
            return "down"
        if any(self.pool(pipeline, s) == "replica" for s in range(len(self.routes[pipeline]))):
            return "rerouted"
        return "serving"

    def snapshot(self) -> dict:
        """Live workers, and the DEAD_SHOWN most recent dead ones (a long-lived daemon's failures would
        otherwise grow the list, and a metric series per worker id, without end); a dead worker's
        stages are the ones it served (`served`), not ones it serves."""
        workers = []
        dead = sorted(wid for wid, w in self.workers.items() if w.state == "dead")
        shown = set(dead[-DEAD_SHOWN:])
        for wid, w in sorted(self.workers.items()):
            if w.state == "dead" and wid not in shown:
                continue
            stages = []
            if w.stage is not None and w.layers is not None:
                stages = [{"pipeline": p, "stage": w.stage, "layers": list(w.layers)} for p in sorted(w.pipelines)]
            gone = w.state == "dead"
            workers.append({"id": wid, "device": w.handle.device, "pid": w.handle.pid, "state": w.state,
                            "failure": w.failure,
                            "stages": [] if gone else stages, "served": stages if gone else [],
                            "steps_done": w.steps_done,
                            "heartbeat_age_s": round(time.monotonic() - w.last_heartbeat, 3)
                            if w.last_heartbeat else None})
        pipelines = [{"id": p, "route": list(r), "state": self.pipeline_state(p),
                      "pools": [self.pool(p, s) for s in range(len(r))],
                      "replica_holders": [self.replica_holder.get((p, s)) for s in range(len(r))]}
                     for p, r in enumerate(self.routes)]
        return {"workers": workers, "pipelines": pipelines, "dead_workers": len(dead)}

    def stop(self, timeout_s: float = 5.0) -> None:
        self.stopping = True
        workers = list(self.workers.values())  # recovery may still add one from the loop
        for w in workers:
            w.handle.send(m.Shutdown())
        deadline = time.monotonic() + timeout_s
        for w in workers:
            if not w.handle.released:
                w.handle.process.join(max(0.0, deadline - time.monotonic()))
        for w in workers:
            w.handle.stop(1.0)
        if self.links_dir is not None:
            shutil.rmtree(self.links_dir, ignore_errors=True)
        log.info("workers stopped (pid %d)", os.getpid())


def pipeline_cpu_sets(pipelines: int, cores: list[int]) -> list[set[int]]:
    """The cores split evenly among the pipelines (one core each, shared round robin, when there
    are fewer cores than pipelines)."""
    n = len(cores)
    if n >= pipelines:
        return [set(cores[p * n // pipelines:(p + 1) * n // pipelines]) for p in range(pipelines)]
    return [{cores[p % n]} for p in range(pipelines)]
