"""Recovery's decisions on the daemon side, with the cluster and scheduler replaced by records of
what they were told (the real processes are in test_fault_tolerance.py)."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

from kevlard.config import Config
from kevlard.recovery import Recovery


class Recorder:
    def __init__(self) -> None:
        self.calls: list = []
        self.running = {0: [], 1: []}

    def __getattr__(self, name):
        return lambda *args: self.calls.append((name, *args)) or []


def make_recovery(ensure_link):
    workers = {w: SimpleNamespace(state="healthy") for w in range(4)}
    cluster = SimpleNamespace(workers=workers, routes=[[0, 1], [2, 3]], pools={}, ensure_link=ensure_link,
                              replica_holder={(0, 1): 3, (1, 1): 1})
    events: list = []
    engine = SimpleNamespace(cluster=cluster, scheduler=Recorder(), config=Config(), replica_blocks=8,
                             events=SimpleNamespace(emit=lambda kind, wid, **kw: events.append((kind, wid, kw))),
                             pump_all=lambda: None)
    return Recovery(engine, stage_command=None, weights_dir=""), cluster, events


async def test_a_buddy_that_dies_while_its_links_open_is_not_counted_as_a_reroute():
    """Worker 1 dies; its buddy 3 takes pipeline 0's stage 1 and dies too before the links to it are
    open. Nothing resumes on the dead buddy and no reroute is counted: the buddy's own death
    handling owns the pipeline from then on."""
    async def ensure_link(a, b):
        await asyncio.sleep(0)
        cluster.workers[3].state = "dead"

    recovery, cluster, events = make_recovery(ensure_link)
    cluster.workers[1].state = "dead"
    await recovery.reroute(0, 1, failed_at=0.0)
    assert recovery.counters["reroutes"] == 0 and recovery.recovery_seconds == []
    assert [kind for kind, *_ in events] == ["reroute_failed"]
    assert "worker 3 failed during the reroute" in events[0][2]["error"]
    assert not any(call[0] == "resume_after_failover" for call in recovery.scheduler.calls)


async def test_a_buddy_that_stays_healthy_takes_the_stage_and_the_requests_resume():
    async def ensure_link(a, b):
        await asyncio.sleep(0)

    recovery, cluster, events = make_recovery(ensure_link)
    cluster.workers[1].state = "dead"
    await recovery.reroute(0, 1, failed_at=0.0)
    assert cluster.routes[0] == [0, 3] and recovery.counters["reroutes"] == 1
    assert [kind for kind, *_ in events] == ["reroute"]
    assert ("resume_after_failover", 0, 1) in recovery.scheduler.calls


def make_paired_recovery(dead=()):
    links: list = []
    sent: list = []

    async def open_link(a, b, purpose="act"):
        links.append((a, b, purpose))

    recovery, cluster, events = make_recovery(ensure_link=None)
    for w, worker in cluster.workers.items():
        worker.state = "dead" if w in dead else "healthy"
        worker.handle = SimpleNamespace(send=lambda msg, w=w: sent.append((w, msg)))
    cluster.open_link, cluster.replication, cluster.pool = open_link, True, lambda p, s: "primary"
    cluster.replica_holder = {(0, 0): 2, (1, 0): 0, (0, 1): None, (1, 1): None}
    return recovery, cluster, events, links, sent


async def test_stages_left_without_a_replica_holder_pair_up_once_both_workers_serve():
    """Both stage-1 workers were replaced side by side (routes [0, 1] and [2, 3] now): each
    restore saw the other route on a dead worker. Each new worker now keeps the other's replica,
    and each source backfills it."""
    recovery, cluster, events, links, sent = make_paired_recovery()
    await recovery.pair_replicas()
    assert cluster.replica_holder == {(0, 0): 2, (1, 0): 0, (0, 1): 3, (1, 1): 1}
    assert sorted(links) == [(1, 3, "repl"), (3, 1, "repl")]
    assert sorted((w, type(msg).__name__, msg.pipeline, msg.stage) for w, msg in sent) == [
        (1, "Backfill", 0, 1), (3, "Backfill", 1, 1)]
    assert ("new_replica_holder", 0, 1) in recovery.scheduler.calls
    assert [kind for kind, *_ in events] == ["replica_paired", "replica_paired"]


async def test_a_stage_whose_buddy_is_dead_is_not_paired():
    recovery, cluster, events, links, sent = make_paired_recovery(dead={3})
    await recovery.pair_replicas()
    assert cluster.replica_holder[(0, 1)] is None and cluster.replica_holder[(1, 1)] is None
    assert links == [] and sent == [] and events == []
