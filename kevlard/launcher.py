"""How worker processes are started and talked to: the one small interface a Ray launcher would replace.

`LocalLauncher.spawn` starts one process per device and returns a `WorkerHandle`: send a message,
get every reply through a callback, watch the process sentinel. Workers are forked by a
multiprocessing fork server that imported torch once (safe with CUDA: the server never touches a
device), so N workers cost one torch import, not N concurrent ones on the same cores; where the
platform has no fork server, they are spawned.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import Callable

from kevlard import messages as m

log = logging.getLogger("kevlard.launcher")


class WorkerHandle:
    def __init__(self, worker_id: int, device: str, process, conn):
        self.id = worker_id
        self.device = device
        self.process = process
        self.conn = conn
        self._send_lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self.closed = False
        self.released = False  # channel and process handle closed (release)
        self._pid: int | None = None
        self._exitcode: int | None = None

    @property
    def pid(self) -> int | None:
        return self._pid if self.released else self.process.pid

    @property
    def sentinel(self) -> int:
        return self.process.sentinel

    def is_alive(self) -> bool:
        return not self.released and self.process.is_alive()

    @property
    def exitcode(self) -> int | None:
        return self._exitcode if self.released else self.process.exitcode

    def release(self) -> bool:
        """The worker has exited: close its channel and process handle (their file descriptors);
        pid and exit code stay readable. False while it still runs or is not reaped yet."""
        if self.released:
            return True
        self.process.join(0)
        if self.process.exitcode is None:
            return False
        self._pid, self._exitcode = self.process.pid, self.process.exitcode
        with self._send_lock:
            self.closed = True
            self.conn.close()
        self.process.close()
        self.released = True
        return True

    def send(self, msg: object) -> bool:
        """Send a message; False if the channel is gone (the worker died)."""
        data = m.encode(msg)
        with self._send_lock:
            if self.closed:
                return False
            try:
                self.conn.send_bytes(data)
                return True
            except (OSError, EOFError, BrokenPipeError, ValueError):
                return False

    def start_reader(self, on_message: Callable[[int, object], None], on_eof: Callable[[int], None]) -> None:
        def read() -> None:
            while True:
                try:
                    data = self.conn.recv_bytes()
                except (EOFError, OSError, ValueError):
                    on_eof(self.id)
                    return
                on_message(self.id, m.decode(data))

        self._reader = threading.Thread(target=read, name=f"worker-{self.id}-reader", daemon=True)
        self._reader.start()

    def kill(self) -> None:
        """SIGKILL the process if it still runs (fencing); the channel closes with it."""
        if not self.released and self.process.pid is not None and self.process.is_alive():
            try:
                os.kill(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def signal_main_thread(self, sig: int) -> bool:
        """Deliver `sig` to the worker's main thread only (tgkill: that thread's id is the pid), so
        that no other thread of it (Gloo's, torch's, replication) has a system call interrupted.
        False if the worker is gone or this platform cannot."""
        import ctypes
        import platform

        number = _TGKILL.get(platform.machine())
        if self.released:
            return False
        pid = self.process.pid
        if number is None or pid is None or not self.process.is_alive():
            return False
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(ctypes.c_long(number), ctypes.c_long(pid), ctypes.c_long(pid), ctypes.c_long(sig)) == 0

    def stop(self, timeout_s: float) -> None:
        """Ask the worker to exit, SIGKILL it if it has not within timeout_s, and close the channel."""
        if self.released:
            return
        self.send(m.Shutdown())
        self.process.join(timeout_s)
        if self.process.is_alive():
            self.kill()
            self.process.join(timeout_s)
        with self._send_lock:
            self.closed = True
            self.conn.close()


@contextlib.contextmanager
def _worker_environment():
    """Workers' large allocations (KV cache, packed weights) on transparent huge pages: a SIGKILLed
    worker's memory is then torn down in ~5 ms instead of ~80 ms per GB of 4 KiB pages (measured
    here), and only then does the kernel close its channel and report it dead. A page costs more at
    first touch (500 MB: 0.58 s instead of 0.10 s on this VM), paid when a stage is hosted (the
    shared packed weights, gpu/packed.py, are not the worker's to free). glibc >= 2.35 honours the
    tunable; others ignore it."""
    old = os.environ.get("GLIBC_TUNABLES")
    os.environ["GLIBC_TUNABLES"] = f"{old}:{HUGE_PAGES_TUNABLE}" if old else HUGE_PAGES_TUNABLE
    try:
        yield
    finally:
        if old is None:
            del os.environ["GLIBC_TUNABLES"]
        else:
            os.environ["GLIBC_TUNABLES"] = old


HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
_TGKILL = {"x86_64": 234, "aarch64": 131}  # Linux's tgkill system call number

# Every module a worker imports, imported once by the fork server: a worker forked later (a
# replacement spare an hour on) then runs the code the daemon started with, not whatever an
# upgrade has put on disk since (seen: a sampler changed under a running daemon, and one
# pipeline sampled seeded requests the old way, the other the new). tests/test_cluster.py checks
# that every import inside a function of the worker's modules is listed. The first one makes the
# fork server ignore SIGTERM (gpu/fork_server.py).
WORKER_MODULES = ("kevlard.gpu.fork_server", "torch", "torch.distributed", "safetensors", "kevlard.messages",
                  "kevlard.logs", "kevlard.model_source", "kevlard.gpu.worker", "kevlard.gpu.hosting",
                  "kevlard.gpu.kv_cache", "kevlard.gpu.stage", "kevlard.gpu.sampler", "kevlard.gpu.link",
                  "kevlard.gpu.replication", "kevlard.gpu.weight_store", "kevlard.gpu.packed")


class LocalLauncher:
    """Workers as local processes, one per device."""

    def __init__(self, heartbeat_interval_s: float, log_format: str = "text"):
        # plain multiprocessing, not torch.multiprocessing: the daemon does not import torch to
        # start the fork server, which imports it meanwhile (messages are pickled bytes, no tensors
        # are shared through the channels)
        import multiprocessing as mp

        if "forkserver" in mp.get_all_start_methods():
            self._ctx = mp.get_context("forkserver")
            self._ctx.set_forkserver_preload(list(WORKER_MODULES))
        else:
            self._ctx = mp.get_context("spawn")
        self.heartbeat_interval_s = heartbeat_interval_s
        self.log_format = log_format

    def spawn(self, worker_id: int, device: str, num_threads: int) -> WorkerHandle:
        from kevlard.gpu.worker import worker_main

        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=worker_main, name=f"kevlard-worker-{worker_id}",
                                 args=(worker_id, device, child, num_threads, self.heartbeat_interval_s, self.log_format),
                                 daemon=True)
        with _worker_environment():  # read when the fork server (or a spawned worker) starts
            proc.start()
        child.close()
        log.info("worker %d spawned on %s (pid %s)", worker_id, device, proc.pid)
        return WorkerHandle(worker_id, device, proc, parent)
