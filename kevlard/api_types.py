"""What the web layer and the engine exchange: sampling parameters, token deltas, typed errors.

The web layer maps each EngineError to its HTTP status in OpenAI's error shape.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None  # None: the engine picks one, so a replay samples the same tokens
    stop_token_ids: tuple[int, ...] = ()  # besides the model's end-of-sequence tokens
    ignore_eos: bool = False

    @property
    def is_greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1


@dataclass
class TokenDelta:
    """New tokens of one request; the last delta carries finish_reason."""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (end of sequence) | "length" (max_tokens / context)
    num_cached_tokens: int | None = None  # on the first delta: prompt tokens served from the prefix cache


class StopRequested(Exception):
    """Thrown into an engine iterator by the web layer when the text reached a stop string: the
    request ends there as finished ("stop"), not as aborted."""


class EngineError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None
    retry_after: float | None = None


class QueueFullError(EngineError):
    status = 429
    type = "rate_limit_exceeded"
    code = "queue_full"
    retry_after = 1.0


class NoRouteError(EngineError):
    """No complete pipeline route exists and none came back in time; retrying later may work."""
    status = 503
    type = "service_unavailable"
    code = "no_route"
    retry_after = 5.0


class EngineDeadError(EngineError):
    status = 503
    type = "service_unavailable"
    code = "engine_dead"


class RequestFailedError(EngineError):
    """The request's micro-batches kept failing; the daemon gave up on it. Retrying may work."""
    status = 503
    type = "service_unavailable"
    code = "request_failed"
    retry_after = 1.0


class SamplingError(EngineError):
    """Sampling the request's next token raised on the worker; the other requests went on."""
    code = "sampling_failed"


class ShuttingDownError(EngineError):
    status = 503
    type = "service_unavailable"
    code = "shutting_down"
    retry_after = 5.0


class Engine(Protocol):
    """The daemon's engine as the web layer sees it."""
    model_name: str
    max_model_len: int
    tokenizer: object  # a transformers tokenizer (chat template, encode, decode)
    eos_token_ids: tuple[int, ...]

    def generate(self, request_id: str, prompt_token_ids: list[int],
                 params: SamplingParams) -> AsyncIterator[TokenDelta]:
        """Stream the request's tokens; raises EngineError before the first delta if refused.
        Closing the iterator early (client gone, stop string hit) aborts the request and frees its blocks."""
        ...

    events: object  # kevlard.events.EventLog

    def is_ready(self) -> bool: ...

    def inject_fault(self, worker: int, kind: str, duration_s: float | None = None) -> dict:
        """Raises KeyError for an unknown worker, ValueError for an unknown kind or bad duration."""
        ...

    def snapshot(self) -> dict: ...
