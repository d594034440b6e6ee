"""A link: a two-party channel between two workers, for activations (and later KV blocks).

Built as a two-rank Gloo group over a prefix of the daemon's TCPStore, so opening it involves
exactly the two workers and nobody else; a replacement worker opens its own links while the rest
keep serving. Every send and receive waits at most `timeout_s`.
"""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist


class LinkError(RuntimeError):
    """The peer is gone, hung past the timeout, or the link was closed."""


class Link:
    def __init__(self, name: str, rank: int, store_host: str, store_port: int, timeout_s: float):
        if rank not in (0, 1):
            raise ValueError(f"link rank must be 0 or 1, got {rank}")
        self.name = name
        self.rank = rank
        self.timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.TCPStore(store_host, store_port, is_master=False, timeout=self.timeout)
        try:
            self._group = dist.ProcessGroupGloo(dist.PrefixStore(name, store), rank, 2, self.timeout)
        except RuntimeError as e:
            raise LinkError(f"link {name}: could not connect: {e}") from e
        self._peer = 1 - rank
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
            group.recv([buf], self._peer, 0).wait(self.timeout)
        except (RuntimeError, AttributeError) as e:
            raise LinkError(f"link {self.name}: recv failed: {e}") from e
        return buf

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._group = None

    def _check_open(self) -> None:
        if self.closed or self._group is None:
            raise LinkError(f"link {self.name} is closed")
