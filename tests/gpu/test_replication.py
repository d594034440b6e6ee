"""Which tokens a stage ships to its buddy when the replica pool is smaller than its own."""
from kevlard.gpu.replication import replicable_end


def test_tokens_stop_fitting_the_replica_pool_at_the_first_block_past_it():
    table = [0, 1, 7, 2]  # block size 4; a replica pool of 6 blocks holds ids 0-5
    assert replicable_end(table, 0, 8, 4, 6) == 8  # blocks 0 and 1: all of it
    assert replicable_end(table, 5, 11, 4, 6) == 8  # block 7 is past the pool: up to where it begins
    assert replicable_end(table, 9, 10, 4, 6) == 9  # inside block 7: nothing
    assert replicable_end(table, 12, 16, 4, 6) == 16  # block 2 fits again (the watermark stays at 8)
    assert replicable_end(table, 0, 16, 4, 16) == 16  # a pool as large as the pipeline's: everything
