"""The baseline of `recovery = "restart"`: what today's engines do on a failure. The whole pipeline
is torn down and restarted from the weights on disk (the safetensors cache), and its in-flight
requests start again from scratch (replayed, not failed). It exists so that the benchmark compares
kevlard with a restart like for like; kevlard/recovery.py calls it in place of reroute and restore.
"""
from __future__ import annotations

import asyncio
import logging
import time

from kevlard.scheduler.health import retry_pause_s


async def restart_pipeline(recovery, p: int, failed_at: float, attempt: int = 0) -> None:
    """recovery = "restart": what today's engines do. The whole pipeline is torn down and
    restarted from the weights on disk; its requests start again (replayed, not failed)."""
    cluster, sched = recovery.cluster, recovery.scheduler
    moved = len(sched.running[p])
    sched.deactivate(p)
    recovery.engine.pump_all()
    old = list(cluster.routes[p])
    recovery.events.emit("restart", None, level=logging.WARNING, pipeline=p, workers=old, requests_replayed=moved)
    recovery.counters["requests_replayed"] += moved
    for wid in old:
        cluster.fence(wid, cluster.workers[wid].failure or "restart")
    new = [cluster.spawn_worker(cluster.workers[wid].handle.device) for wid in old]
    extra = recovery.config.cluster.restart_reload_extra_s
    try:
        if extra > 0:  # a benchmark's stand-in for a bigger model's reload
            recovery.events.emit("restart_reload_emulated", None, pipeline=p, seconds=extra)
            await asyncio.sleep(extra)
        for wid in new:
            await cluster.wait_ready(wid)
            cluster.pin(wid, p)
        await asyncio.gather(*(cluster.command(wid, recovery.stage_command(s, replica_pool=False, from_disk=True))
                               for s, wid in enumerate(new)))
        for s, wid in enumerate(new):
            w = cluster.workers[wid]
            w.state, w.stage, w.pipelines = "healthy", s, {p}
            w.layers = cluster.workers[old[s]].layers
        cluster.routes[p] = new
        await asyncio.gather(*(cluster.open_link(a, b) for a, b in zip(new, new[1:])))
    except Exception as e:  # (a new worker killed or failing as it started): tried again, later each time
        retry_in = retry_pause_s(attempt + 1)
        recovery.events.emit("restart_failed", None, level=logging.ERROR, pipeline=p, error=str(e),
                             retry_in_s=retry_in)
        for wid in new:
            cluster.fence(wid, "restart_failed")
        await asyncio.sleep(retry_in)
        await restart_pipeline(recovery, p, failed_at, attempt + 1)
        return
    recovery.restarting.discard(p)
    recovery.counters["restarts"] += 1
    took = time.monotonic() - failed_at
    recovery.recovery_seconds.append(took)
    recovery.events.emit("restore", None, pipeline=p, route=new, since_failure_s=round(took, 4), how="restart")
    recovery.engine.pump_all()
