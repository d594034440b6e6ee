"""A link keeps each step's activations with that step, also after a step failed on one side only."""
from __future__ import annotations

import threading

import pytest
import torch

from kevlard.gpu.link import Link, StepAborted


def rows(step_id: int) -> torch.Tensor:
    return torch.full((2, 4), float(step_id))


def sending(up: Link, steps: list[tuple[int, bool]]) -> threading.Thread:
    """The upstream worker sends these steps (id, ran) in the background: a send waits for its receive."""
    t = threading.Thread(target=lambda: [up.send_step(i, rows(i) if ran else None) for i, ran in steps])
    t.start()
    return t


def test_a_step_the_receiver_failed_before_reading_does_not_shift_the_next_ones(pair):
    up, down = pair
    sender = sending(up, [(1, True), (2, True), (3, True)])
    # the receiver failed step 1 before reading the link (its own error): steps 2 and 3 still get theirs
    assert torch.equal(down.recv_step(2, 4, torch.float32), rows(2))
    assert torch.equal(down.recv_step(3, 4, torch.float32), rows(3))
    sender.join(30)


def test_a_stale_abort_is_skipped_and_a_missing_step_fails_alone(pair):
    up, down = pair
    # step 1 failed upstream and the receiver never read it; step 2 never reached the sender
    sender = sending(up, [(1, False), (3, True), (4, False), (5, True)])
    with pytest.raises(StepAborted, match="never came"):
        down.recv_step(2, 4, torch.float32)
    assert torch.equal(down.recv_step(3, 4, torch.float32), rows(3))
    with pytest.raises(StepAborted, match="failed upstream"):
        down.recv_step(4, 4, torch.float32)
    assert torch.equal(down.recv_step(5, 4, torch.float32), rows(5))
    sender.join(30)
