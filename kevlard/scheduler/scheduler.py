"""The scheduler: a pure state machine over requests, pipelines and KV blocks.

`schedule(pipeline)` returns the next micro-batch for a pipeline (a `StepPlan`), and
`update_from_output(step_id, sampled)` takes its sampled tokens back. Continuous batching under a
token budget: decodes first, then prefill chunks; admission by free KV blocks; preemption by
recompute when blocks run out; prefix caching of full blocks (see block_manager.py). No torch
here: it is tested with plain integers.
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

from kevlard.messages import SeqChunk
from kevlard.scheduler.block_manager import BlockManager
from kevlard.scheduler.request import Request, Status


@dataclass
class StepPlan:
    step_id: int
    pipeline: int
    chunks: list[SeqChunk]

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


@dataclass
class RequestUpdate:
    req_id: int
    new_token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    num_cached_tokens: int | None = None  # with the first token: prompt tokens served from the cache


class Scheduler:
    def __init__(self, num_pipelines: int, num_blocks: int, block_size: int, max_batch_tokens: int,
                 max_running: int, max_waiting: int, prefix_caching: bool = True,
                 replicated_stages: int = 0):
        """`replicated_stages`: with KV replication, the number of stages per pipeline; a block is
        then shared only once every stage's buddy holds it, so a request that starts from shared
        blocks has a replica of them from its first step."""
        self.block_size = block_size
        self.max_batch_tokens = max_batch_tokens
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.replicated_stages = replicated_stages
        self.blocks = [BlockManager(num_blocks, block_size, prefix_caching) for _ in range(num_pipelines)]
        # per pipeline, the stages whose replica holds every published block of the pipeline
        self._cache_replicated = [set(range(replicated_stages)) for _ in range(num_pipelines)]
        self.active = [True] * num_pipelines  # a pipeline without a complete route takes no requests
        # pipelines with a worker that has missed a few heartbeats (perhaps hung, not judged yet):
        # new requests go to the others while they have room
        self.quiet: set[int] = set()
        self.admitted: set[int] = set()  # pipelines a request was admitted to since the engine last looked
        self.requests: dict[int, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[list[Request]] = [[] for _ in range(num_pipelines)]
        self.in_flight: dict[int, StepPlan] = {}
        self._step_ids = itertools.count(1)
        self.num_preemptions = 0

    # ---------------------------------------------------------------- requests in and out

    @property
    def num_pipelines(self) -> int:
        return len(self.blocks)

    def can_add(self) -> bool:
        """Whether a new request has a place. The waiting requests that fit a pipeline now are
        admitted first: only requests that cannot run yet count against `max_waiting` (otherwise
        a burst arriving while every pipeline has a step in flight met a full queue on an idle
        server: admission happens when a pipeline plans its next step)."""
        self._admit()
        return len(self.waiting) < self.max_waiting

    def add(self, req: Request) -> None:
        if not self.can_add():
            raise OverflowError("waiting queue is full")
        self.requests[req.id] = req
        self.waiting.append(req)
        self._admit()

    def abort(self, req_id: int) -> None:
        req = self.requests.get(req_id)
        if req is not None and not req.is_finished:
            self._finish(req, "abort")

    def _finish(self, req: Request, reason: str) -> None:
        req.status = Status.FINISHED
        req.finish_reason = reason
        if req.pipeline is not None:
            self.blocks[req.pipeline].free(req)
            self.running[req.pipeline].remove(req)
        else:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        del self.requests[req.id]

    def _preempt(self, req: Request) -> None:
        """Free the request's blocks; it recomputes prompt + output so far when it runs again."""
        self.blocks[req.pipeline].free(req)
        self.running[req.pipeline].remove(req)
        req.pipeline = None
        req.status = Status.WAITING
        req.num_computed_tokens = 0
        req.in_flight = False
        req.step_id = None
        req.replicated.clear()
        req.num_preemptions += 1
        self.num_preemptions += 1
        # back in arrival order, ahead of later arrivals
        pos = next((i for i, w in enumerate(self.waiting) if w.arrival > req.arrival), len(self.waiting))
        self.waiting.insert(pos, req)

    # ---------------------------------------------------------------- admission

    def _admit(self) -> None:
        while self.waiting:
            req = self.waiting[0]
            hits = {p: self.blocks[p].match_prefix(req) for p in range(self.num_pipelines) if self.active[p]}
            choices = [p for p in hits if len(self.running[p]) < self.max_running
                       and self.blocks[p].can_admit(req, hits[p], req.num_tokens + 1)]
            if not choices:
                return
            p = min(choices, key=lambda q: (q in self.quiet, len(self.running[q]), -len(hits[q]),
                                            -self.blocks[q].num_free_blocks))
            self.waiting.popleft()
            self.blocks[p].attach(req, hits[p])
            self.blocks[p].allocate(req, req.num_tokens + 1)  # the whole prompt and the first output
            cached = len(hits[p]) * self.block_size
            req.num_computed_tokens = cached
            req.num_cached_tokens = cached
            if self.replicated_stages:
                req.replicated = {s: cached for s in self._cache_replicated[p]}
            req.pipeline = p
            req.status = Status.RUNNING
            self.running[p].append(req)
            self.admitted.add(p)

    # ---------------------------------------------------------------- one micro-batch

    def schedule(self, pipeline: int) -> StepPlan | None:
        if not self.active[pipeline]:
            return None
        self._admit()
        blocks = self.blocks[pipeline]
        budget = self.max_batch_tokens
        chunks: list[SeqChunk] = []
        picked: list[Request] = []
        ready = [r for r in self.running[pipeline] if not r.in_flight]
        decodes = [r for r in ready if r.num_uncomputed_tokens == 1]
        prefills = [r for r in ready if r.num_uncomputed_tokens > 1]
        for req in decodes + prefills:
            if budget <= 0:
                break
            if req.status is not Status.RUNNING or req.pipeline != pipeline:
                continue  # preempted while this plan was being built
            n = min(req.num_uncomputed_tokens, budget)
            end = req.num_computed_tokens + n
            while not blocks.can_allocate(req, end):
                victim = self._victim(pipeline, exclude=req)
                if victim is None:
                    break
                self._preempt(victim)
            if not blocks.can_allocate(req, end):
                if -(-end // self.block_size) > blocks.limit:
                    # it can never fit the replica pool this pipeline is served from now: it
                    # starts again where it fits (another pipeline, or this one once restored)
                    self._preempt(req)
                continue
            blocks.allocate(req, end)
            sample = end == req.num_tokens
            chunks.append(SeqChunk(
                req_id=req.id, start=req.num_computed_tokens, num_tokens=n, block_table=tuple(req.block_ids),
                token_ids=tuple(req.token_ids(req.num_computed_tokens, end)), sample=sample,
                temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed,
                output_index=len(req.output_token_ids), epoch=req.num_preemptions))
            req.in_flight = True
            picked.append(req)
            budget -= n
        if not chunks:
            return None
        plan = StepPlan(next(self._step_ids), pipeline, chunks)
        for req in picked:
            req.step_id = plan.step_id
        self.in_flight[plan.step_id] = plan
        return plan

    def _victim(self, pipeline: int, exclude: Request) -> Request | None:
        """The latest arrival on the pipeline that is not in flight: it loses the least work."""
        candidates = [r for r in self.running[pipeline] if r is not exclude and not r.in_flight]
        if not candidates:
            return None
        latest = max(candidates, key=lambda r: r.arrival)
        return latest if latest.arrival >= exclude.arrival else None

    def update_from_output(self, step_id: int, sampled: dict[int, int]) -> list[RequestUpdate]:
        plan = self.in_flight.pop(step_id, None)
        if plan is None:
            return []  # written off already
        updates = []
        for c in plan.chunks:
            req = self.requests.get(c.req_id)
            if req is None or req.is_finished or req.step_id != step_id:
                continue  # aborted while in flight, or rescheduled since (after a failover)
            req.in_flight = False
            req.step_id = None
            req.failed_steps = 0
            req.num_computed_tokens = c.start + c.num_tokens
            self._publish(req)
            if not c.sample:
                continue
            token = sampled[c.req_id]
            if token < 0:  # its sampling raised on the worker: it ends alone, with an error
                updates.append(RequestUpdate(req.id, [], "error", None))
                self._finish(req, "error")
                continue
            req.output_token_ids.append(token)
            reason = req.finish_reason_after(token)
            first = len(req.output_token_ids) == 1
            updates.append(RequestUpdate(req.id, [token], reason, req.num_cached_tokens if first else None))
            if reason is not None:
                self._finish(req, reason)
        return updates

    def fail_step(self, step_id: int) -> list[int]:
        """A micro-batch was lost: its requests run the same tokens again. Returns their ids."""
        plan = self.in_flight.pop(step_id, None)
        if plan is None:
            return []
        ids = []
        for c in plan.chunks:
            req = self.requests.get(c.req_id)
            if req is not None and not req.is_finished and req.step_id == step_id:
                req.in_flight = False
                req.step_id = None
                req.failed_steps += 1
                ids.append(req.id)
        return ids

    def deactivate(self, pipeline: int) -> None:
        """The pipeline lost its route: its requests go back to waiting and recompute elsewhere."""
        self.active[pipeline] = False
        self.drop_prefix_cache(pipeline)
        for req in list(self.running[pipeline]):
            req.in_flight = False
            self._preempt(req)

    def activate(self, pipeline: int) -> None:
        self.active[pipeline] = True

    def pause(self, pipeline: int) -> None:
        """No new micro-batches or admissions on the pipeline; its requests keep their blocks."""
        self.active[pipeline] = False

    def on_replica_ack(self, pipeline: int, stage: int, spans: tuple[tuple[int, int, int, int], ...]) -> None:
        """(req_id, epoch, start, end): the holder stored tokens [start, end). The watermark only grows
        over contiguous spans: a holder that joined late has a gap, and claims nothing. A span of an
        earlier admission of the request (shipped after it was preempted: the KV of blocks it no
        longer has) claims nothing either."""
        for req_id, epoch, start, end in spans:
            req = self.requests.get(req_id)
            if req is None or req.pipeline != pipeline or epoch != req.num_preemptions:
                continue
            mark = req.replicated.get(stage, 0)
            if start <= mark:
                req.replicated[stage] = max(mark, end)  # resume never goes past num_computed_tokens
                self._publish(req)

    def _publish(self, req: Request) -> None:
        """Share the request's full blocks whose KV is complete and, with replication, held by
        every stage's buddy. Either may come first: a source ships (and acks) what a step wrote
        before the step's result reaches the daemon."""
        upto = req.num_computed_tokens
        if self.replicated_stages:
            upto = min(upto, min(req.replicated.get(s, 0) for s in range(self.replicated_stages)))
        self.blocks[req.pipeline].publish(req, upto)

    def forget_replicas(self, pipeline: int, stage: int) -> None:
        """The replica of (pipeline, stage) is gone (its holder died, or it became the only copy).
        Published blocks stay readable where they are, but no longer have a replica there: a
        request that shares them claims no replica of them at that stage."""
        self._cache_replicated[pipeline].discard(stage)
        for req in self.running[pipeline]:
            req.replicated.pop(stage, None)

    def new_replica_holder(self, pipeline: int, stage: int) -> None:
        """A new holder keeps the replica of (pipeline, stage) from now on. It holds nothing yet
        (the source backfills what the running requests wrote), nor the cached blocks no running
        request holds: the prefix cache starts anew, or every request sharing one of them (a system
        prompt) would start with no replica at that stage and its acks, which begin past the
        shared blocks, would never count."""
        self.forget_replicas(pipeline, stage)
        self.drop_prefix_cache(pipeline)

    def limit_blocks(self, pipeline: int, limit: int | None) -> None:
        """A stage of the pipeline is now served from its buddy's replica pool, which holds the
        block ids below `limit` (None: every stage is on its own pool again). A request keeps its
        blocks up to the first one past it; from there on its replica ends (the replica
        watermarks go no further) and it recomputes into blocks below the limit. Call before
        `resume_after_failover`, which counts what is recomputed."""
        bm = self.blocks[pipeline]
        bm.set_limit(limit)
        if limit is None:
            return
        for req in self.running[pipeline]:
            keep = next((i for i, b in enumerate(req.block_ids) if b >= limit), None)
            if keep is None:
                continue
            bm.truncate(req, keep)
            for stage, mark in req.replicated.items():
                req.replicated[stage] = min(mark, keep * self.block_size)

    def backfill_spans(self, pipeline: int) -> tuple[tuple[int, int, int, int, tuple[int, ...]], ...]:
        """What a new replica holder of the pipeline's stages lacks: per running request, the
        tokens whose KV is written once the micro-batches already sent have run (those in flight
        included), with its block table."""
        spans = []
        for req in self.running[pipeline]:
            end = req.num_computed_tokens
            plan = self.in_flight.get(req.step_id) if req.in_flight else None
            for c in plan.chunks if plan is not None else ():
                if c.req_id == req.id:
                    end = max(end, c.start + c.num_tokens)
            if end > 0:
                spans.append((req.id, req.num_preemptions, 0, end, tuple(req.block_ids)))
        return tuple(spans)

    def resume_after_failover(self, pipeline: int, stage: int) -> list[tuple[int, str, int]]:
        """The stage's KV of the pipeline's requests now comes from the buddy's replica: each
        request recomputes only the tokens past its replicated watermark (all of them, a replay,
        without one). Returns (req_id, "replica" | "replay", tokens recomputed)."""
        out = []  # published blocks were replicated before they were shared: the cache stays valid
        for req in self.running[pipeline]:
            req.in_flight = False
            req.step_id = None
            upto = req.replicated.get(stage, 0)
            recompute = max(0, req.num_computed_tokens - upto)
            req.num_computed_tokens = min(req.num_computed_tokens, upto)
            out.append((req.id, "replica" if upto > 0 else "replay", recompute))
        return out

    def mark_replicated(self, pipeline: int, stage: int) -> None:
        """The stage's KV was handed over whole: the holder's replica is complete again."""
        self.drop_prefix_cache(pipeline)
        for req in self.running[pipeline]:
            req.replicated[stage] = req.num_computed_tokens

    def drop_prefix_cache(self, pipeline: int) -> None:
        """The pipeline's KV moved (or was lost): what the cache's keys point at may not be there."""
        self.blocks[pipeline].drop_cache()
        self._cache_replicated[pipeline] = set(range(self.replicated_stages))

    def block_ids_of(self, pipeline: int) -> list[int]:
        return sorted({b for req in self.running[pipeline] for b in req.block_ids})  # shared ones once

    def in_flight_on(self, pipeline: int) -> int:
        return sum(1 for plan in self.in_flight.values() if plan.pipeline == pipeline)

    # ---------------------------------------------------------------- views

    def num_running(self) -> int:
        return sum(len(r) for r in self.running)

    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_work(self, pipeline: int) -> bool:
        return any(not r.in_flight for r in self.running[pipeline]) or bool(self.waiting)

    def kv_usage(self) -> float:
        return sum(b.usage for b in self.blocks) / len(self.blocks)
