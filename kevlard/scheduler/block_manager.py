"""KV block accounting for one pipeline: every stage worker of the pipeline holds the same block ids."""
from __future__ import annotations

from kevlard.scheduler.request import Request


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ValueError(f"need at least one KV block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_needed(self, req: Request, num_tokens: int) -> int:
        """Blocks to add so that `req` can hold `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(req.block_ids))

    def can_allocate(self, req: Request, num_tokens: int) -> bool:
        return self.blocks_needed(req, num_tokens) <= len(self._free)

    def allocate(self, req: Request, num_tokens: int) -> None:
        needed = self.blocks_needed(req, num_tokens)
        if needed > len(self._free):
            raise RuntimeError(f"allocate without can_allocate: need {needed}, have {len(self._free)}")
        for _ in range(needed):
            req.block_ids.append(self._free.pop())

    def free(self, req: Request) -> None:
        self._free.extend(reversed(req.block_ids))
        req.block_ids = []
