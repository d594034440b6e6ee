"""What a worker does to host a stage, to stand by as a warm spare, and to take KV back after a
failover: the commands `HostStage`, `PrepareKV` and `MoveKV` (gpu/worker.py dispatches them)."""
from __future__ import annotations

import math
import os
import threading
import time

from kevlard import messages as m

# On CPU a stage is built, and a spare's KV memory allocated, in a thread of this nice value: a
# few tenths of a second of a core that the serving workers need while a spare rehosts after a
# failure, so serving goes first.
HOSTING_NICE = 10


def prepare_kv(worker, msg: m.PrepareKV) -> dict:
    """A spare allocates the KV memory of the largest stage, and of its replica pool, while it stands
    by; `host_stage` then takes it instead of allocating (gpu/kv_cache.KVMemory)."""
    from kevlard.gpu.kv_cache import KVMemory, attention_dtype

    t0 = time.monotonic()
    dtype = attention_dtype(getattr(worker.torch, msg.dtype))
    per_block = 2 * msg.num_layers * msg.block_size * msg.num_kv_heads * msg.head_dim

    def build():
        own = KVMemory(per_block * msg.num_blocks, dtype, worker.device)
        replica = KVMemory(per_block * msg.replica_blocks, dtype, worker.device, shared=True) \
            if msg.replica_blocks else None
        if replica is not None:
            replica.allocate_shared_pages()
        return own, replica

    worker.prepared_kv = at_low_priority(build) if worker.device.type == "cpu" else build()
    return {"prepare_s": round(time.monotonic() - t0, 3)}


def host_stage(worker, msg: m.HostStage) -> dict:
    from kevlard.gpu.kv_cache import KVCache, attention_dtype
    from kevlard.gpu.stage import StageModel
    from kevlard.gpu.weight_store import attach_stage, drop_mapped_pages

    t0 = time.monotonic()
    if msg.weights_dir is not None:
        from kevlard.gpu.weight_store import load_stage_from_disk

        weights = load_stage_from_disk(msg.weights_dir, msg.first_layer, msg.last_layer, msg.is_first,
                                       msg.is_last, msg.dtype, str(worker.device))
    else:
        weights = attach_stage(msg.handle, str(worker.device))
    packed = None
    if msg.weights_dir is None and msg.handle.packed and worker.device.type == "cpu":
        from kevlard.gpu.packed import attach_packed, stage_keys

        packed = attach_packed(msg.handle.packed_path, msg.handle.packed_bytes, msg.handle.packed,
                               stage_keys(msg.first_layer, msg.last_layer, msg.is_last))
    phases = {"attach_s": time.monotonic() - t0}
    spec = msg.spec
    dtype = attention_dtype(getattr(worker.torch, msg.dtype))
    own_memory, replica_memory = worker.prepared_kv or (None, None)
    worker.prepared_kv = None  # taken, or (not fitting) freed once the caches below are built

    def cache(num_blocks: int, shared: bool = False, memory=None) -> KVCache:
        return KVCache(msg.last_layer - msg.first_layer, num_blocks, msg.block_size, spec.num_kv_heads,
                       spec.head_dim, dtype, worker.device, shared=shared, memory=memory)

    def build():
        t = time.monotonic()
        kv = cache(msg.num_blocks, memory=own_memory)
        # the replica pool in shared memory on CPU: the source worker writes into it directly
        replica = cache(msg.replica_blocks, shared=True, memory=replica_memory) if msg.replica_blocks else None
        if replica is not None:
            if replica.memory is not replica_memory:
                replica.allocate_shared_pages()
        if replica_memory is not None and (replica is None or replica.memory is not replica_memory):
            replica_memory.close()
        phases["kv_s"] = time.monotonic() - t
        t = time.monotonic()
        model = StageModel(weights, spec, msg.first_layer, msg.last_layer, msg.is_first, msg.is_last, kv,
                           worker.device, packed)
        phases["pack_s"] = time.monotonic() - t  # on CPU, unless the store packed them, the weights' packing
        return kv, replica, model

    old_replica = worker.replica_kv
    kv, worker.replica_kv, model = at_low_priority(build) if worker.device.type == "cpu" else build()
    if old_replica is not None:
        old_replica.close()  # its memory goes once its source, if any, stops mapping it
    if worker.device.type == "cpu" and msg.weights_dir is None:
        drop_mapped_pages(weights)
    worker.stages.clear()
    worker.stages[msg.stage] = model
    worker.replica_blocks = msg.replica_blocks
    worker.replication_interval_s = msg.replication_interval_s
    replica_bytes = worker.replica_kv.nbytes if worker.replica_kv is not None else 0
    share = worker.replica_kv.share_info() if worker.replica_kv is not None else (0, -1, 0)
    return {"host_s": time.monotonic() - t0, "started_at": t0, "ended_at": time.monotonic(),
            "kv_bytes": kv.nbytes + replica_bytes,
            "kv_prepared": own_memory is not None and kv.memory is own_memory,
            "replica_share": list(share) if share[1] >= 0 else None,
            **{k: round(v, 3) for k, v in phases.items()}}


def move_kv(worker, msg: m.MoveKV) -> dict:
    """Hand KV blocks over: `send` and `recv` over the peers' xfer link; `map` (CPU) copies them
    straight out of the peer's shared replica pool (`msg.share`: its pid, fd and size), the peer
    doing nothing: its pipeline is held, nothing writes there meanwhile."""
    kv = pool_of(worker, msg.pool)
    slots = kv.block_slots(msg.block_ids)
    if msg.direction == "map":
        from kevlard.gpu.kv_cache import map_shared

        pid, fd, numel = msg.share
        per_block = math.prod(kv.slot_shape) * kv.block_size
        shape = (kv.slot_shape[0], kv.slot_shape[1], numel // per_block * kv.block_size, *kv.slot_shape[2:])
        source = map_shared(pid, fd, numel, shape, kv.data.dtype)
        if source is None:
            raise RuntimeError(f"the replica pool of pid {pid} cannot be mapped")
        kv.scatter(slots, source.index_select(2, slots))
        del source  # unmapped: this worker keeps nothing of its peer's pool
        return {"blocks": len(msg.block_ids)}
    link = worker.links[("xfer", msg.peer)]
    if msg.direction == "send":
        link.send(kv.gather(slots).cpu())
    else:
        values = link.recv((kv.slot_shape[0], kv.slot_shape[1], slots.numel(), *kv.slot_shape[2:]),
                           kv.data.dtype)
        kv.scatter(slots, values)
    return {"blocks": len(msg.block_ids)}


def pool_of(worker, pool: str):
    if pool == "replica":
        if worker.replica_kv is None:
            raise RuntimeError(f"worker {worker.id} has no replica pool")
        return worker.replica_kv
    return worker._stage().kv


def at_low_priority(fn):
    """Run fn in a helper thread whose nice value is raised (Linux: per thread), and return its
    result; this thread's own priority is untouched (lowering a nice value needs privileges)."""
    import torch

    out: dict = {}
    threads = torch.get_num_threads()

    def run() -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), HOSTING_NICE)
        except (OSError, AttributeError):
            pass  # not Linux, or not allowed: run at normal priority
        try:
            torch.set_num_threads(threads)
            out["value"] = fn()
        except BaseException as e:  # re-raised in the caller
            out["error"] = e

    t = threading.Thread(target=run, name="host-stage")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]
