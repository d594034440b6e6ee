"""A link: a two-party channel between two workers, for activations (and later KV blocks).

Built as a two-rank Gloo group whose rendezvous is a file both workers open (a FileStore, in a
directory the daemon owns under /dev/shm), so opening it involves exactly the two workers and
nobody else; a replacement worker opens its own links while the rest keep serving. No server, no
network round trip and no name lookup stands between them: the daemon's TCPStore, which the links
used before, looked up the name of every connecting worker's address on its one thread, and where
the resolver's server did not answer, every link of the daemon waited 5 to 25 s (measured here).
Gloo's device is the loopback address, not the host name resolved. Every send and receive waits at
most `timeout_s`.
"""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist


LOOPBACK = "127.0.0.1"  # both parties are on this host


class LinkError(RuntimeError):
    """The peer is gone, hung past the timeout, or the link was closed."""


class StepAborted(LinkError):
    """The previous stage could not run the step and said so."""


class Link:
    def __init__(self, name: str, rank: int, rendezvous: str, timeout_s: float,
                 recv_timeout_s: float | None = None):
        """`rendezvous`: the path of a file both parties name (one per link, new each time);
        `timeout_s` bounds the rendezvous and every send; `recv_timeout_s` (default the same)
        bounds receives: a replica receiver idles between shipments for as long as its source lives."""
        if rank not in (0, 1):
            raise ValueError(f"link rank must be 0 or 1, got {rank}")
        self.name = name
        self.rank = rank
        self.timeout = datetime.timedelta(seconds=timeout_s)
        options = dist.ProcessGroupGloo._Options()
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=LOOPBACK)]
        options._timeout = self.timeout
        try:
            store = dist.FileStore(rendezvous, 2)
            store.set_timeout(self.timeout)
            self._group = dist.ProcessGroupGloo(store, rank, 2, options)
        except RuntimeError as e:
            raise LinkError(f"link {name}: could not connect: {e}") from e
        self._peer = 1 - rank
        self._next_header: tuple[int, int] | None = None  # read ahead, belongs to a later step
        self.recv_timeout = datetime.timedelta(seconds=recv_timeout_s) if recv_timeout_s else self.timeout
        self.closed = False

    def send(self, tensor: torch.Tensor) -> None:
        self._check_open()
        group = self._group
        try:
            group.send([tensor.contiguous()], self._peer, 0).wait(self.timeout)
        except (RuntimeError, AttributeError) as e:
            raise LinkError(f"link {self.name}: send failed: {e}") from e

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        self._check_open()
        buf = torch.empty(shape, dtype=dtype)
        group = self._group
        try:
            group.recv([buf], self._peer, 0).wait(self.recv_timeout)
        except (RuntimeError, AttributeError) as e:
            raise LinkError(f"link {self.name}: recv failed: {e}") from e
        return buf

    # Activations travel as a header [step_id, rows] and, unless rows is ABORT, the rows. Every
    # step sends exactly one header down each link it crosses, even a step that failed upstream.
    # Step ids only grow along a link, so a receiver re-synchronises by itself: a step it failed
    # before reading (a stale header) is skipped, and a header of a later step than the one it
    # waits for (the sender never got to this one) is kept for that later step. Without this,
    # one step failed before its receive left every later step on the link reading its
    # predecessor's rows: failing forever.
    ABORT = -1

    def send_step(self, step_id: int, hidden: torch.Tensor | None) -> None:
        rows = hidden.shape[0] if hidden is not None else self.ABORT
        self.send(torch.tensor([step_id, rows], dtype=torch.long))
        if hidden is not None:
            self.send(hidden)

    def recv_step(self, step_id: int, width: int, dtype: torch.dtype) -> torch.Tensor:
        while True:
            if self._next_header is not None:
                (got_step, rows), self._next_header = self._next_header, None
            else:
                got_step, rows = self.recv((2,), torch.long).tolist()
            if got_step > step_id:
                self._next_header = (got_step, rows)
                raise StepAborted(f"step {step_id} never came down link {self.name} (next: step {got_step})")
            if rows == self.ABORT:
                if got_step == step_id:
                    raise StepAborted(f"step {got_step} failed upstream")
                continue  # a stale abort
            hidden = self.recv((rows, width), dtype)
            if got_step == step_id:
                return hidden
            # the rows of a step this worker failed before reading them: dropped

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._group = None

    def _check_open(self) -> None:
        if self.closed or self._group is None:
            raise LinkError(f"link {self.name} is closed")
