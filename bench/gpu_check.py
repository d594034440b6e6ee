"""GPU check: the numbers a CPU box cannot give, measured on a lent GPU in one short run.

a. rehost: a stage from the host weight store (`attach_stage`: pinned /dev/shm -> device) against
   the same bytes read from a file whose page cache was dropped, then copied to the device;
b. link: activation-sized tensors between two worker processes over a `Link`, the way a stage
   hands its hidden states on (`.cpu()`, Gloo, `.to(device)`);
c. mttr: a real `kevlard serve` on a tiny model, one worker killed, the time to the next first
   token and to the `restore` event.

Each part has its own time budget and its own try/except, so one failure still leaves the others'
numbers. Parts a and b need only torch; part c is skipped, with the reason, where the daemon's
dependencies do not import. Runs on CPU too, which is how the tests prove it end to end.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import signal
import socket
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from queue import Empty

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # kevlard and tests/ from this checkout, whatever the caller's cwd
sys.path.insert(0, str(REPO / "bench"))  # its part c, also when the tests load this file by path

import torch  # noqa: E402

from gpu_check_mttr import check_mttr  # noqa: E402
from kevlard.gpu.weight_store import ALIGNMENT, StageHandle, TensorEntry, attach_stage  # noqa: E402

BUDGET_S = {"rehost": 150.0, "link": 90.0, "mttr": 170.0}  # each part's own
TOTAL_BUDGET_S = 400.0  # all parts together, under the shell's `timeout 450`
STAGE_LAYERS = 8  # an 8B model (32 layers) split in 4
LINK_WIDTH = 4096  # hidden size of an 8B model: an activation is [rows, 4096]
LINK_SIZES = {"64 KiB": 64 << 10, "1 MiB": 1 << 20, "16 MiB": 16 << 20, "128 MiB": 128 << 20}
LINK_REPS = {64 << 10: 30, 1 << 20: 20, 16 << 20: 10, 128 << 20: 5}
LINK_WARMUP = 2
READ_CHUNK = 256 << 20  # Linux reads at most ~2 GiB per call


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda:0", help="cuda:N, or cpu to check the script itself")
    parser.add_argument("--stage-gb", type=float, default=4.0, help="bytes of one stage (8B bf16 / 4 = 4)")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "bench" / "gpu-check-out"))
    parser.add_argument("--scratch", default=str(REPO / "bench"),
                        help="where the disk copy goes: a real disk, not tmpfs, for part a to mean anything")
    args = parser.parse_args(argv)
    # `timeout` sends SIGTERM: unwind, so the finally blocks stop the daemon and remove the big files
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started, end = time.perf_counter(), time.monotonic() + TOTAL_BUDGET_S
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    parts = (("rehost", lambda deadline: check_rehost(args.device, dtype, args.stage_gb, args.scratch, deadline)),
             ("link", lambda deadline: check_link(args.device, dtype, deadline)),
             ("mttr", lambda deadline: check_mttr(args.device, out, deadline)))
    result = {"machine": machine_info(args.device, args.scratch), "args": vars(args),
              **{name: {"skipped": "not reached (the run was killed)"} for name, _ in parts}}
    for name, part in parts:
        result[name] = run_part(name, part, min(end, time.monotonic() + BUDGET_S[name]))
        result["total_s"] = round(time.perf_counter() - started, 2)
        summary = write_results(result, out)  # after each part: a killed run keeps what it measured
    print(summary)
    return 1 if any("error" in result[name] for name, _ in parts) else 0


def write_results(result: dict, out: Path) -> str:
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    summary = markdown(result)
    (out / "gpu_check.md").write_text(summary)
    return summary


def run_part(name: str, part, deadline: float) -> dict:
    """One part under its deadline; an exception becomes the part's `error`, the run goes on."""
    t0 = time.perf_counter()
    try:
        got = part(deadline)
    except Exception as e:
        got = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    got["part_s"] = round(time.perf_counter() - t0, 2)
    print(f"[gpu_check] {name}: {'error' if 'error' in got else 'done'} in {got['part_s']} s", file=sys.stderr)
    return got


def machine_info(device: str, scratch: str) -> dict:
    """What the numbers depend on: the GPU, the host memory, and what /dev/shm and the scratch
    directory really are (a tmpfs scratch makes part a's 'disk' a memory read)."""
    shm = os.statvfs("/dev/shm")
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cpus": os.cpu_count(), "ram_gib": round(_meminfo_kib("MemTotal") / 2**20, 1),
            "shm_free_gib": round(shm.f_bavail * shm.f_frsize / 2**30, 1),
            "scratch_fs": fs_type(scratch), "hostname": socket.gethostname()}
    if device.startswith("cuda") and torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(device), gpu_count=torch.cuda.device_count(),
                    gpu_mem_gib=round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1))
    return info


def _meminfo_kib(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def fs_type(path: str) -> str:
    """The type of the filesystem holding `path` (longest matching mount point in /proc/mounts)."""
    path, best, kind = os.path.realpath(path), "", "unknown"
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        mount = fields[1]
        if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
            best, kind = mount, fields[2]
    return kind


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def timed(fn, reps: int, deadline: float) -> list[float]:
    """Seconds of up to `reps` calls of fn(), at least one, none started after the deadline."""
    times = []
    while len(times) < reps and (not times or time.monotonic() < deadline):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


# ---------------------------------------------------------------- a. rehost

def stage_entries(target_bytes: int, dtype: torch.dtype) -> tuple[list[TensorEntry], int]:
    """STAGE_LAYERS Llama layers whose hidden size makes them about `target_bytes`, each tensor at
    an ALIGNMENT offset as in the host weight store (a layer is ~13 h^2 elements with the MLP 3.5 h)."""
    itemsize, name = dtype.itemsize, str(dtype).removeprefix("torch.")
    hidden = max(64, round(math.sqrt(target_bytes / (STAGE_LAYERS * 13 * itemsize)) / 64) * 64)
    inter, kv = hidden * 7 // 2, hidden // 4
    shapes = {"self_attn.q_proj.weight": (hidden, hidden), "self_attn.k_proj.weight": (kv, hidden),
              "self_attn.v_proj.weight": (kv, hidden), "mlp.gate_proj.weight": (inter, hidden),
              "mlp.up_proj.weight": (inter, hidden), "input_layernorm.weight": (hidden,),
              "mlp.down_proj.weight": (hidden, inter), "post_attention_layernorm.weight": (hidden,),
              "self_attn.o_proj.weight": (hidden, hidden)}
    entries, offset = [], 0
    for layer in range(STAGE_LAYERS):
        for suffix, shape in shapes.items():
            entry = TensorEntry(f"model.layers.{layer}.{suffix}", offset, shape, name)
            entries.append(entry)
            offset = (offset + entry.nbytes + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT
    return entries, max(offset, ALIGNMENT)


def write_store(path: str, entries: list[TensorEntry], total: int, dtype: torch.dtype, device: str) -> None:
    """A host-weight-store file of random weights (drawn on the device: fast), space reserved
    first as the daemon does, so a small /dev/shm fails here and not with SIGBUS."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, total)
    finally:
        os.close(fd)
    buffer = torch.from_file(path, shared=True, size=total, dtype=torch.uint8)
    for e in entries:
        view = buffer[e.offset:e.offset + e.nbytes].view(dtype).view(e.shape)
        view.copy_(torch.randn(e.shape, dtype=dtype, device=device))


def check_rehost(device: str, dtype: torch.dtype, stage_gb: float, scratch: str, deadline: float) -> dict:
    """Part a. The disk side reads into a buffer allocated (pinned on CUDA) beforehand, the best a
    restart could do, so the ratio is a lower bound on what the host weight store saves."""
    shm = os.statvfs("/dev/shm")
    room = int(shm.f_bavail * shm.f_frsize * 0.8)
    wanted = int(stage_gb * 1e9)
    entries, total = stage_entries(min(wanted, room), dtype)
    result = {"stage_bytes": total, "tensors": len(entries), "dtype": str(dtype),
              "shrunk_to_fit_shm": wanted > room}
    torch.zeros(1, device=device).sum().item()  # CUDA context up before anything is timed
    shm_path = f"/dev/shm/kevlard-{os.getpid()}-gpucheck-weights"  # a leftover is cleaned by kevlard
    disk_path = None
    try:
        t0 = time.perf_counter()
        write_store(shm_path, entries, total, dtype, device)
        result["build_s"] = round(time.perf_counter() - t0, 2)
        handle = StageHandle(shm_path, total, tuple(entries))

        def attach() -> None:
            weights = attach_stage(handle, device)
            sync(device)
            del weights
            if device.startswith("cuda"):
                torch.cuda.empty_cache()

        result["pinned"] = summarize(timed(attach, 3, deadline), total)
        fd, disk_path = tempfile.mkstemp(prefix="gpu-check-", suffix=".bin", dir=scratch)
        with open(shm_path, "rb") as src, os.fdopen(fd, "wb") as dst:
            while chunk := src.read(READ_CHUNK):
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        result["disk"] = disk_read(disk_path, total, device, deadline)
        result["disk_over_pinned"] = round(result["disk"]["median_s"] / result["pinned"]["median_s"], 2)
    finally:
        Path(shm_path).unlink(missing_ok=True)
        if disk_path:
            Path(disk_path).unlink(missing_ok=True)
    return result


def disk_read(path: str, total: int, device: str, deadline: float) -> dict:
    """Evict the file from the page cache (posix_fadvise DONTNEED, after the fsync), read it into
    the host buffer, copy to the device; the read and the copy are also reported apart."""
    t0 = time.perf_counter()
    host = torch.empty(total, dtype=torch.uint8, pin_memory=device.startswith("cuda"))
    pin_alloc_s = time.perf_counter() - t0
    view = memoryview((ctypes.c_ubyte * total).from_address(host.data_ptr())).cast("B")
    reads, copies = [], []

    def read_and_copy() -> None:
        with open(path, "rb", buffering=0) as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            t_read = time.perf_counter()
            pos = 0
            while pos < total:
                got = f.readinto(view[pos:pos + READ_CHUNK])
                if not got:
                    raise OSError(f"{path}: short read at {pos} of {total} bytes")
                pos += got
        t_copy = time.perf_counter()
        on_device = torch.empty(total, dtype=torch.uint8, device=device)
        on_device.copy_(host, non_blocking=True)
        sync(device)
        reads.append(t_copy - t_read)
        copies.append(time.perf_counter() - t_copy)
        del on_device
        if device.startswith("cuda"):
            torch.cuda.empty_cache()

    result = summarize(timed(read_and_copy, 3, deadline), total)
    result.update(read_median_s=round(statistics.median(reads), 4), copy_median_s=round(statistics.median(copies), 4),
                  buffer_alloc_s=round(pin_alloc_s, 4), fs=fs_type(path))
    return result


def summarize(times: list[float], nbytes: int) -> dict:
    median = statistics.median(times)
    return {"runs": len(times), "median_s": round(median, 6), "min_s": round(min(times), 6),
            "gb_per_s": round(nbytes / median / 1e9, 2) if median > 0 else None}


# ---------------------------------------------------------------- b. link

def check_link(device: str, dtype: torch.dtype, deadline: float) -> dict:
    """Part b: two spawned processes, one `Link` met through a rendezvous file, as the daemon's
    workers do; rank 0 sends, rank 1 measures."""
    import tempfile

    import torch.multiprocessing as mp

    rendezvous = os.path.join(tempfile.mkdtemp(prefix="kevlard-gpu-check-"), "link")
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=link_worker, args=(rank, rendezvous, device, dtype, queue), daemon=True)
             for rank in (0, 1)]
    for p in procs:
        p.start()
    try:
        answers = {}
        while len(answers) < 2:
            try:
                rank, sizes, error = queue.get(timeout=max(1.0, deadline - time.monotonic()))
            except Empty:
                raise RuntimeError(f"link workers answered {sorted(answers) or 'nothing'} by the deadline") from None
            if error:
                raise RuntimeError(f"link rank {rank}: {error}")
            answers[rank] = sizes
        return {"dtype": str(dtype), "width": LINK_WIDTH, "sizes": answers[1]}
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()


def link_worker(rank: int, rendezvous: str, device: str, dtype: torch.dtype, queue) -> None:
    """One end of the link. Before each transfer the receiver sends a one-element 'ready' and
    starts its clock, so each time is: that small message, the sender's device->host copy, the
    Gloo transfer (header + rows, `send_step`), and the receiver's host->device copy."""
    try:
        from kevlard.gpu.link import Link

        torch.zeros(1, device=device).sum().item()
        link = Link("gpu-check", rank, rendezvous, timeout_s=60.0)
        ready = torch.zeros(1, dtype=torch.long)
        sizes = {}
        for label, nbytes in LINK_SIZES.items():
            rows = nbytes // (LINK_WIDTH * dtype.itemsize)
            hidden = torch.randn(rows, LINK_WIDTH, dtype=dtype, device=device) if rank == 0 else None
            times = []
            for step in range(LINK_WARMUP + LINK_REPS[nbytes]):
                if rank == 0:
                    link.recv((1,), torch.long)
                    link.send_step(step, hidden.cpu())
                    continue
                link.send(ready)
                t0 = time.perf_counter()
                link.recv_step(step, LINK_WIDTH, dtype).to(device)
                sync(device)
                times.append(time.perf_counter() - t0)
            if rank == 1:
                times = times[LINK_WARMUP:]
                sizes[label] = {"bytes": nbytes, "rows": rows, **summarize(times, nbytes),
                                "p90_s": round(sorted(times)[int(0.9 * (len(times) - 1))], 6)}
        link.close()
        queue.put((rank, sizes, None))
    except Exception as e:
        queue.put((rank, None, f"{type(e).__name__}: {e}"))


# ---------------------------------------------------------------- c. mttr

def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [(f"# GPU check ({m.get('gpu', result['args']['device'])}, torch {m['torch']}, "
              f"CUDA {m['cuda']}, {result['total_s']} s)"), ""]
    a = result["rehost"]
    lines += ["## a. Rehost a stage: pinned host memory vs disk", ""]
    if "pinned" in a and "disk" in a:
        shrunk = ", shrunk to fit /dev/shm" if a["shrunk_to_fit_shm"] else ""
        lines += [(f"Stage of {a['stage_bytes'] / 1e9:.2f} GB ({a['tensors']} tensors, {a['dtype']}{shrunk}); "
                   f"disk file on {a['disk']['fs']}."), "",
                  "| path | median s | GB/s | runs |", "|---|---|---|---|",
                  _row("attach_stage (pinned /dev/shm)", a["pinned"]),
                  _row("disk read + copy (cache dropped)", a["disk"]),
                  *(["", "On CPU attach_stage only maps the pages (no copy): its time is not a rehost's."]
                    if result["args"]["device"] == "cpu" else []),
                  "", (f"disk / pinned = **{a['disk_over_pinned']}x** (disk read {a['disk']['read_median_s']} s, "
                       f"copy {a['disk']['copy_median_s']} s)")]
    lines += _problem(a)
    b = result["link"]
    lines += ["", "## b. Link between two workers on one device", ""]
    if "sizes" in b:
        lines += [f"[rows, {b['width']}] {b['dtype']}, .cpu() -> Gloo -> .to(device), timed on the receiver.", "",
                  "| size | median ms | p90 ms | GB/s | runs |", "|---|---|---|---|---|"]
        lines += [f"| {label} | {ms(s['median_s'])} | {ms(s['p90_s'])} | {s['gb_per_s']} | {s['runs']} |"
                  for label, s in b["sizes"].items()]
    lines += _problem(b)
    c = result["mttr"]
    lines += ["", "## c. End-to-end MTTR (kill pipeline 0's last stage)", ""]
    if "kill_to_first_token_s" in c:
        lines += [f"`{c['devices']}`, 2 pipelines x 2 stages + 1 spare, tiny Llama; ready in {c['ready_s']} s.", "",
                  "| measure | s |", "|---|---|",
                  f"| TTFT before the kill (3 requests) | {', '.join(map(str, c['ttft_before_s']))} |",
                  f"| kill -> first token of a new request | {c['kill_to_first_token_s']} |",
                  f"| failure -> reroute (daemon) | {c['reroute_s']} |",
                  f"| failure -> restore (daemon) | {c['restore_since_failure_s']} |",
                  f"| spare rehost (daemon) | {c['rehost_s']} |",
                  f"| kill -> restore event | {c['kill_to_restore_event_s']} |",
                  f"| longest token gap of the in-flight streams | {_longest_gap(c['inflight_streams'])} |",
                  f"| in-flight streams that got all their tokens | {_completed(c['inflight_streams'])} |"]
    lines += _problem(c)
    return "\n".join(lines) + "\n"


def _longest_gap(streams: list[dict]) -> float | None:
    return max((s["max_gap_s"] for s in streams), default=None)


def _completed(streams: list[dict]) -> str:
    done = sum(1 for s in streams if not s["error"] and s["tokens"] == s["max_tokens"])
    return f"{done} of {len(streams)}"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def _row(label: str, stats: dict) -> str:
    return f"| {label} | {stats['median_s']} | {stats['gb_per_s']} | {stats['runs']} |"


def _problem(part: dict) -> list[str]:
    if "skipped" in part:
        return [f"Skipped: {part['skipped']}"]
    if "error" in part:
        return ["", f"**Error:** {part['error']}"]
    return []


if __name__ == "__main__":
    sys.exit(main())
