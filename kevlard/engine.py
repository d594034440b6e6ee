"""The engine: takes requests from the web layer, drives the scheduler, sends step plans to the
workers of each route and streams sampled tokens back. Runs on the daemon's event loop."""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import time
from typing import AsyncIterator

from kevlard import messages as m
from kevlard.api_types import (EngineDeadError, NoRouteError, QueueFullError, RequestFailedError, SamplingError,
                               SamplingParams, ShuttingDownError, StopRequested, TokenDelta)
from kevlard.cluster import Cluster
from kevlard.events import EventLog
from kevlard.scheduler.request import Request
from kevlard.scheduler.scheduler import Scheduler, StepPlan

log = logging.getLogger("kevlard.engine")
OWN_STEP_FAILURE_LIMIT = 3  # steps a live worker may fail by itself in a row before it is fenced


def default_microbatches(topo) -> int:
    """One per stage keeps every stage of a pipeline busy when each worker has its own device.
    Virtual CPU devices share the cores: once the pipelines alone fill them, more micro-batches
    only shrink the batches (measured: 125 vs 86 tokens/s with 1 vs 2 on 2 cores, 2x2)."""
    if topo.kind != "cpu":
        return topo.stages
    cores = os.cpu_count() or 1
    return max(1, min(topo.stages, cores // topo.pipelines))


class KevlarEngine:
    def __init__(self, config, source, tokenizer, cluster: Cluster, num_blocks: int, max_model_len: int):
        self.config = config
        self.model_name = source.name
        self.tokenizer = tokenizer
        self.eos_token_ids = tuple(source.eos_token_ids)
        self.max_model_len = max_model_len
        self.cluster = cluster
        sc = config.scheduler
        topo = cluster.topology
        self.microbatches = sc.microbatches or default_microbatches(topo)
        self.scheduler = Scheduler(topo.pipelines, num_blocks, config.kv.block_size, sc.max_batch_tokens,
                                   sc.max_running, sc.max_waiting, config.kv.prefix_caching,
                                   topo.stages if cluster.replication else 0)
        self._streams: dict[int, asyncio.Queue] = {}
        self._ids = itertools.count(1)
        self._dispatched: dict[int, tuple[StepPlan, float, int]] = {}  # step_id -> (plan, sent_at, last worker)
        self.events = EventLog()
        self.recovery = None  # kevlard.recovery.Recovery, attached by the daemon
        self.replica_blocks = num_blocks  # the size of a buddy's replica pool, set by the daemon
        self.metrics = None  # kevlard.metrics.Metrics, attached by the daemon
        self._background: list[asyncio.Task] = []
        self._last_step_done = time.monotonic()
        self._own_failures: dict[int, int] = {}  # worker -> steps it failed itself, in a row
        self._shutting_down = False
        self._dead_reason: str | None = None
        self.stats = {"requests_finished": 0, "tokens_generated": 0, "steps": 0, "steps_failed": 0}
        cluster.on_message = self._on_worker_message
        cluster.on_death = self._on_worker_death

    # ---------------------------------------------------------------- the web layer's side

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[TokenDelta]:
        if self._shutting_down:
            raise ShuttingDownError("the server is shutting down")
        if self._dead_reason:
            raise EngineDeadError(self._dead_reason)
        if not self.scheduler.can_add():
            raise QueueFullError(f"the waiting queue is full ({self.scheduler.max_waiting} requests)")
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids.update(self.eos_token_ids)
        seed = params.seed if params.seed is not None else random.getrandbits(62)
        rid = next(self._ids)
        req = Request(id=rid, prompt_token_ids=list(prompt_token_ids), max_tokens=params.max_tokens,
                      temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                      seed=seed, stop_token_ids=frozenset(stop_ids), max_model_len=self.max_model_len,
                      arrival=time.monotonic())
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = queue
        self.scheduler.add(req)
        tracked = self.metrics.track(req.arrival, len(req.prompt_token_ids)) if self.metrics else None
        log.debug("request %s admitted as %d (%d prompt tokens)", request_id, rid, len(prompt_token_ids))
        self._pump_all()
        finished = False
        try:
            while True:
                delta = await queue.get()
                while not isinstance(delta, BaseException) and delta.finish_reason is None and not queue.empty():
                    more = queue.get_nowait()
                    delta = more if isinstance(more, BaseException) else \
                        TokenDelta(delta.token_ids + more.token_ids, more.finish_reason,
                                   delta.num_cached_tokens if delta.num_cached_tokens is not None
                                   else more.num_cached_tokens)
                if isinstance(delta, BaseException):
                    raise delta
                finished = delta.finish_reason is not None
                if tracked is not None:
                    tracked.tokens(len(delta.token_ids), delta.finish_reason, delta.num_cached_tokens)
                try:
                    yield delta
                except StopRequested:  # a stop string: finished, though the scheduler still ends it below
                    if tracked is not None:
                        tracked.tokens(0, "stop")
                    if not finished:  # (a last token already counted it)
                        self.stats["requests_finished"] += 1
                    return
                if finished:
                    return
        finally:
            if tracked is not None:
                tracked.close()
            self._streams.pop(rid, None)
            if not finished:
                self.scheduler.abort(rid)
                self._pump_all()

    def is_ready(self) -> bool:
        if self._dead_reason or self._shutting_down:
            return False
        if not any(self.cluster.route_alive(p) for p in range(self.scheduler.num_pipelines)):
            return False
        # steps progress: either nothing is pending, or a step finished recently
        busy = bool(self._dispatched)
        return not busy or time.monotonic() - self._last_step_done < self.config.scheduler.step_timeout_s

    def snapshot(self) -> dict:
        snap = self.cluster.snapshot()
        for pl in snap["pipelines"]:  # a worker of it missed heartbeats: new requests go elsewhere
            p = pl["id"]
            pl["quiet"] = p in self.scheduler.quiet
            # each pipeline's own (the page's worker cards show their pipelines', not the daemon's)
            pl["num_running"] = len(self.scheduler.running[p])
            pl["kv_usage"] = round(self.scheduler.blocks[p].usage, 4)
            pl["replica_lag_tokens"] = self.replica_lag(p)
        snap.update({
            "model": self.model_name,
            "num_running": self.scheduler.num_running(),
            "num_waiting": self.scheduler.num_waiting(),
            "kv_usage": round(self.scheduler.kv_usage(), 4),
            "stats": dict(self.stats, preemptions=self.scheduler.num_preemptions),
            "ready": self.is_ready(),
            "recovery": self.recovery.snapshot() if self.recovery else {},
            "replica_lag_tokens": self.replica_lag(),
        })
        return snap

    def replica_lag(self, pipeline: int | None = None) -> int:
        """Tokens computed but not yet replicated, summed over running requests and stages (of one
        pipeline, or of all)."""
        if not self.cluster.replication:
            return 0
        lag = 0
        for p, running in enumerate(self.scheduler.running):
            if pipeline is not None and p != pipeline:
                continue
            for s in range(len(self.cluster.routes[p])):
                if self.cluster.replica_holder.get((p, s)) is None:
                    continue
                lag += sum(max(0, r.num_computed_tokens - r.replicated.get(s, 0)) for r in running)
        return lag

    # ---------------------------------------------------------------- faults

    def inject_fault(self, worker: int, kind: str, duration_s: float | None = None) -> dict:
        if kind not in m.FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}: {', '.join(m.FAULT_KINDS)}")
        if duration_s is not None and not duration_s > 0:
            raise ValueError(f"duration_s must be > 0, got {duration_s!r}")
        w = self.cluster.workers.get(worker)
        if w is None:
            raise KeyError(worker)
        if w.state == "dead":
            raise ValueError(f"worker {worker} is already dead")
        self.events.emit("fault_injected", worker, level=logging.WARNING, fault=kind, duration_s=duration_s)
        if kind == "kill":
            w.failure = "kill"
            w.handle.kill()
        elif kind == "hang" and w.state != "starting" and w.handle.signal_main_thread(m.HANG_SIGNAL):
            # (a starting worker may not have its handler yet: it gets the message instead)
            if duration_s:
                asyncio.get_running_loop().call_later(duration_s, w.handle.signal_main_thread, m.RELEASE_SIGNAL)
        else:
            w.handle.send(m.InjectFault(kind, duration_s))
        return {"pid": w.handle.pid, "state": w.state}

    # ---------------------------------------------------------------- background watches

    def start_background(self) -> None:
        loop = asyncio.get_running_loop()
        self._background.append(loop.create_task(self._no_route_watch()))
        if self.recovery is not None:
            self._background.append(loop.create_task(self.recovery.watch()))

    async def _no_route_watch(self) -> None:
        """Requests wait while no route exists, up to scheduler.no_route_wait_s, then get a
        retryable 503 instead of waiting forever."""
        limit = self.config.scheduler.no_route_wait_s
        no_route_since = None
        while True:
            await asyncio.sleep(0.1)
            if any(self.cluster.route_alive(p) for p in range(self.scheduler.num_pipelines)):
                no_route_since = None
                continue
            now = time.monotonic()
            no_route_since = no_route_since or now
            for req in list(self.scheduler.waiting):
                if now - max(req.arrival, no_route_since) > limit:
                    q = self._streams.get(req.id)
                    self.scheduler.abort(req.id)
                    if q is not None:
                        q.put_nowait(NoRouteError(f"no complete pipeline route for {limit:.0f} s"))

    # ---------------------------------------------------------------- stepping

    def pump_all(self) -> None:
        self._pump_all()

    def dispatched_at(self) -> dict[int, float]:
        return {step_id: sent for step_id, (_, sent, _) in self._dispatched.items()}

    def write_off_step(self, step_id: int) -> None:
        """A micro-batch that will never come back: its requests run those tokens again."""
        entry = self._dispatched.pop(step_id, None)
        if entry is not None:
            self.stats["steps_failed"] += 1
            self._give_up_on_repeated_failures(self.scheduler.fail_step(step_id))
            asyncio.get_running_loop().call_soon(self._pump, entry[0].pipeline)

    MAX_FAILED_STEPS = 20

    def _give_up_on_repeated_failures(self, req_ids: list[int]) -> None:
        """A request whose micro-batches keep failing on a live route ends with a retryable
        error instead of being retried forever."""
        for rid in req_ids:
            req = self.scheduler.requests.get(rid)
            if req is None or req.failed_steps < self.MAX_FAILED_STEPS:
                continue
            self.events.emit("request_failed", None, level=logging.ERROR, request=rid,
                             failed_steps=req.failed_steps)
            self.scheduler.abort(rid)
            q = self._streams.get(rid)
            if q is not None:
                q.put_nowait(RequestFailedError(f"the request failed {req.failed_steps} times in a row; retry it"))

    def write_off_pipeline_steps(self, pipeline: int) -> None:
        for step_id, (plan, _, _) in list(self._dispatched.items()):
            if plan.pipeline == pipeline:
                self._dispatched.pop(step_id)
                self.stats["steps_failed"] += 1
                self.scheduler.fail_step(step_id)

    def _pump_all(self) -> None:
        for p in range(self.scheduler.num_pipelines):
            self._pump(p)

    def _pump(self, pipeline: int) -> None:
        self._pump_route(pipeline)
        # A schedule admits waiting requests to whichever pipeline has room, not only its own: one
        # that had nothing in flight would hold them until some other event pumped it (a request
        # once sat there, all else idle, until the next request arrived).
        while self.scheduler.admitted:
            self._pump_route(self.scheduler.admitted.pop())

    def _pump_route(self, pipeline: int) -> None:
        if not self.cluster.route_alive(pipeline):
            return  # a worker of the route is gone: recovery reroutes first
        if self.recovery is not None and not self.recovery.route_linked(pipeline):
            return  # a link between two of its stages is missing: recovery opens it first
        in_flight = sum(1 for plan, _, _ in self._dispatched.values() if plan.pipeline == pipeline)
        while in_flight < self.microbatches:
            plan = self.scheduler.schedule(pipeline)
            if plan is None:
                return
            self._dispatch(plan)
            in_flight += 1

    def _dispatch(self, plan: StepPlan) -> None:
        route = self.cluster.routes[plan.pipeline]
        self._dispatched[plan.step_id] = (plan, time.monotonic(), route[-1])
        rest = tuple(m.SeqChunk(c.req_id, c.start, c.num_tokens, c.block_table, (), c.sample, c.temperature,
                                c.top_p, c.top_k, c.seed, c.output_index, c.epoch) for c in plan.chunks)
        for s, wid in enumerate(route):
            chunks = tuple(plan.chunks) if s == 0 else rest
            pool = self.cluster.pool(plan.pipeline, s)
            replicate = pool == "primary" and self.cluster.replica_holder.get((plan.pipeline, s)) is not None
            step = m.Step(plan.step_id, plan.pipeline, chunks, route[s - 1] if s > 0 else None,
                          route[s + 1] if s + 1 < len(route) else None, pool, replicate)
            if not self.cluster.workers[wid].handle.send(step):
                self._step_failed(plan.step_id, f"worker {wid} unreachable")
                return

    def _on_worker_message(self, wid: int, msg: object) -> None:
        if isinstance(msg, m.StepDone):
            self._own_failures.pop(wid, None)
            entry = self._dispatched.get(msg.step_id)
            if entry is None or wid != entry[2]:
                return  # an intermediate stage, or a step already written off
            plan, _, _ = self._dispatched.pop(msg.step_id)
            self._last_step_done = time.monotonic()
            self.stats["steps"] += 1
            updates = self.scheduler.update_from_output(msg.step_id, dict(msg.sampled))
            for u in updates:
                self.stats["tokens_generated"] += len(u.new_token_ids)
                if u.finish_reason is not None:
                    self.stats["requests_finished"] += 1
                q = self._streams.get(u.req_id)
                if u.finish_reason == "error":
                    self.events.emit("request_failed", None, level=logging.ERROR, request=u.req_id, reason="sampling")
                    if q is not None:
                        q.put_nowait(SamplingError("sampling the next token failed for this request "
                                                   "(the worker's log says why)"))
                elif q is not None:
                    q.put_nowait(TokenDelta(list(u.new_token_ids), u.finish_reason, u.num_cached_tokens))
            self._pump(plan.pipeline)
        elif isinstance(msg, m.StepFailed):
            log.warning("worker %d failed step %d: %s", wid, msg.step_id, msg.error.splitlines()[0])
            self._step_failed(msg.step_id, msg.error)
            self._count_own_failure(wid, msg)
        elif isinstance(msg, m.ReplicaAck):
            p, s = msg.pipeline, msg.stage
            # from the holder, or from the source that wrote into the holder's mapped pool; either
            # way it counts only while that holder is still the one keeping this stage's replica
            if (wid in (msg.source, msg.holder) and self.cluster.routes[p][s] == msg.source
                    and self.cluster.pool(p, s) == "primary" and self.cluster.replica_holder.get((p, s)) == msg.holder):
                self.scheduler.on_replica_ack(p, s, msg.upto)
        elif isinstance(msg, m.WorkerFailure):
            if self.recovery is not None:
                self.recovery.on_worker_failure_report(wid, msg.kind, msg.message)
            else:
                log.error("worker %d reports %s: %s", wid, msg.kind, msg.message)

    def _count_own_failure(self, wid: int, msg: m.StepFailed) -> None:
        """A worker that is alive and heartbeating but fails every step it runs itself (a corrupted
        state, a broken device it does not report) is fenced like a dead one: the route moves off
        it. Failures caused by a link or a neighbour do not count against it."""
        if not msg.own:
            return
        self._own_failures[wid] = self._own_failures.get(wid, 0) + 1
        if self._own_failures[wid] >= OWN_STEP_FAILURE_LIMIT:
            self._own_failures.pop(wid)
            log.error("worker %d failed %d steps in a row itself: fencing it", wid, OWN_STEP_FAILURE_LIMIT)
            if self.recovery is not None:
                self.recovery.on_worker_failure_report(wid, "step_errors", msg.error.splitlines()[0])
            self.cluster.fence(wid, "step_errors")

    def _step_failed(self, step_id: int, why: str) -> None:
        entry = self._dispatched.get(step_id)
        if entry is None:
            return
        # A link error usually means a neighbour died: its death handler reroutes and writes the
        # step off. Give the sentinel a moment to say so before simply rerunning the step.
        asyncio.get_running_loop().call_later(0.05, self.write_off_step, step_id)

    def _on_worker_death(self, wid: int) -> None:
        if self.recovery is not None:
            self.recovery.on_worker_death(wid)
        else:
            for p, route in enumerate(self.cluster.routes):
                if wid in route and self.scheduler.active[p]:
                    self.write_off_pipeline_steps(p)
                    self.scheduler.deactivate(p)
        if not any(self.cluster.route_alive(p) for p in range(self.scheduler.num_pipelines)):
            self.events.emit("no_route", None, level=logging.ERROR)
        self._pump_all()

    # ---------------------------------------------------------------- shutdown

    def begin_shutdown(self) -> None:
        """No new requests; those in flight go on (the HTTP server drains them)."""
        self._shutting_down = True

    async def drain(self, timeout_s: float) -> None:
        """Stop taking requests; wait up to timeout_s for the accepted ones to finish."""
        self._shutting_down = True
        self.cluster.stopping = True  # workers exiting from now on are not failures
        for task in self._background:
            task.cancel()
        if self.recovery is not None:
            self.recovery.cancel()
        deadline = time.monotonic() + timeout_s
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for rid, q in list(self._streams.items()):
            q.put_nowait(ShuttingDownError("the server shut down before the request finished"))
