"""Failure handling on the daemon side: detect, fence, reroute to the buddy, resume from the
replica, restore capacity with a spare — or, with `recovery = "restart"`, the baseline of
today's engines: tear the pipeline down and restart it from the weights on disk.

Runs on the daemon's event loop next to the engine; see docs/structure.md for the sequence.
"""
from __future__ import annotations

import asyncio
import logging
import time

from kevlard import messages as m
from kevlard.replica_pairing import pair_replicas, rewire_replicas
from kevlard.restart import restart_pipeline
from kevlard.scheduler.health import HealthMonitor, retry_pause_s

log = logging.getLogger("kevlard.recovery")

# A worker whose heartbeat is this many intervals old (0.3 s by default; judged hung at the timeout,
# 1 s) gets no new requests while another pipeline has room: a request sent just after a hang
# otherwise waits out the detection on the hung pipeline (the issue 3 benchmark's hang probe did).
QUIET_AFTER_INTERVALS = 3
# A replacement spare that dies during start-up is spawned again (after health.retry_pause_s); the
# fifth failure in a row gives the device up.
SPARE_ATTEMPTS = 5
# A spare that dies this soon after its spawn without ever serving (one killed as soon as it is
# ready, or that its KV memory gets killed for) is replaced after a pause that doubles with each
# such death in a row on its device: a reviewer killing every new spare got ~390 spawned in 2 minutes.
SPARE_STABLE_S = 60.0


class Recovery:
    def __init__(self, engine, stage_command, weights_dir: str):
        self.engine = engine
        self.cluster = engine.cluster
        self.scheduler = engine.scheduler
        self.events = engine.events
        self.config = engine.config
        self.stage_command = stage_command  # (stage, replica_pool, from_disk) -> HostStage
        self.weights_dir = weights_dir
        self.monitor = HealthMonitor(self.config.health.heartbeat_timeout_s, self.config.scheduler.step_timeout_s)
        self.counters = {"failures": 0, "reroutes": 0, "rehosts": 0, "restarts": 0,
                         "requests_resumed_replica": 0, "requests_replayed": 0, "tokens_recomputed": 0}
        self.recovery_seconds: list[float] = []
        self._tasks: set[asyncio.Task] = set()
        self._pending_restore: list[tuple[int, int, float]] = []  # (pipeline, stage, failed_at)
        self._last_lag, self._lag_reported_at = 0, 0.0
        self.restarting: set[int] = set()  # pipelines being torn down and restarted
        self.restoring: set[tuple[int, int]] = set()  # (pipeline, stage) a spare is being brought in for
        self.pairing: set[tuple[int, int]] = set()  # (pipeline, stage) whose replica link is opening
        self.linking: set[int] = set()  # pipelines whose route is getting a missing activation link
        self._holds: dict[int, int] = {}  # pipeline -> recovery steps holding it paused
        self._rehost_failures: dict[tuple[int, int], int] = {}  # (pipeline, stage) -> rehosts failed in a row
        self._spare_deaths: dict[str, int] = {}  # device -> spares dead soon after their spawn, in a row
        self._heard_since = 0.0  # the end of the daemon's last stall: silence before it is not counted

    # ---------------------------------------------------------------- detection

    async def watch(self) -> None:
        """Heartbeats and step deadlines, checked every heartbeat interval, and the moment the
        oldest heartbeat runs out (a hang is seen at the timeout, not up to an interval later)."""
        interval = self.config.health.heartbeat_interval_s
        wake = time.monotonic() + interval
        while True:
            await asyncio.sleep(max(0.0, wake - time.monotonic()))
            now = time.monotonic()
            if self.monitor.blind(now - wake, interval):
                # The daemon itself did not run for a while (host starved of CPU, VM paused, SIGSTOP):
                # the heartbeats sent meanwhile are still in the pipes, unread. Judge one interval
                # later, once the reader threads have caught up; a real hang is seen then.
                if now - wake >= self.monitor.heartbeat_timeout_s / 2:  # worth telling; jitter is not
                    self.events.emit("monitor_stalled", None, level=logging.WARNING, late_s=round(now - wake, 3))
                # Silence is counted only while the daemon listened: its reader threads starved with it,
                # so beats sent during the stall may be read well after it (seen on a host at a load of
                # 10: two healthy workers fenced as hung 0.1 s after a 0.67 s stall). A real hang is
                # seen one timeout after the stall.
                self._heard_since = now
                wake = now + interval
                continue
            heard = self._heard_since
            beats = {wid: (w.state, max(w.last_heartbeat, heard) if w.last_heartbeat > 0 else 0.0)
                     for wid, w in self.cluster.workers.items()}
            expiry = self.monitor.next_expiry(beats)
            wake = now + interval if expiry is None or expiry <= now else min(now + interval, expiry + 0.001)
            quiet = self.monitor.quiet_workers(now, beats, QUIET_AFTER_INTERVALS * interval)
            self.scheduler.quiet = {p for p, route in enumerate(self.cluster.routes) if quiet.intersection(route)}
            for wid, kind in self.monitor.stale_workers(now, beats):
                self.events.emit("failure", wid, level=logging.WARNING, reason=kind,
                                 heartbeat_age_s=round(now - self.cluster.workers[wid].last_heartbeat, 3))
                self.cluster.fence(wid, kind)
            computing = {wid: (w.state, w.computing_s) for wid, w in self.cluster.workers.items()}
            for wid in self.monitor.stuck_workers(computing):
                self.events.emit("failure", wid, level=logging.WARNING, reason="step_timeout")
                self.cluster.fence(wid, "step_timeout")  # computing one step that long: a stuck device
            for step_id in self.monitor.late_steps(now, self.engine.dispatched_at()):
                self.events.emit("step_deadline", None, level=logging.WARNING, step=step_id)
                self.engine.write_off_step(step_id)
            if now - self._lag_reported_at >= 1.0:
                lag = self.engine.replica_lag()
                if lag != self._last_lag:
                    self.events.emit("replica_lag", None, level=logging.DEBUG, tokens=lag)  # streamed, not logged
                    self._last_lag = lag
                self._lag_reported_at = now

    def on_worker_failure_report(self, wid: int, kind: str, message: str) -> None:
        w = self.cluster.workers.get(wid)
        if w is not None:
            w.failure = kind
        self.events.emit("failure", wid, level=logging.WARNING, reason=kind, message=message)

    # ---------------------------------------------------------------- a worker is gone

    def on_worker_death(self, wid: int) -> None:
        w = self.cluster.workers[wid]
        failed_at = time.monotonic()
        self.counters["failures"] += 1
        self.events.emit("worker_state", wid, level=logging.WARNING, state="dead", reason=w.failure,
                         exit_code=w.handle.exitcode, device=w.handle.device)
        # replicas it kept for others are gone: those requests fall back to replay if hit again
        for (p, s), holder in self.cluster.replica_holder.items():
            if holder == wid:
                self.cluster.replica_holder[(p, s)] = None
                self.scheduler.forget_replicas(p, s)
                self.cluster.stop_replicating(self.cluster.routes[p][s], wid)
        for p, route in enumerate(self.cluster.routes):
            for s, owner in enumerate(route):
                if owner != wid or p in self.restarting:
                    continue
                self.engine.write_off_pipeline_steps(p)
                self._hold(p)  # nothing new for this route until it is repaired
                if self.config.recovery == "restart":
                    self.restarting.add(p)
                    self._spawn_task(self._released_after(p, restart_pipeline(self, p, failed_at)))
                else:
                    self._spawn_task(self._recover(p, s, failed_at))
        if self.config.recovery != "restart" and w.ready is not None and w.ready.done():
            # a worker that never came up is not replaced in a loop: its device may be broken
            device = w.handle.device
            if w.stage is None and not w.pipelines and failed_at - w.born < SPARE_STABLE_S:
                self._spare_deaths[device] = self._spare_deaths.get(device, 0) + 1
            else:
                self._spare_deaths.pop(device, None)
            self._spawn_task(self.replace_spare(device))

    def _hold(self, p: int) -> None:
        """Recovery work on pipeline p is under way: no new micro-batches or admissions. Holds
        nest; the last release re-activates the pipeline if its route is complete."""
        self._holds[p] = self._holds.get(p, 0) + 1
        self.scheduler.pause(p)

    def _release(self, p: int) -> None:
        self._holds[p] = max(0, self._holds.get(p, 0) - 1)
        if self._holds[p] == 0 and self.cluster.route_alive(p):
            self.scheduler.activate(p)
        self.engine.pump_all()

    async def _released_after(self, p: int, coro) -> None:
        try:
            await coro
        finally:
            self._release(p)

    async def _recover(self, p: int, s: int, failed_at: float) -> None:
        """Reroute at once (the pipeline serves through the buddy), then restore capacity."""
        try:
            await self.reroute(p, s, failed_at)
        finally:
            self._release(p)
        await self.restore(p, s, failed_at)

    def _spawn_task(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("recovery task failed", exc_info=task.exception())

    # ---------------------------------------------------------------- reroute through the buddy

    async def reroute(self, p: int, s: int, failed_at: float) -> None:
        cluster, sched = self.cluster, self.scheduler
        holder = cluster.replica_holder.get((p, s))
        buddy = holder if holder is not None and cluster.workers[holder].state == "healthy" else None
        if buddy is None:
            # no live copy of this stage's KV for the pipeline: its requests replay elsewhere
            moved = len(sched.running[p])
            sched.deactivate(p)
            self.counters["requests_replayed"] += moved
            self.events.emit("pipeline_down", None, level=logging.WARNING, pipeline=p, stage=s,
                             requests_replayed=moved)
            self.engine.pump_all()
            return
        route = cluster.routes[p]
        replaced, route[s] = route[s], buddy
        cluster.pools[(p, s)] = "replica"
        cluster.replica_holder[(p, s)] = None  # the buddy's copy is now the only one
        try:
            links = []
            if s > 0:
                links.append(cluster.ensure_link(route[s - 1], buddy))
            if s + 1 < len(route):
                links.append(cluster.ensure_link(buddy, route[s + 1]))
            await asyncio.gather(*links)
        except Exception as e:
            self.events.emit("reroute_failed", buddy, level=logging.ERROR, pipeline=p, stage=s, error=str(e))
            sched.deactivate(p)  # its requests replay elsewhere; the restore that follows brings it back
            self.engine.pump_all()
            return
        if cluster.workers[buddy].state != "healthy" or route[s] != buddy:
            # the buddy failed while its links opened: its own death handling took the pipeline
            # over (it found the route through the buddy and no replica left), nothing to resume
            self.events.emit("reroute_failed", buddy, level=logging.ERROR, pipeline=p, stage=s,
                             error=f"worker {buddy} failed during the reroute")
            return
        # the buddy's replica pool holds the block ids below its size: the pipeline stays below it
        sched.limit_blocks(p, self.engine.replica_blocks)
        resumed = sched.resume_after_failover(p, s)
        sched.forget_replicas(p, s)
        self._count_resumed(resumed)
        self.counters["reroutes"] += 1
        took = time.monotonic() - failed_at
        self.recovery_seconds.append(took)
        self.events.emit("reroute", buddy, pipeline=p, stage=s, route=list(route), seconds=round(took, 4),
                         replaced=replaced)

    def route_linked(self, p: int) -> bool:
        """Whether each stage of pipeline p's route has its activation link to the next. If one has
        not, it is opened (the pipeline held meanwhile, then pumped): two restores of neighbouring
        stages under way together each link their spare to the neighbour of that moment, so the two
        spares, neighbours once both switched, had no link, and every step on them failed."""
        if self._holds.get(p):
            return False  # recovery work on it links what it needs; checked again at its release
        route = self.cluster.routes[p]
        missing = [(a, b) for a, b in zip(route, route[1:]) if a != b and (a, b) not in self.cluster.act_pairs]
        if not missing:
            return True
        if p not in self.linking:
            self.linking.add(p)
            self._hold(p)
            self._spawn_task(self._link_route(p, missing))
        return False

    async def _link_route(self, p: int, missing: list[tuple[int, int]]) -> None:
        try:
            await asyncio.gather(*(self.cluster.ensure_link(a, b) for a, b in missing))
            self.events.emit("route_linked", None, pipeline=p, links=[list(pair) for pair in missing])
        except Exception as e:  # one of them died (its death is handled), or the link timed out
            self.events.emit("route_link_failed", None, level=logging.WARNING, pipeline=p, error=str(e))
            await asyncio.sleep(retry_pause_s(1))  # the next pump tries again: not in a loop
        finally:
            self.linking.discard(p)
            self._release(p)

    def _count_resumed(self, resumed: list[tuple[int, str, int]]) -> None:
        for req_id, how, recomputed in resumed:
            self.counters["requests_resumed_replica" if how == "replica" else "requests_replayed"] += 1
            self.counters["tokens_recomputed"] += recomputed
            self.events.emit("request_resumed", None, request=req_id, how=how, recomputed_tokens=recomputed)

    # ---------------------------------------------------------------- restore capacity

    async def restore(self, p: int, s: int, failed_at: float) -> None:
        """A spare hosts the stage from the host weight store, takes the KV back, and the route
        switches back. Waits for a spare if none is ready yet."""
        if (p, s) in self.restoring:
            return  # the restore already under way switches the route; it copes with this failure too
        self.restoring.add((p, s))
        try:
            await self._restore(p, s, failed_at)
        finally:
            self.restoring.discard((p, s))

    async def _restore(self, p: int, s: int, failed_at: float) -> None:
        cluster, sched = self.cluster, self.scheduler
        failures = self._rehost_failures.get((p, s), 0)
        if failures:  # the last ones failed: a failure that repeats (a broken device) must not spin
            await asyncio.sleep(retry_pause_s(failures))
        spare = cluster.take_spare()
        deadline = time.monotonic() + self.config.cluster.worker_start_timeout_s
        while spare is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            spare = cluster.take_spare()
        if spare is None:
            self.events.emit("restore_waiting", None, level=logging.WARNING, pipeline=p, stage=s)
            self._pending_restore.append((p, s, failed_at))
            return
        self.events.emit("rehost", spare, pipeline=p, stage=s, state="rehosting")
        cluster.pin(spare, p)
        held = False
        try:
            t0 = time.monotonic()
            hosted = await cluster.command(spare, self.stage_command(s, replica_pool=cluster.replication))
            t_hosted = time.monotonic()
            phases = {"host_s": round(t_hosted - t0, 3),
                      # (one clock for every process: CLOCK_MONOTONIC) until the spare began, after it ended
                      "to_spare_s": round(hosted["started_at"] - t0, 3) if "started_at" in hosted else None,
                      "from_spare_s": round(t_hosted - hosted["ended_at"], 3) if "ended_at" in hosted else None,
                      "worker_host_s": round(hosted.get("host_s", 0.0), 3) if isinstance(hosted, dict) else None,
                      "kv_prepared": hosted.get("kv_prepared") if isinstance(hosted, dict) else None}
            route = cluster.routes[p]
            links, peers = [], []  # each link to open, and the worker at its other end
            if s > 0 and cluster.workers[route[s - 1]].state == "healthy":
                links.append(cluster.ensure_link(route[s - 1], spare))
                peers.append(route[s - 1])
            if s + 1 < len(route) and cluster.workers[route[s + 1]].state == "healthy":
                links.append(cluster.ensure_link(spare, route[s + 1]))
                peers.append(route[s + 1])
            current = route[s]
            hand_back = cluster.pool(p, s) == "replica" and cluster.workers[current].state == "healthy"
            # on CPU the spare copies the KV straight out of the buddy's shared replica pool: no link
            share = cluster.workers[current].replica_share if hand_back else None
            xfer = hand_back and share is None
            if xfer:
                links.append(cluster.open_link(current, spare, "xfer"))
                peers.append(current)
            # every link the switch needs is opened while the pipeline still serves, all at once
            rewiring = asyncio.ensure_future(rewire_replicas(self, p, s, spare, current))
            try:
                opened = await asyncio.gather(*links, return_exceptions=True)
            finally:
                switch_replicas = await rewiring
            # A link whose other end died meanwhile (a neighbour killed with this stage's worker; the
            # spare was fenced for it) costs the spare nothing: the route links that stage's next worker
            # before its next step (route_linked); a dead buddy leaves no KV: the spare recomputes it.
            failed = [r for r, peer in zip(opened, peers)
                      if isinstance(r, BaseException) and cluster.workers[peer].state != "dead"]
            if xfer and isinstance(opened[-1], BaseException) and cluster.workers[current].state == "dead":
                hand_back = False
            if failed:
                raise failed[0]
            t_links = time.monotonic()
            phases["links_s"] = round(t_links - t0 - phases["host_s"], 3)
            # hand the KV back: hold the pipeline, let its in-flight steps land, copy, switch
            self._hold(p)
            held = True
            while sched.in_flight_on(p):
                await asyncio.sleep(0.002)
            phases["drain_s"] = round(time.monotonic() - t_links, 3)
            handed_back = False
            if hand_back and cluster.pool(p, s) == "replica" and cluster.workers[current].state == "healthy":
                blocks = tuple(sched.block_ids_of(p))
                try:
                    if blocks and share is not None:
                        await cluster.command(spare, m.MoveKV(cluster.next_cmd_id(), current, "map", "primary",
                                                              blocks, share=share))
                    elif blocks:
                        await asyncio.gather(
                            cluster.command(current, m.MoveKV(cluster.next_cmd_id(), spare, "send", "replica", blocks)),
                            cluster.command(spare, m.MoveKV(cluster.next_cmd_id(), current, "recv", "primary", blocks)))
                    handed_back = True
                    phases["handback_s"] = round(time.monotonic() - t_links - phases["drain_s"], 3)
                except Exception as e:
                    if cluster.workers[spare].state == "dead":
                        raise  # the spare died: the pipeline stays on the buddy's replica, the next spare comes
                    # the buddy died while handing back: the spare recomputes
                    self.events.emit("handback_failed", current, level=logging.WARNING, pipeline=p, stage=s,
                                     error=str(e))
            if cluster.workers[spare].state != "rehosting":  # never switch the route to a dead worker
                raise RuntimeError(f"worker {spare} failed before the route switched to it")
            if not handed_back:
                sched.forget_replicas(p, s)
                self._count_resumed(sched.resume_after_failover(p, s))
            sched.drop_prefix_cache(p)  # only the blocks of running requests were handed over
            switch_replicas()
            route[s] = spare
            cluster.pools.pop((p, s), None)
            if not any(cluster.pool(p, t) == "replica" for t in range(len(route))):
                sched.limit_blocks(p, None)  # every stage on a pool of its own again
            cluster.workers[spare].state = "healthy"
            cluster.workers[spare].stage = s
            cluster.workers[spare].layers = cluster.workers[current].layers if current in cluster.workers else None
            cluster.workers[spare].pipelines = {p}
            if current in cluster.workers and cluster.workers[current].state != "dead":
                cluster.workers[current].pipelines.discard(p)  # (a dead one keeps what it served, for the page)
            held = False
            self._release(p)
            self._rehost_failures.pop((p, s), None)
            self.counters["rehosts"] += 1
            self.events.emit("restore", spare, pipeline=p, stage=s, route=list(route),
                             rehost_s=round(time.monotonic() - t0, 4),
                             since_failure_s=round(time.monotonic() - failed_at, 4), **phases)
            self._spawn_task(self.pair_replicas())
        except Exception as e:
            self.events.emit("rehost_failed", spare, level=logging.ERROR, pipeline=p, stage=s, error=str(e))
            cluster.fence(spare, "rehost_failed")
            self._rehost_failures[(p, s)] = failures + 1
            if held:
                self._release(p)
            self._pending_restore.append((p, s, failed_at))  # the next spare tries again
            self._spawn_task(self.take_pending_restores())  # (one may stand by already)
        self.engine.pump_all()

    async def pair_replicas(self) -> None:
        await pair_replicas(self)

    async def replace_spare(self, device: str) -> None:
        """The dead worker's device gets a new spare (a virtual CPU device is usable at once). A
        spare that dies before it is ready (killed, out of memory) is tried again after a pause
        that doubles each time; after SPARE_ATTEMPTS in a row the device is given up as broken."""
        deaths = self._spare_deaths.get(device, 0)
        if deaths:
            log.warning("the last %d spare(s) on %s died soon after they were spawned: the next one in %.1f s",
                        deaths, device, retry_pause_s(deaths))
            await asyncio.sleep(retry_pause_s(deaths))
        for attempt in range(SPARE_ATTEMPTS):
            wid = self.cluster.spawn_worker(device)
            try:
                await self.cluster.wait_ready(wid)
                break
            except Exception as e:
                self.cluster.fence(wid, "start_failed")
                last = attempt + 1 == SPARE_ATTEMPTS
                pause = retry_pause_s(attempt + 1)
                self.events.emit("spare_failed", wid, level=logging.ERROR, error=str(e), device=device,
                                 attempt=attempt + 1, retry_in_s=None if last else pause)
                if last:
                    return
                await asyncio.sleep(pause)
        if self.cluster.workers[wid].state == "starting":
            self.cluster.workers[wid].state = "spare"
            self.events.emit("worker_state", wid, state="spare", device=device)
            self.cluster.prepare_spare(wid)
        await self.take_pending_restores()

    async def take_pending_restores(self) -> None:
        """Stages waiting for a spare get one while any stands by: not only when a new spare comes up
        (the one replacing a spare that died restoring a stage can be ready before that restore has
        failed and queued the stage again, which then waited for some later failure)."""
        cluster = self.cluster
        while self._pending_restore and any(w.state == "spare" for w in cluster.workers.values()):
            p, s, failed_at = self._pending_restore.pop(0)
            if cluster.workers[cluster.routes[p][s]].state != "healthy" or cluster.pool(p, s) != "primary":
                await self.restore(p, s, failed_at)

    @property
    def busy(self) -> bool:
        """A reroute, restore, restart or replacement spare is under way: capacity may come back."""
        return bool(self._tasks)

    def cancel(self) -> None:
        """Shutdown: recovery in progress stops here (the weight store is about to close)."""
        for task in list(self._tasks):
            task.cancel()

    def snapshot(self) -> dict:
        return dict(self.counters, recovery_seconds=[round(x, 4) for x in self.recovery_seconds[-20:]])
