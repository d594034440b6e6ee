"""A warm spare's KV memory allocated before its stage is known, and the KV handed back to it
straight out of its buddy's shared replica pool (CPU)."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from kevlard import messages as m
from kevlard.gpu.hosting import move_kv
from kevlard.gpu.kv_cache import KVCache, KVMemory


def test_a_cache_takes_memory_prepared_for_a_larger_stage_and_not_memory_that_does_not_fit():
    layers, blocks, bs, kvh, hd = 3, 8, 4, 2, 2
    own = KVMemory(2 * layers * blocks * bs * kvh * hd, torch.float64, "cpu:3")  # a worker's virtual device
    kv = KVCache(2, blocks, bs, kvh, hd, torch.float64, "cpu:3", memory=own)  # 2 layers of the largest stage's 3
    assert kv.memory is own and kv.data.data_ptr() == own.flat.data_ptr()
    assert kv.data.shape == (2, 2, blocks * bs, kvh, hd) and kv.data.is_contiguous() and not kv.data.any()
    small = KVMemory(10, torch.float64)
    assert KVCache(2, blocks, bs, kvh, hd, torch.float64, memory=small).memory is not small  # too small
    shared = KVMemory(2 * layers * blocks * bs * kvh * hd, torch.float64, "cpu:3", shared=True)
    assert KVCache(2, blocks, bs, kvh, hd, torch.float64, "cpu:3", memory=shared).memory is not shared  # not shared
    pool = KVCache(2, blocks, bs, kvh, hd, torch.float64, "cpu:3", shared=True, memory=shared)
    assert pool.memory is shared and pool.share_info()[1] == shared.shm_fd
    pool.close()


def test_the_spare_copies_the_handed_back_blocks_out_of_the_buddys_shared_pool():
    """The buddy's pool holds fewer blocks than the spare's own cache, in memory prepared for a
    larger stage (its file is longer than the pool): the blocks named, and only they, arrive."""
    layers, bs, kvh, hd = 2, 4, 2, 3
    memory = KVMemory(2 * (layers + 1) * 4 * bs * kvh * hd, torch.float64, shared=True)
    buddy_pool = KVCache(layers, 4, bs, kvh, hd, torch.float64, shared=True, memory=memory)
    buddy_pool.data.copy_(torch.randn(buddy_pool.data.shape, dtype=torch.float64))
    spare_kv = KVCache(layers, 8, bs, kvh, hd, torch.float64)
    spare = SimpleNamespace(id=4, replica_kv=None, links={}, _stage=lambda: SimpleNamespace(kv=spare_kv))
    info = move_kv(spare, m.MoveKV(1, 3, "map", "primary", (1, 3), share=buddy_pool.share_info()))
    assert info == {"blocks": 2}
    for block in range(8):
        got = spare_kv.data[:, :, block * bs:(block + 1) * bs]
        if block in (1, 3):
            assert torch.equal(got, buddy_pool.data[:, :, block * bs:(block + 1) * bs])
        else:
            assert not got.any()
    buddy_pool.close()
