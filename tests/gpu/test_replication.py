"""Which tokens a stage ships to its buddy when the replica pool is smaller than its own."""
import time
from types import SimpleNamespace

import pytest
import torch

from kevlard.gpu.kv_cache import KVCache
from kevlard.gpu.replication import ReplicaReceiver, ReplicaSender, replicable_end


def test_tokens_stop_fitting_the_replica_pool_at_the_first_block_past_it():
    table = [0, 1, 7, 2]  # block size 4; a replica pool of 6 blocks holds ids 0-5
    assert replicable_end(table, 0, 8, 4, 6) == 8  # blocks 0 and 1: all of it
    assert replicable_end(table, 5, 11, 4, 6) == 8  # block 7 is past the pool: up to where it begins
    assert replicable_end(table, 9, 10, 4, 6) == 9  # inside block 7: nothing
    assert replicable_end(table, 12, 16, 4, 6) == 16  # block 2 fits again (the watermark stays at 8)
    assert replicable_end(table, 0, 16, 4, 16) == 16  # a pool as large as the pipeline's: everything



@pytest.fixture(params=[False, True], ids=["over-the-link", "shared-pool"])
def replication(pair, request):
    """A sender and a receiver over a real link: make(interval_s) -> (sender, source KV, replica KV, acks).
    Twice: a replica pool the KV travels to over the link (GPU workers), and one in shared memory the
    source writes into itself (CPU workers)."""
    made = []

    def make(interval_s: float):
        out, into = pair
        src = KVCache(2, 8, 4, 1, 2, torch.float64)
        src.data.copy_(torch.randn(src.data.shape, dtype=torch.float32))  # float32 values, as a projection's
        dst = KVCache(2, 8, 4, 1, 2, torch.float64, shared=request.param)
        acks = []  # on CPU workers, the sender writes into the shared pool and acks itself
        receiver = ReplicaReceiver(into, dst, 7, lambda source, p, s, spans: acks.append(spans))
        sender = ReplicaSender(out, src, replica_blocks=8, interval_s=interval_s,
                               ack=(lambda p, s, spans: acks.append(spans)) if request.param else None)
        made.append((sender, receiver))
        return sender, src, dst, acks

    yield make
    for sender, receiver in made:
        sender.close()
        receiver.alive = False
        receiver.kv.close()


def step(sender, table, pos: int, n: int = 1) -> None:
    sender.enqueue(0, 1, [SimpleNamespace(req_id=11, epoch=0, start=pos, num_tokens=n, block_table=table)])


def acked(acks: list, count: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while len(acks) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    return len(acks) >= count


def test_steps_written_within_the_interval_ship_together_and_the_replica_holds_them(replication):
    """Decode steps 50 ms apart, shipped at most every 300 ms: one shipment for the first step,
    then one for the three after it (each shipment costs both workers a slice of the step loop),
    and the replica pool ends up holding exactly the KV written."""
    sender, src, dst, acks = replication(0.3)
    table = (3, 5)
    step(sender, table, 0, 4)
    for pos in (4, 5, 6):
        time.sleep(0.05)
        step(sender, table, pos)
    deadline = time.monotonic() + 10
    while (not acks or acks[-1][0][3] < 7) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert acks == [((11, 0, 0, 4),), ((11, 0, 4, 7),)]
    slots = src.slots(table, 0, 7)
    assert torch.equal(dst.gather(slots), src.gather(slots))
    assert not dst.gather(src.slots(table, 7, 8)).any()  # nothing past what was written


def test_a_block_worth_of_waiting_tokens_ships_before_the_interval_ends(replication):
    """A fast model writes many tokens per interval: a request's lag stays within one block
    (4 tokens here) even with a 10 s interval, so a failover recomputes at most a block."""
    sender, src, dst, acks = replication(10.0)
    table = (3, 5, 6)
    step(sender, table, 0, 1)  # an idle sender ships at once, a single token too
    assert acked(acks, 1, 5)
    step(sender, table, 1, 2)
    assert not acked(acks, 2, 0.3)  # two tokens, within the interval: they wait
    step(sender, table, 3)
    assert not acked(acks, 2, 0.3)
    step(sender, table, 4)  # the fourth waiting token makes a block's worth
    assert acked(acks, 2, 5)
    step(sender, table, 5)
    assert not acked(acks, 3, 0.3)
    assert acks == [((11, 0, 0, 1),), ((11, 0, 1, 5),)]
    slots = src.slots(table, 0, 5)
    assert torch.equal(dst.gather(slots), src.gather(slots))


def test_a_replica_pool_in_shared_memory_is_written_and_acked_by_its_source(pair):
    """On CPU the source maps its buddy's pool, copies the KV in itself and acks the spans itself
    (the daemon checks that buddy still keeps the replica): the buddy never receives, scatters or
    acks anything, and its pool still holds exactly what was written."""
    out, into = pair
    src = KVCache(2, 8, 4, 1, 2, torch.float64)
    src.data.copy_(torch.randn(src.data.shape, dtype=torch.float32))
    dst = KVCache(2, 8, 4, 1, 2, torch.float64, shared=True)

    def no_scatter(*_):
        raise AssertionError("the receiver scattered KV it should have found in its pool")

    dst.scatter = no_scatter
    holder_acks, source_acks = [], []
    receiver = ReplicaReceiver(into, dst, 7, lambda source, p, s, spans: holder_acks.append(spans))
    sender = ReplicaSender(out, src, replica_blocks=8, interval_s=0.05,
                           ack=lambda p, s, spans: source_acks.append((p, s, spans)))
    try:
        table = (6, 2, 3)
        step(sender, table, 0, 9)
        assert acked(source_acks, 1, 10) and source_acks[0] == (0, 1, ((11, 0, 0, 9),))
        assert sender._remote is not None
        slots = src.slots(table, 0, 9)
        assert torch.equal(dst.data.index_select(2, slots), src.data.index_select(2, slots))
        assert not dst.data.index_select(2, src.slots(table, 9, 12)).any()
        time.sleep(0.2)
        assert holder_acks == []  # nothing came over the link after the handshake
    finally:
        sender.close()
        receiver.alive = False
        dst.close()


def test_once_the_daemon_closes_the_link_a_sender_writing_into_a_shared_pool_stops(pair):
    """It sends nothing over the link, so a closed link is what tells it this buddy no longer keeps
    the replica: it acks nothing more."""
    out, into = pair
    src = KVCache(2, 8, 4, 1, 2, torch.float64)
    dst = KVCache(2, 8, 4, 1, 2, torch.float64, shared=True)
    acks = []
    receiver = ReplicaReceiver(into, dst, 7, lambda *_: None)
    sender = ReplicaSender(out, src, replica_blocks=8, interval_s=0.05, ack=lambda p, s, spans: acks.append(spans))
    try:
        step(sender, (1, 2), 0, 2)
        assert acked(acks, 1, 10)
        out.close()
        step(sender, (1, 2), 2, 4)
        assert not acked(acks, 2, 0.5)
        assert not sender.alive
    finally:
        sender.close()
        receiver.alive = False
        dst.close()


def test_blocks_filled_at_every_step_ship_together_at_most_every_half_second(replication):
    """A request filling a block at every few steps (a fast model) does not cost a shipment per
    block: after one shipment, the next waits out the minimum gap and takes everything written
    meanwhile. A prompt's blocks do not wait: a failure would recompute the whole prompt."""
    sender, src, dst, acks = replication(10.0)
    table = tuple(range(8))
    step(sender, table, 0, 4)
    assert acked(acks, 1, 5)
    for pos in range(4, 28):  # decode steps 5 ms apart: a full block every 4th one wakes the sender
        step(sender, table, pos)
        time.sleep(0.005)
    deadline = time.monotonic() + 5
    while (not acks or acks[-1][0][3] < 28) and time.monotonic() < deadline:
        time.sleep(0.001)
    assert len(acks) <= 3, acks  # without the gap: one shipment per block, 7 in all
    shipped = len(acks)
    step(sender, table, 28, 4)  # a prompt's block, right after a shipment: it does not wait the gap
    assert acked(acks, shipped + 1, 0.3)
    assert acks[-1] == ((11, 0, 28, 32),)
