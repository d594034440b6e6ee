"""KV block accounting for one pipeline: every stage worker of the pipeline holds the same block ids.

Prefix caching: a full block whose KV is complete (and, with replication, held by every stage's
buddy) is *published* under a key chained over its tokens and every token before it. A new
request whose leading full blocks match published ones shares them (reference counts) and starts
computing after them. A block nobody uses any more stays published, evictable, until its space is
needed (least recently freed first). Shared blocks are never written: a request always computes at
least its last prompt token itself, into a block of its own.

Free blocks are handed out lowest id first. With KV replication, the buddy's replica pool may be
smaller than the pipeline's (`kv.replica_fraction`): it holds the blocks whose ids are below its
size, so a lightly loaded pipeline is replicated whole and, under memory pressure, the blocks past
it simply go without a replica. While a stage is served from that pool, `limit` keeps the
pipeline's allocations below its size.
"""
from __future__ import annotations

import heapq
from collections import OrderedDict

from kevlard.scheduler.request import Request


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"need at least one KV block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._free: list[int] = list(range(num_blocks))  # a heap: the lowest free id first
        self.limit = num_blocks  # block ids at or past it are not handed out (see the module doc)
        self._refs = [0] * num_blocks
        self._key_of: dict[int, tuple] = {}  # published block -> its key
        self._by_key: dict[tuple, int] = {}  # key -> published block
        self._evictable: OrderedDict[int, None] = OrderedDict()  # published, unused; oldest first

    @property
    def num_free_blocks(self) -> int:
        if self.limit >= self.num_blocks:
            return len(self._free) + len(self._evictable)
        return sum(1 for b in self._free if b < self.limit) + sum(1 for b in self._evictable if b < self.limit)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._key_of)

    @property
    def usage(self) -> float:
        return 1.0 - (len(self._free) + len(self._evictable)) / self.num_blocks

    def set_limit(self, limit: int | None) -> None:
        """Hand out only block ids below `limit` (None: all of them) from now on."""
        self.limit = self.num_blocks if limit is None else min(limit, self.num_blocks)

    # ---------------------------------------------------------------- plain allocation

    def blocks_needed(self, req: Request, num_tokens: int) -> int:
        """Blocks to add so that `req` can hold `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(req.block_ids))

    def can_allocate(self, req: Request, num_tokens: int) -> bool:
        return self.blocks_needed(req, num_tokens) <= self.num_free_blocks

    def allocate(self, req: Request, num_tokens: int) -> None:
        needed = self.blocks_needed(req, num_tokens)
        if needed > self.num_free_blocks:
            raise RuntimeError(f"allocate without can_allocate: need {needed}, have {self.num_free_blocks}")
        for _ in range(needed):
            if self._free and self._free[0] < self.limit:
                block = heapq.heappop(self._free)
            else:  # reuse the least recently freed cached block
                block = next(b for b in self._evictable if b < self.limit)
                del self._evictable[block]
                self._unpublish(block)
            self._refs[block] = 1
            req.block_ids.append(block)

    def free(self, req: Request) -> None:
        self.truncate(req, 0)

    def truncate(self, req: Request, keep: int) -> None:
        """The request keeps its first `keep` blocks; the rest are freed (it recomputes them)."""
        tail, req.block_ids = req.block_ids[keep:], req.block_ids[:keep]
        for block in reversed(tail):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._key_of:
                    self._evictable[block] = None
                else:
                    heapq.heappush(self._free, block)
        req.published_blocks = min(req.published_blocks, keep)

    # ---------------------------------------------------------------- prefix caching

    def block_keys(self, req: Request, num_blocks: int) -> list[tuple]:
        """The keys of the request's first `num_blocks` full blocks (cached on the request)."""
        keys = req.block_keys
        bs = self.block_size
        while len(keys) < num_blocks:
            i = len(keys)
            keys.append((hash(keys[-1]) if keys else 0, tuple(req.token_ids(i * bs, (i + 1) * bs))))
        return keys[:num_blocks]

    def match_prefix(self, req: Request) -> list[int]:
        """Published blocks that hold the request's leading tokens, leaving at least one token
        (the last) for the request to compute itself."""
        if not self.prefix_caching:
            return []
        hits = []
        for key in self.block_keys(req, (req.num_tokens - 1) // self.block_size):
            block = self._by_key.get(key)
            if block is None:
                break
            hits.append(block)
        return hits

    def can_admit(self, req: Request, hits: list[int], num_tokens: int) -> bool:
        needed = -(-num_tokens // self.block_size) - len(hits)
        reused_from_free = sum(1 for b in hits if b in self._evictable)
        return needed <= self.num_free_blocks - reused_from_free

    def attach(self, req: Request, hits: list[int]) -> None:
        """Give a request with no blocks yet the published blocks `hits` as its first blocks."""
        assert not req.block_ids
        for block in hits:
            self._refs[block] += 1
            self._evictable.pop(block, None)
            req.block_ids.append(block)
        req.published_blocks = len(hits)

    def publish(self, req: Request, num_tokens: int) -> None:
        """The request's first `num_tokens` tokens have their KV complete: publish its full blocks."""
        if not self.prefix_caching:
            return
        full = min(num_tokens // self.block_size, len(req.block_ids))
        if full <= req.published_blocks:
            return
        keys = self.block_keys(req, full)
        for i in range(req.published_blocks, full):
            block = req.block_ids[i]
            if keys[i] not in self._by_key and block not in self._key_of:
                self._by_key[keys[i]] = block
                self._key_of[block] = keys[i]
        req.published_blocks = full

    def drop_cache(self) -> None:
        """Forget every published block (their KV may no longer be where it was): unused ones
        become free, used ones stay with their requests but are no longer shared."""
        for block in self._evictable:
            heapq.heappush(self._free, block)
        self._evictable.clear()
        self._key_of.clear()
        self._by_key.clear()

    def _unpublish(self, block: int) -> None:
        key = self._key_of.pop(block, None)
        if key is not None:
            self._by_key.pop(key, None)
