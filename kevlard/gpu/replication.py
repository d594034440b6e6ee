"""Background KV replication: each stage ships the KV its steps write to its buddy, off the step's
critical path, and the buddy reports how far each request is replicated.

The buddy's replica pool holds the block ids below its size (`kv.replica_fraction`): what a step
writes into a block past it is not shipped, and the span reported for the request ends where
that block begins, so its watermark stops there.

Wire format on a `repl` link: first the receiver's handshake [pid, fd, numel] (int64), how to
map its replica pool when it lies in shared memory (CPU workers; fd -1 otherwise). Then per
shipment: a header [num_slots, num_reqs, pipeline, stage, in_pool] (int64), a body [slots...,
req_id, epoch, start, end, ...] (int64; a request's epoch is its admission: see SeqChunk), then, unless in_pool, the KV of those slots [2, L, num_slots,
kvh, hd]. With the pool mapped (CPU workers), the sender copies the KV straight into it and
acks the spans to the daemon itself, naming the holder; nothing more goes over the link (one
pass over the bytes instead of gather, convert, send, receive, convert, scatter, and neither
sockets nor the holder's thread). The daemon counts such an ack only while that holder still
keeps the stage's replica. Shipments are FIFO either way, so a block that was freed and reused
is always overwritten by its newer owner's data last, and a span is acked only after its data is
in the pool.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import torch

from kevlard.gpu.kv_cache import KVCache, map_shared
from kevlard.gpu.link import Link, LinkError

log = logging.getLogger("kevlard.replication")

# At most this long between shipments (`kv.replication_interval_ms`), and sooner once a request has
# a block's worth of tokens waiting: a failure recomputes at most about this much (or a block) of a
# request's generation, and a saturated CPU does not pay a shipment per step.
# Each shipment costs the sender Python work, thread wake-ups and the GIL between two steps: on 2
# cores at the serving-core load (8 requests/s), against replication off, shipping every 200 ms
# cost 13-21 % p99 latency and 2-6 % throughput, every 1000 ms about 6 % and 0 % (pairs of runs,
# docs/bench/ANALYSIS.md). A request with a full block waiting ships at once anyway, so the
# interval only bounds the lag of the slow ones.
SHIP_INTERVAL_S = 1.0
# ... but never within this of the previous shipment, unless a step wrote a prompt's blocks: at
# that load nearly every step fills some request's block, and a shipment per step cost about 4 %
# mean latency on top of the rest (pairs, docs/bench/ANALYSIS.md); a failure then recomputes at
# most a block or half a second of a request's generation.
MIN_GAP_S = 0.5


class ReplicaSender:
    """Owns the outgoing `repl` link; a thread drains queued steps and ships their KV."""

    def __init__(self, link: Link, kv: KVCache, replica_blocks: int, interval_s: float = SHIP_INTERVAL_S,
                 ack: Callable[[int, int, tuple[tuple[int, int, int], ...]], None] | None = None):
        """`ack(pipeline, stage, spans)`: with the buddy's pool mapped, the sender reports what it
        stored itself, and nothing travels over the link after the handshake."""
        self.link = link
        self.ack = ack
        self.interval_s = interval_s
        self.min_gap_s = min(MIN_GAP_S, interval_s)
        self.kv = kv
        self.replica_blocks = replica_blocks
        # what the steps wrote since the last shipment; the step thread only appends to it (and
        # wakes the sender once a request has a block's worth waiting), so a step never waits on
        # the sender and the sender does not wake up once per step
        self._lock = threading.Lock()
        self._pending: list = []
        self._due: dict[int, int] = {}  # tokens waiting per request
        self._wake = threading.Event()
        self._idle = False  # the sender waits for any write, not for the interval
        self._prompt = False  # a step wrote a block's worth of one request at once: no gap for it
        self._remote = None  # the buddy's replica pool, when mapped (shared memory, same host)
        self.alive = True
        self._thread = threading.Thread(target=self._run, name="replica-sender", daemon=True)
        self._thread.start()

    def enqueue(self, pipeline: int, stage: int, chunks) -> None:
        """Called by the step thread after a step wrote KV: cheap, it only records positions."""
        self._add(pipeline, stage, [((c.req_id, c.epoch), c.start, c.num_tokens, c.block_table) for c in chunks])

    def backfill(self, pipeline: int, stage: int, spans) -> None:
        """A new holder gets the KV written before it took over: (req_id, epoch, start, end, table) each."""
        self._add(pipeline, stage, [((r, e), a, b - a, table) for r, e, a, b, table in spans])

    def _add(self, pipeline: int, stage: int, entries) -> None:
        if not self.alive:
            return
        with self._lock:
            self._pending.append((pipeline, stage, entries))
            due = self._due
            for key, _, n, _ in entries:  # key: (req_id, epoch)
                due[key] = waiting = due.get(key, 0) + n
                if n >= self.kv.block_size:
                    self._prompt = True  # (before the wake-up: the gap's wait checks it after one)
                if waiting >= self.kv.block_size:
                    self._wake.set()
            if self._idle:
                self._wake.set()

    def close(self) -> None:
        self.alive = False
        self._wake.set()

    def _run(self) -> None:
        try:
            self._remote = self._map_buddy_pool()
        except LinkError as e:
            log.warning("replication link down: %s", e)
            self.alive = False
            return
        last_ship = float("-inf")
        while True:
            # a shipment at most every interval, or sooner once a request has a block's worth
            # waiting: the lag stays within an interval and within a block, whichever is less
            wait = last_ship + self.interval_s - time.monotonic()
            if wait > 0:
                self._wake.wait(wait)
            # never within the minimum gap of the last shipment (what is written meanwhile joins
            # this one), except for a prompt's blocks: a failure would recompute the whole prompt,
            # and a prefix is shared only once replicated
            gap_ends = last_ship + self.min_gap_s
            while not self._prompt and self.alive and time.monotonic() < gap_ends:
                self._wake.clear()
                if self._prompt:
                    break
                self._wake.wait(gap_ends - time.monotonic())
            with self._lock:
                pending, self._pending, self._due = self._pending, [], {}
                self._prompt = False
                self._wake.clear()
            if not pending:
                if not self.alive:
                    return
                with self._lock:
                    if self._pending:
                        continue  # written in between
                    self._idle = True
                self._wake.wait()  # idle: the next step's write ships at once
                with self._lock:
                    self._idle = False
                continue
            # a worker's own pool serves one pipeline and stage, so the items share them
            entries = [e for _, _, es in pending for e in es]
            try:
                self._ship(pending[0][0], pending[0][1], entries)
            except LinkError as e:
                log.warning("replication link down: %s", e)
                self.alive = False
            last_ship = time.monotonic()
            if not self.alive:
                return

    def _map_buddy_pool(self):
        """The buddy's replica pool, mapped, when it lies in shared memory this process can map."""
        pid, fd, numel = self.link.recv((3,), torch.long).tolist()
        d = self.kv.data
        if d.device.type != "cpu":
            return None
        shape = (d.shape[0], d.shape[1], self.replica_blocks * self.kv.block_size, d.shape[3], d.shape[4])
        remote = map_shared(pid, fd, numel, shape, d.dtype)
        if remote is None and fd >= 0:
            log.warning("could not map the buddy's replica pool (pid %d): shipping over the link", pid)
        elif remote is not None:
            log.info("replicating straight into the replica pool of pid %d (shared memory)", pid)
        return remote

    def _ship(self, pipeline: int, stage: int, entries) -> None:
        bs = self.kv.block_size
        # a request's steps since the last shipment are back to back: one span each, not one per step
        merged: list[list] = []  # [(req_id, epoch), start, end, block table]
        last: dict[tuple[int, int], list] = {}
        for key, start, n, table in entries:
            end = replicable_end(table, start, start + n, bs, self.replica_blocks)
            if end <= start:
                continue
            span = last.get(key)
            if span is not None and span[2] == start and tuple(table[:len(span[3])]) == tuple(span[3]):
                span[2], span[3] = end, table
            else:
                span = last[key] = [key, start, end, table]
                merged.append(span)
        if not merged:
            return
        slots = [table[pos // bs] * bs + pos % bs for _, a, b, table in merged for pos in range(a, b)]
        spans: dict[tuple[int, int], tuple[int, int]] = {}
        for key, a, b, _ in merged:
            first, end = spans.get(key, (a, b))
            spans[key] = (min(first, a), max(end, b))
        remote = self._remote
        if remote is not None:
            # straight into the buddy's pool, a run of slots within a block at a time (a strided copy
            # per run is 2-3x faster than index_select + index_copy_ for decode-sized runs)
            if self.ack is not None and self.link.closed:
                raise LinkError(f"link {self.link.name} is closed")  # the buddy keeps no replica now
            data = self.kv.data
            for a, b in _runs(slots):
                remote[:, :, a:b].copy_(data[:, :, a:b])
            if self.ack is not None:  # the data is in the pool: say so, nothing goes over the link
                self.ack(pipeline, stage, tuple((req, epoch, a, b) for (req, epoch), (a, b) in spans.items()))
                return
        body = torch.tensor(slots + [x for (req, epoch), (a, b) in spans.items() for x in (req, epoch, a, b)],
                            dtype=torch.long)
        header = torch.tensor([len(slots), len(spans), pipeline, stage, int(remote is not None)], dtype=torch.long)
        if remote is not None:
            self.link.send(header)
            self.link.send(body)
            return
        # the cache may be float64 (gpu/kv_cache.attention_dtype), but every value in it came from a
        # float32 projection: float32 on the wire is lossless and half the bytes
        values = self.kv.gather(body[:len(slots)].to(self.kv.data.device)).to(torch.float32).cpu()
        self.link.send(header)
        self.link.send(body)
        self.link.send(values)


def _runs(slots: list[int]) -> list[tuple[int, int]]:
    """[a, b) ranges of consecutive slot numbers, in order."""
    runs: list[tuple[int, int]] = []
    for x in slots:
        if runs and runs[-1][1] == x:
            runs[-1] = (runs[-1][0], x + 1)
        else:
            runs.append((x, x + 1))
    return runs


def replicable_end(table, start: int, end: int, block_size: int, replica_blocks: int) -> int:
    """Where the tokens [start, end) stop fitting the replica pool: the first token that lies in
    a block whose id is past the pool's size (`end` when they all fit)."""
    for i in range(start // block_size, -(-end // block_size)):
        if table[i] >= replica_blocks:
            return max(start, i * block_size)
    return end


class ReplicaReceiver:
    """Owns one incoming `repl` link; a thread writes shipments into the replica pool and acks."""

    def __init__(self, link: Link, replica_kv: KVCache, source: int,
                 ack: Callable[[int, int, int, tuple[tuple[int, int, int], ...]], None]):
        self.link = link
        self.kv = replica_kv
        self.source = source
        self.ack = ack
        self.alive = True
        self._thread = threading.Thread(target=self._run, name=f"replica-receiver-{source}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        dtype = torch.float32 if self.kv.data.dtype == torch.float64 else self.kv.data.dtype  # see _ship
        try:  # how the source can map our pool (fd -1: it cannot, and ships the KV over the link)
            self.link.send(torch.tensor(self.kv.share_info(), dtype=torch.long))
        except LinkError:
            self.alive = False
            return
        while self.alive:
            try:
                num_slots, num_reqs, pipeline, stage, in_pool = self.link.recv((5,), torch.long).tolist()
                body = self.link.recv((num_slots + 4 * num_reqs,), torch.long)
                if not in_pool:
                    values = self.link.recv((self.kv.slot_shape[0], self.kv.slot_shape[1], num_slots,
                                             *self.kv.slot_shape[2:]), dtype)
            except LinkError:
                self.alive = False  # the source died or the link was closed: nothing more to store
                return
            if not in_pool:  # else the source wrote them into our pool itself before the header
                self.kv.scatter(body[:num_slots].to(self.kv.data.device), values)
            spans = body[num_slots:].tolist()
            self.ack(self.source, pipeline, stage, tuple(zip(spans[0::4], spans[1::4], spans[2::4], spans[3::4])))
