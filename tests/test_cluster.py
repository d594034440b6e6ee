"""Cluster start-up: a worker that dies while starting is reported with its exit code, not waited on."""
from __future__ import annotations

import asyncio
import multiprocessing
import os

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
    cluster = Cluster(topo, DyingLauncher(), "127.0.0.1", 5.0, start_timeout_s=60.0, threads_per_worker=1)
    with pytest.raises(WorkerStartError, match="exit code 7"):
        await asyncio.wait_for(cluster.start(lambda s: None), 60)
    cluster.stop(1.0)
