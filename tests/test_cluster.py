"""Cluster start-up: a worker that dies while starting is reported with its exit code, not waited on."""
from __future__ import annotations

import asyncio
import multiprocessing
import os
from pathlib import Path

import pytest

from kevlard.cluster import Cluster, WorkerStartError
from kevlard.config import ClusterConfig
from kevlard.launcher import WorkerHandle
from kevlard.topology import plan_topology


class DyingLauncher:
    """Starts processes that exit with code 7 at once, as a worker that crashes on import would."""

    def spawn(self, worker_id: int, device: str, num_threads: int) -> WorkerHandle:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=os._exit, args=(7,), daemon=True)
        proc.start()
        child.close()
        return WorkerHandle(worker_id, device, proc, parent)


async def test_worker_dying_at_start_is_reported_with_its_exit_code():
    topo = plan_topology(ClusterConfig(devices="cpu:1", pipelines=1, stages=1, spares=0), 0)
    cluster = Cluster(topo, DyingLauncher(), 5.0, start_timeout_s=60.0, threads_per_worker=1)
    with pytest.raises(WorkerStartError, match="exit code 7"):
        await asyncio.wait_for(cluster.start(lambda s: None), 60)
    cluster.stop(1.0)


async def test_a_peer_dying_before_it_joins_a_link_holds_up_no_other_link():
    """A spare killed half-way through opening its links left its peer waiting in the rendezvous
    for the whole link timeout, and every link asked of that peer meanwhile queued behind it: the
    next spare's links timed out too, and so on (seen in CI: a stage never came back)."""
    from kevlard import messages as m
    from kevlard.launcher import LocalLauncher

    topo = plan_topology(ClusterConfig(devices="cpu:3", pipelines=1, stages=3, spares=0), 0)
    cluster = Cluster(topo, LocalLauncher(0.1), link_timeout_s=300.0, start_timeout_s=300.0,
                      threads_per_worker=1)
    try:
        await cluster.spawn_pipeline_workers()
        cluster.start_links_dir()
        await cluster.wait_ready(0), await cluster.wait_ready(1), await cluster.wait_ready(2)
        # worker 0 starts a link to worker 2; worker 2 is killed before it takes its side
        waiting = asyncio.ensure_future(cluster.command(0, m.OpenLink(
            cluster.next_cmd_id(), 2, "act-0-2-orphan", 0, os.path.join(cluster.links_dir, "orphan"), 300.0, "act")))
        await asyncio.sleep(0.5)
        cluster.fence(2, "kill")
        # the link worker 0 is asked for next opens now, not after the orphan's 300 s timeout
        await asyncio.wait_for(cluster.open_link(0, 1), 60)
        assert (0, 1) in cluster.act_pairs
        assert not waiting.done()
        waiting.cancel()
    finally:
        cluster.stop(2.0)


def test_a_worker_heard_from_after_the_event_loop_closed_raises_nothing_in_its_reader_thread():
    """A worker's channel may close (or a last message arrive) after the cluster was stopped and its
    event loop closed: the reader thread must not die with 'Event loop is closed' (CI saw this)."""
    topo = plan_topology(ClusterConfig(devices="cpu:1", pipelines=1, stages=1, spares=0), 0)
    cluster = Cluster(topo, DyingLauncher(), 5.0, start_timeout_s=5.0, threads_per_worker=1)
    cluster.loop = asyncio.new_event_loop()
    cluster.loop.close()
    cluster._eof_from_thread(0)
    cluster._from_thread(0, object())


def test_a_snapshot_lists_the_live_workers_and_only_the_most_recent_dead_ones():
    """A long-lived daemon's failures add a worker id each: the snapshot (and /metrics, one series
    per listed worker) keeps the live ones and the last DEAD_SHOWN dead ones; a dead worker's
    stages are what it served, so no stage seems served by a dead worker and a live one at once."""
    from types import SimpleNamespace

    from kevlard.cluster import DEAD_SHOWN, WorkerState

    topo = plan_topology(ClusterConfig(devices="cpu:2", pipelines=1, stages=2, spares=0), 0)
    cluster = Cluster(topo, launcher=None, link_timeout_s=5.0, start_timeout_s=5.0,
                      threads_per_worker=1)

    def worker(wid: int, state: str) -> WorkerState:
        w = WorkerState(SimpleNamespace(device=f"cpu:{wid % 2}", pid=1000 + wid), state=state, stage=1,
                        layers=(2, 3), pipelines={0})
        cluster.workers[wid] = w
        return w

    worker(0, "healthy")
    for wid in range(1, 20):
        worker(wid, "dead")
    worker(20, "healthy")
    snap = cluster.snapshot()
    listed = {w["id"]: w for w in snap["workers"]}
    assert sorted(listed) == [0] + list(range(20 - DEAD_SHOWN, 20)) + [20]
    assert snap["dead_workers"] == 19
    assert listed[19]["stages"] == [] and listed[19]["served"] == [{"pipeline": 0, "stage": 1, "layers": [2, 3]}]
    assert listed[20]["stages"] == [{"pipeline": 0, "stage": 1, "layers": [2, 3]}] and listed[20]["served"] == []


async def test_callers_ensuring_one_link_at_the_same_time_share_one_opening():
    """A reroute, a restore and a route's repair may all want the link 0 -> 1 at once: two openings
    would leave each worker holding whichever registered last, perhaps not the same link."""
    topo = plan_topology(ClusterConfig(devices="cpu:2", pipelines=1, stages=2, spares=0), 0)
    cluster = Cluster(topo, launcher=None, link_timeout_s=5.0, start_timeout_s=5.0, threads_per_worker=1)
    opened = []

    async def open_link(a, b, purpose="act"):
        await asyncio.sleep(0.01)
        opened.append((a, b))
        cluster.act_pairs.add((a, b))

    cluster.open_link = open_link
    await asyncio.gather(*(cluster.ensure_link(0, 1) for _ in range(3)))
    await cluster.ensure_link(0, 1)
    assert opened == [(0, 1)]


def test_every_module_a_worker_imports_later_is_imported_by_the_fork_server_first():
    """A module a worker imports inside a function (on its first step, say) is read from disk then:
    upgraded under a running daemon, one pipeline sampled seeded requests the old way, the other
    the new. The fork server imports each one first (launcher.WORKER_MODULES), so that every
    worker, however late it is forked, runs the code the daemon started with."""
    import ast
    import importlib.util

    from multiprocessing import forkserver

    from kevlard.launcher import WORKER_MODULES, LocalLauncher

    LocalLauncher(heartbeat_interval_s=0.1)
    assert forkserver._forkserver._preload_modules == list(WORKER_MODULES)

    def preloaded(imported: str) -> bool:
        if imported in WORKER_MODULES or imported in ("kevlard", "kevlard.gpu"):  # (packages: their modules count)
            return True
        return any(imported.startswith(w + ".") for w in WORKER_MODULES if not w.startswith("kevlard"))

    # the modules whose functions run in a worker (model_source's run in the daemon)
    worker_side = [name for name in WORKER_MODULES if name.startswith("kevlard.gpu") or name == "kevlard.logs"]
    missing = []
    for name in worker_side:
        tree = ast.parse(Path(importlib.util.find_spec(name).origin).read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
                else:
                    continue
                for imported in names:
                    if imported.split(".")[0] not in ("kevlard", "torch", "safetensors"):
                        continue  # the standard library: not upgraded under a running daemon
                    try:
                        is_module = importlib.util.find_spec(imported) is not None
                    except ModuleNotFoundError:
                        is_module = False
                    if is_module and not preloaded(imported):
                        missing.append(f"{name}: {imported}")
    assert not missing, missing
