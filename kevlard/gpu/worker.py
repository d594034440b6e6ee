"""The worker process: owns one device, hosts stages, runs steps, and reports over its channel.

It runs commands in the order the daemon sent them (so every worker of a route sees micro-batches
in the same order), except that links connect on threads of their own (a rendezvous waits for the
peer); it sends a heartbeat from a thread, and exits when the daemon's end of the channel closes,
so a crashed daemon leaves no orphan behind.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback

from kevlard import messages as m
from kevlard.gpu import hosting

log = logging.getLogger("kevlard.worker")


class Worker:
    def __init__(self, worker_id: int, device: str, conn, heartbeat_interval_s: float):
        import torch  # imported here: the spawn child pays for it, not the daemon's import of this module

        self.torch = torch
        self.id = worker_id
        self.device = torch.device(device)
        self.conn = conn
        self.heartbeat_interval_s = heartbeat_interval_s
        self._send_lock = threading.Lock()
        self.stages: dict[int, object] = {}  # pipeline-independent: stage index -> StageModel
        self.replica_kv = None  # KVCache holding the lowest block ids of the pipeline it is buddy for
        self.prepared_kv = None  # a spare's (own, replica pool) KVMemory, allocated while it stood by
        self.links: dict[tuple[str, int], object] = {}  # (purpose, peer worker id) -> Link
        self._links_lock = threading.Lock()
        self._opening: dict[tuple[str, int], str] = {}  # key -> name of the link being connected
        self.replica_sender = None
        self.replica_blocks = 0  # the size of every replica pool: only block ids below it are shipped
        self.replication_interval_s = 1.0
        self.replica_receivers: dict[int, object] = {}
        self.steps_done = 0
        # when the step it computes got its input (not while it waits for it, nor while it sends):
        # a device stuck in a kernel stops no heartbeat, this tells the daemon (step_timeout_s)
        self.computing_since: float | None = None
        self._written = None  # (replica sender, pipeline, stage, chunks) of the step being run
        self.hung = threading.Event()
        self.released = False  # a signalled hang ends when this turns true (RELEASE_SIGNAL)
        self.slow_s = 0.0
        self.slow_until = 0.0
        self.step_error_until = 0.0

    # ---------------------------------------------------------------- channel

    def send(self, msg: object) -> None:
        data = m.encode(msg)
        with self._send_lock:
            self.conn.send_bytes(data)

    def _heartbeats(self) -> None:
        while True:
            time.sleep(self.heartbeat_interval_s)
            if self.hung.is_set():
                continue
            try:
                since = self.computing_since
                self.send(m.Heartbeat(self.id, time.time(), self.steps_done,
                                      time.monotonic() - since if since is not None else 0.0))
            except (OSError, EOFError, BrokenPipeError):
                os._exit(0)  # the daemon is gone

    def run(self) -> None:
        import signal

        signal.signal(m.HANG_SIGNAL, self._hang_now)
        signal.signal(m.RELEASE_SIGNAL, self._release_hang)
        threading.Thread(target=self._heartbeats, name="heartbeat", daemon=True).start()
        self.send(m.WorkerReady(self.id, os.getpid(), str(self.device)))
        while True:
            try:
                msg = m.decode(self.conn.recv_bytes())
            except (EOFError, OSError):
                return  # the daemon closed the channel
            if isinstance(msg, m.Shutdown):
                return
            self.handle(msg)

    # ---------------------------------------------------------------- commands

    def handle(self, msg: object) -> None:
        if isinstance(msg, m.Step):
            self._step(msg)
        elif isinstance(msg, m.HostStage):
            self._reply(msg.cmd_id, lambda msg: hosting.host_stage(self, msg), msg)
        elif isinstance(msg, m.PrepareKV):
            self._reply(msg.cmd_id, lambda msg: hosting.prepare_kv(self, msg), msg)
        elif isinstance(msg, m.OpenLink):
            # Connecting waits for the peer (up to the link timeout): on a thread of its own, so that
            # a peer dying half-way through the rendezvous never stalls this worker's steps or the
            # next link the daemon asks for.
            threading.Thread(target=self._reply, args=(msg.cmd_id, self._open_link, msg),
                             name=f"open-{msg.name}", daemon=True).start()
        elif isinstance(msg, m.CloseLink):
            self._reply(msg.cmd_id, self._close_link, msg)
        elif isinstance(msg, m.MoveKV):
            self._reply(msg.cmd_id, lambda msg: hosting.move_kv(self, msg), msg)
        elif isinstance(msg, m.Backfill):
            if self.replica_sender is not None:
                self.replica_sender.backfill(msg.pipeline, msg.stage, msg.spans)
        elif isinstance(msg, m.InjectFault):
            self._inject(msg)
        else:
            raise TypeError(f"worker {self.id}: unknown message {type(msg).__name__}")

    def _reply(self, cmd_id: int, fn, msg) -> None:
        try:
            info = fn(msg) or {}
            self.send(m.CommandDone(self.id, cmd_id, None, info))
        except Exception as e:  # reported, not fatal: the daemon decides
            self.send(m.CommandDone(self.id, cmd_id, f"{type(e).__name__}: {e}"))

    def _open_link(self, msg: m.OpenLink) -> dict:
        from kevlard.gpu.link import Link

        from kevlard.gpu.replication import ReplicaReceiver, ReplicaSender

        # a pair of workers may replicate both ways: each direction is its own link
        purpose = msg.purpose if msg.purpose != "repl" else ("repl-out" if msg.rank == 0 else "repl-in")
        key = (purpose, msg.peer)
        with self._links_lock:
            self._opening[key] = msg.name
        # a replica receiver waits between shipments for as long as its source lives
        recv_timeout = 7 * 24 * 3600.0 if purpose == "repl-in" else None
        link = Link(msg.name, msg.rank, msg.rendezvous, msg.timeout_s, recv_timeout)
        with self._links_lock:
            if self._opening.get(key) != msg.name:  # closed, or opened anew, while it connected
                link.close()
                raise RuntimeError(f"link {msg.name} superseded while connecting")
            del self._opening[key]
            old, self.links[key] = self.links.get(key), link
            if old is not None:
                old.close()
            if msg.purpose == "repl" and msg.rank == 0:
                if self.replica_sender is not None:
                    self.replica_sender.close()
                holder = msg.peer

                def ack(pipeline: int, stage: int, upto: tuple[tuple[int, int, int, int], ...]) -> None:
                    self._send_or_exit(m.ReplicaAck(self.id, self.id, holder, pipeline, stage, upto))

                self.replica_sender = ReplicaSender(link, self._stage().kv, self.replica_blocks,
                                                    self.replication_interval_s, ack)
            elif msg.purpose == "repl":
                if self.replica_kv is None:
                    raise RuntimeError(f"worker {self.id} has no replica pool")
                self.replica_receivers[msg.peer] = ReplicaReceiver(link, self.replica_kv, msg.peer, self._ack)
        return {}

    def _ack(self, source: int, pipeline: int, stage: int, upto: tuple[tuple[int, int, int, int], ...]) -> None:
        self._send_or_exit(m.ReplicaAck(self.id, source, self.id, pipeline, stage, upto))

    def _send_or_exit(self, msg: object) -> None:
        try:
            self.send(msg)
        except (OSError, EOFError, BrokenPipeError):
            os._exit(0)  # the daemon is gone

    def _close_link(self, msg: m.CloseLink) -> dict:
        """Close the link of `purpose` to the peer, or with purpose "all" every link to it (it died:
        each holds a Gloo group's threads, sockets and pipes, which a long-lived worker must not keep
        for every neighbour that ever died)."""
        with self._links_lock:
            if msg.purpose == "all":
                for key in [key for key in self._opening if key[1] == msg.peer]:
                    del self._opening[key]
                links = [self.links.pop(key) for key in [key for key in self.links if key[1] == msg.peer]]
                self.replica_receivers.pop(msg.peer, None)  # its thread ends as its link closes
            else:
                for key in ((msg.purpose, msg.peer), ("repl-out", msg.peer)):
                    self._opening.pop(key, None)
                link = self.links.pop((msg.purpose, msg.peer), None) or self.links.pop(("repl-out", msg.peer), None)
                links = [link] if link is not None else []
        for link in links:
            link.close()
            sender = self.replica_sender
            if sender is not None and sender.link is link:
                sender.close()  # it ships over no link while it writes into a mapped pool: told here
        return {}

    def _hang_now(self, signum, frame) -> None:
        """An injected hang, signalled to this (main) thread: it stops wherever it is, mid-step too,
        and the heartbeats stop, until the release signal (or the fence's SIGKILL)."""
        self.released = False
        self.hung.set()
        while not self.released:
            time.sleep(0.05)
        self.hung.clear()

    def _release_hang(self, signum, frame) -> None:
        self.released = True

    def _inject(self, msg: m.InjectFault) -> None:
        if msg.kind == "hang":
            self.hung.set()
            time.sleep(msg.duration_s if msg.duration_s else 10 ** 9)
            self.hung.clear()
        elif msg.kind == "step_error":  # alive, heartbeating, and every step fails
            self.step_error_until = time.monotonic() + (msg.duration_s or 10 ** 9)
        elif msg.kind == "slow":
            self.slow_s = 0.2
            self.slow_until = time.monotonic() + (msg.duration_s or 10 ** 9)
        elif msg.kind == "device_error":
            self.send(m.WorkerFailure(self.id, "device_error", "simulated CUDA error: an illegal memory access"))
            os._exit(3)

    # ---------------------------------------------------------------- the step

    def _step(self, step: m.Step) -> None:
        from kevlard.gpu.link import LinkError

        self._sent_downstream = False
        self._written = None
        try:
            t0 = time.perf_counter()
            sampled = self._run_step(step)
            self.steps_done += 1
            self.send(m.StepDone(self.id, step.step_id, sampled, time.perf_counter() - t0))
            if self._written is not None:
                # only now: a shipment it wakes up runs while this worker waits for its next step,
                # not against the step's own send downstream or sampling (one pipeline step's path)
                sender, pipeline, stage, chunks = self._written
                sender.enqueue(pipeline, stage, chunks)
        except LinkError as e:
            self.computing_since = None
            self._abort_downstream(step)
            self.send(m.StepFailed(self.id, step.step_id, str(e)))
        except Exception as e:
            self.computing_since = None
            if self.device.type == "cuda" and "CUDA" in str(e):
                self.send(m.WorkerFailure(self.id, "device_error", str(e)))
                os._exit(3)
            self._abort_downstream(step)
            self.send(m.StepFailed(self.id, step.step_id, f"{type(e).__name__}: {e}\n{traceback.format_exc()}",
                                   own=True))

    def _abort_downstream(self, step: m.Step) -> None:
        """Tell the next stage this step will not come, so it does not wait for it (or worse,
        take the next step's activations for this one's)."""
        from kevlard.gpu.link import LinkError

        link = self.links.get(("act", step.send_to)) if step.send_to is not None else None
        if link is not None and not self._sent_downstream:
            try:
                link.send_step(step.step_id, None)
            except LinkError:
                pass  # the next stage is gone too

    def _run_step(self, step: m.Step) -> tuple[tuple[int, int], ...]:
        from kevlard.gpu.sampler import SAMPLING_FAILED, sample_row
        from kevlard.gpu.stage import ChunkView

        if time.monotonic() < self.step_error_until:
            raise RuntimeError("simulated step error (fault injection)")
        torch = self.torch
        chunks = step.chunks
        stage = self._stage()
        kv = hosting.pool_of(self, step.pool)
        views, positions, offset = [], [], 0
        for c in chunks:
            end = c.start + c.num_tokens
            views.append(ChunkView(offset, c.num_tokens, c.start, kv.slots(c.block_table, c.start, end),
                                   kv.slots(c.block_table, 0, end)))
            positions.append(torch.arange(c.start, end))
            offset += c.num_tokens
        positions_t = torch.cat(positions).to(self.device)
        hidden_size = stage.spec.hidden_size
        if step.recv_from is None:
            ids = torch.tensor([t for c in chunks for t in c.token_ids], dtype=torch.long, device=self.device)
            hidden = stage.embed(ids)
        else:
            hidden = self.links[("act", step.recv_from)].recv_step(step.step_id, hidden_size, stage.dtype)
            hidden = hidden.to(self.device)
        self.computing_since = time.monotonic()
        if self.slow_s and time.monotonic() < self.slow_until:  # an injected slow device
            time.sleep(self.slow_s)
        hidden = stage.forward(hidden, views, positions_t, kv)  # [T, H]
        if step.replicate and self.replica_sender is not None and step.pool == "primary":
            self._written = (self.replica_sender, step.pipeline, self._stage_index(), chunks)
        if step.send_to is not None:
            hidden = hidden.cpu()
            self.computing_since = None  # sending waits for the next stage: not this one's time
            self._sent_downstream = True
            self.links[("act", step.send_to)].send_step(step.step_id, hidden)
            return ()
        rows = [v.offset + v.num_tokens - 1 for v, c in zip(views, chunks) if c.sample]
        if not rows:
            self.computing_since = None
            return ()
        logits = stage.logits(hidden[torch.tensor(rows, device=self.device)])  # [S, V]
        out, i = [], 0
        for c in chunks:
            if c.sample:
                try:
                    token = sample_row(logits[i], c.temperature, c.top_p, c.top_k, c.seed, c.output_index)
                except Exception as e:  # one request's sampling: it fails alone, the step and worker go on
                    log.warning("sampling failed for request %d: %s: %s", c.req_id, type(e).__name__, e)
                    token = SAMPLING_FAILED
                out.append((c.req_id, token))
                i += 1
        self.computing_since = None
        return tuple(out)

    def _stage(self):
        # One stage per worker; a buddy serving two pipelines hosts the same stage for both.
        if len(self.stages) != 1:
            raise RuntimeError(f"worker {self.id} hosts {len(self.stages)} stages")
        return next(iter(self.stages.values()))

    def _stage_index(self) -> int:
        return next(iter(self.stages))


def worker_main(worker_id: int, device: str, conn, num_threads: int, heartbeat_interval_s: float,
                log_format: str = "text") -> None:
    """Entry point of the spawned process."""
    import signal

    import torch

    from kevlard.logs import setup_logging

    # The daemon decides when a worker stops (it drains first, then closes the channel): a SIGTERM,
    # SIGINT or SIGHUP sent to the whole process group (systemd's KillMode=control-group, Ctrl-C in
    # a terminal, the terminal closed) killed every worker at once, and the draining daemon
    # recovered from four failures.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)

    setup_logging(log_format, worker=worker_id)

    torch.set_num_threads(max(1, num_threads))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    try:
        Worker(worker_id, device, conn, heartbeat_interval_s).run()
    except Exception:
        traceback.print_exc(file=sys.stderr)
        sys.exit(1)
