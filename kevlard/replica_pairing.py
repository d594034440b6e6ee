"""Which worker keeps the KV replica of which stage, as the routes change: the links by which a
spare taking over a stage ships its KV to the next pipeline's worker of that stage and keeps the
previous pipeline's (`rewire_replicas`, during a restore), and holders found for stages left
without one (`pair_replicas`, after every restore). Called by kevlard/recovery.py."""
from __future__ import annotations

import asyncio
import logging

from kevlard import messages as m


async def rewire_replicas(recovery, p: int, s: int, spare: int, previous: int):
    """Open the links by which the spare ships its KV to the next pipeline's stage-s worker
    and keeps the replica of the previous pipeline's stage s (which the dead worker kept).
    Returns what to record when the route switches: until then no ack from them counts."""
    cluster = recovery.cluster
    changes = []
    if not cluster.replication:
        return lambda: None
    P = len(cluster.routes)
    nxt, prv = cluster.routes[(p + 1) % P][s], cluster.routes[(p - 1) % P][s]
    opening, peers = [], []
    if cluster.workers[nxt].state == "healthy" and nxt != spare:
        opening.append(cluster.open_link(spare, nxt, "repl"))
        peers.append(nxt)

        def outgoing() -> None:
            if cluster.workers[nxt].state != "healthy":
                return  # it died while the route switched: it keeps nothing (pair_replicas may pair later)
            cluster.replica_holder[(p, s)] = nxt
            if nxt == previous:
                recovery.scheduler.mark_replicated(p, s)  # it served from that very copy until now
            else:  # the new holder gets what was written before it took over
                recovery.scheduler.new_replica_holder(p, s)
                cluster.workers[spare].handle.send(m.Backfill(p, s, recovery.scheduler.backfill_spans(p)))
        changes.append(outgoing)
    if cluster.workers[prv].state == "healthy" and prv != spare and cluster.pool((p - 1) % P, s) == "primary":
        opening.append(cluster.open_link(prv, spare, "repl"))
        peers.append(prv)

        def incoming() -> None:
            q = (p - 1) % P
            if cluster.workers[prv].state != "healthy":
                return
            cluster.replica_holder[(q, s)] = spare
            recovery.scheduler.new_replica_holder(q, s)  # nothing is there yet: the source backfills it
            cluster.workers[prv].handle.send(m.Backfill(q, s, recovery.scheduler.backfill_spans(q)))
        changes.append(incoming)
    for peer, result in zip(peers, await asyncio.gather(*opening, return_exceptions=True)):
        # a peer that died meanwhile keeps no replica (the changes check that at the switch)
        if isinstance(result, BaseException) and not (cluster.workers[peer].state == "dead"
                                                       and cluster.workers[spare].state != "dead"):
            raise result
    return lambda: [change() for change in changes]


async def pair_replicas(recovery) -> None:
    """Each stage whose replica has no holder gets one, once it and its buddy (the same stage of
    the next pipeline) both serve from their own pools: two restores that ran side by side
    (both workers of a stage replaced) each found the other's route still on a dead worker."""
    cluster, P = recovery.cluster, len(recovery.cluster.routes)
    if not cluster.replication or P < 2:
        return
    for (p, s), holder in list(cluster.replica_holder.items()):
        q = (p + 1) % P
        src, nxt = cluster.routes[p][s], cluster.routes[q][s]
        if (holder is not None or src == nxt or (p, s) in recovery.pairing or {(p, s), (q, s)} & recovery.restoring
                or cluster.pool(p, s) != "primary" or cluster.pool(q, s) != "primary"
                or any(cluster.workers[w].state != "healthy" for w in (src, nxt))):
            continue
        recovery.pairing.add((p, s))
        try:
            await cluster.open_link(src, nxt, "repl")
        except Exception as e:
            recovery.events.emit("replica_pairing_failed", src, level=logging.WARNING, pipeline=p, stage=s, error=str(e))
            continue
        finally:
            recovery.pairing.discard((p, s))
        if (cluster.routes[p][s], cluster.routes[q][s]) != (src, nxt) or cluster.replica_holder.get((p, s)) \
                is not None or any(cluster.workers[w].state != "healthy" for w in (src, nxt)):
            continue  # things moved while the link opened: the next restore pairs them
        cluster.replica_holder[(p, s)] = nxt
        recovery.scheduler.new_replica_holder(p, s)  # nothing is there yet: the source backfills it
        cluster.workers[src].handle.send(m.Backfill(p, s, recovery.scheduler.backfill_spans(p)))
        recovery.events.emit("replica_paired", nxt, pipeline=p, stage=s, source=src)
