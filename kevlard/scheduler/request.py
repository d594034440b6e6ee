"""A request as the scheduler sees it: token ids, progress, blocks, where it runs."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    id: int
    prompt_token_ids: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop_token_ids: frozenset[int] = frozenset()
    max_model_len: int = 1 << 30
    arrival: float = 0.0

    output_token_ids: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    num_computed_tokens: int = 0  # tokens whose KV is in the cache of its pipeline
    block_ids: list[int] = field(default_factory=list)
    pipeline: int | None = None
    in_flight: bool = False  # part of a micro-batch that has not come back yet
    step_id: int | None = None  # that micro-batch: a late answer or write-off of an older one is ignored
    failed_steps: int = 0  # micro-batches of it lost in a row; past a limit it ends with an error
    finish_reason: str | None = None
    num_preemptions: int = 0
    replicated: dict[int, int] = field(default_factory=dict)  # stage -> tokens whose KV the buddy holds
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at its (last) admission
    block_keys: list[tuple] = field(default_factory=list)  # prefix-cache keys of its full blocks
    published_blocks: int = 0  # its leading blocks already in the prefix cache (or taken from it)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def token_ids(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        return (self.prompt_token_ids + self.output_token_ids)[start:end]

    def finish_reason_after(self, token: int) -> str | None:
        """Why the request ends after appending `token`, or None if it goes on."""
        if token in self.stop_token_ids:
            return "stop"
        if len(self.output_token_ids) >= self.max_tokens or self.num_tokens >= self.max_model_len:
            return "length"
        return None
