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
from kevlard.api_types import (EngineDeadError, NoRouteError, QueueFullError, SamplingParams,
                               ShuttingDownError, TokenDelta)
from kevlard.cluster import Cluster
from kevlard.scheduler.request import Request
from kevlard.scheduler.scheduler import Scheduler, StepPlan

log = logging.getLogger("kevlard.engine")


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
                                   sc.max_running, sc.max_waiting)
        self._streams: dict[int, asyncio.Queue] = {}
        self._ids = itertools.count(1)
        self._dispatched: dict[int, tuple[StepPlan, float]] = {}  # step_id -> (plan, sent_at)
        self._last_step_done = time.monotonic()
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
        if not any(self.scheduler.active):
            raise NoRouteError("no complete pipeline route is available")
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
        log.debug("request %s admitted as %d (%d prompt tokens)", request_id, rid, len(prompt_token_ids))
        self._pump_all()
        finished = False
        try:
            while True:
                delta = await queue.get()
                while not isinstance(delta, BaseException) and delta.finish_reason is None and not queue.empty():
                    more = queue.get_nowait()
                    delta = more if isinstance(more, BaseException) else \
                        TokenDelta(delta.token_ids + more.token_ids, more.finish_reason)
                if isinstance(delta, BaseException):
                    raise delta
                finished = delta.finish_reason is not None
                yield delta
                if finished:
                    return
        finally:
            self._streams.pop(rid, None)
            if not finished:
                self.scheduler.abort(rid)
                self._pump_all()

    def is_ready(self) -> bool:
        if self._dead_reason or self._shutting_down or not any(self.scheduler.active):
            return False
        # steps progress: either nothing is pending, or a step finished recently
        busy = bool(self._dispatched)
        return not busy or time.monotonic() - self._last_step_done < self.config.scheduler.step_timeout_s

    def snapshot(self) -> dict:
        snap = self.cluster.snapshot()
        snap.update({
            "model": self.model_name,
            "num_running": self.scheduler.num_running(),
            "num_waiting": self.scheduler.num_waiting(),
            "kv_usage": round(self.scheduler.kv_usage(), 4),
            "stats": dict(self.stats),
            "ready": self.is_ready(),
        })
        return snap

    # ---------------------------------------------------------------- stepping

    def _pump_all(self) -> None:
        for p in range(self.scheduler.num_pipelines):
            self._pump(p)

    def _pump(self, pipeline: int) -> None:
        in_flight = sum(1 for plan, _ in self._dispatched.values() if plan.pipeline == pipeline)
        while in_flight < self.microbatches:
            plan = self.scheduler.schedule(pipeline)
            if plan is None:
                return
            self._dispatch(plan)
            in_flight += 1

    def _dispatch(self, plan: StepPlan) -> None:
        route = self.cluster.routes[plan.pipeline]
        self._dispatched[plan.step_id] = (plan, time.monotonic())
        rest = tuple(m.SeqChunk(c.req_id, c.start, c.num_tokens, c.block_table, (), c.sample, c.temperature,
                                c.top_p, c.top_k, c.seed, c.output_index) for c in plan.chunks)
        for s, wid in enumerate(route):
            chunks = tuple(plan.chunks) if s == 0 else rest
            step = m.Step(plan.step_id, plan.pipeline, chunks, route[s - 1] if s > 0 else None,
                          route[s + 1] if s + 1 < len(route) else None)
            if not self.cluster.workers[wid].handle.send(step):
                self._step_failed(plan.step_id, f"worker {wid} unreachable")
                return

    def _on_worker_message(self, wid: int, msg: object) -> None:
        if isinstance(msg, m.StepDone):
            route = self.cluster.routes
            entry = self._dispatched.get(msg.step_id)
            if entry is None or wid != route[entry[0].pipeline][-1]:
                return  # an intermediate stage, or a step already written off
            plan, _ = self._dispatched.pop(msg.step_id)
            self._last_step_done = time.monotonic()
            self.stats["steps"] += 1
            updates = self.scheduler.update_from_output(msg.step_id, dict(msg.sampled))
            for u in updates:
                self.stats["tokens_generated"] += len(u.new_token_ids)
                if u.finish_reason is not None:
                    self.stats["requests_finished"] += 1
                q = self._streams.get(u.req_id)
                if q is not None:
                    q.put_nowait(TokenDelta(list(u.new_token_ids), u.finish_reason))
            self._pump(plan.pipeline)
        elif isinstance(msg, m.StepFailed):
            log.warning("worker %d failed step %d: %s", wid, msg.step_id, msg.error.splitlines()[0])
            self._step_failed(msg.step_id, msg.error)
        elif isinstance(msg, m.WorkerFailure):
            log.error("worker %d reports %s: %s", wid, msg.kind, msg.message)

    def _step_failed(self, step_id: int, why: str) -> None:
        entry = self._dispatched.pop(step_id, None)
        if entry is None:
            return
        self.stats["steps_failed"] += 1
        self.scheduler.fail_step(step_id)
        self.loop_call_soon(self._pump, entry[0].pipeline)

    def loop_call_soon(self, fn, *args) -> None:
        asyncio.get_running_loop().call_soon(fn, *args)

    def _on_worker_death(self, wid: int) -> None:
        w = self.cluster.workers[wid]
        log.error("worker %d (pid %s) died with exit code %s", wid, w.handle.pid, w.handle.exitcode)
        for p, route in enumerate(self.cluster.routes):
            if wid in route and self.scheduler.active[p]:
                self._take_pipeline_down(p)
        if not any(self.scheduler.active):
            log.error("no complete route is left")
        self._pump_all()

    def _take_pipeline_down(self, pipeline: int) -> None:
        """Until failover lands (issue 3): replay the pipeline's requests on the others."""
        for step_id, (plan, _) in list(self._dispatched.items()):
            if plan.pipeline == pipeline:
                self._dispatched.pop(step_id)
                self.scheduler.fail_step(step_id)
        self.scheduler.deactivate(pipeline)
        log.warning("pipeline %d is down; its requests are replayed on the remaining pipelines", pipeline)

    # ---------------------------------------------------------------- shutdown

    async def drain(self, timeout_s: float) -> None:
        """Stop taking requests; wait up to timeout_s for the accepted ones to finish."""
        self._shutting_down = True
        deadline = time.monotonic() + timeout_s
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for rid, q in list(self._streams.items()):
            q.put_nowait(ShuttingDownError("the server shut down before the request finished"))
