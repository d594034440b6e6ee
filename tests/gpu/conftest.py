"""Fixtures shared by the worker-side tests."""
from __future__ import annotations

import threading

import pytest

from kevlard.gpu.link import Link


@pytest.fixture
def pair(tmp_path):
    ends = {}

    def open_end(rank):
        ends[rank] = Link("test-link", rank, str(tmp_path / "test-link"), 30.0)

    threads = [threading.Thread(target=open_end, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    yield ends[0], ends[1]
    ends[0].close(), ends[1].close()
