"""A fake Engine for unit tests of the web layer: scripted tokens from a tiny real tokenizer.

It isolates the web layer only; end-to-end tests run the real engine. The tokenizer is built
in-process (byte-level BPE, every byte encodable, a few merges so some tokens span several
characters, ChatML special tokens and template), so nothing is downloaded.
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import AsyncIterator

from kevlard.api_types import EngineError, SamplingParams, TokenDelta
from kevlard.events import EventLog

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Merges that make multi-character tokens, so stop strings can end or start inside a token.
MERGES = [("S", "T"), ("O", "P"), ("w", "o"), ("wo", "r"), ("l", "d"), ("Ġ", "wor")]


@lru_cache(maxsize=None)
def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE)


FAULT_KINDS = ("kill", "hang", "slow", "device_error")


class RecordingEventLog(EventLog):
    """An EventLog that counts its live subscribers, so tests can see a stream let go of one."""

    def __init__(self) -> None:
        super().__init__()
        self._open: set[int] = set()

    @property
    def num_subscribers(self) -> int:
        return len(self._open)

    def subscribe(self):
        queue = super().subscribe()
        self._open.add(id(queue))
        return queue

    def unsubscribe(self, queue) -> None:
        super().unsubscribe(queue)
        self._open.discard(id(queue))


@dataclass
class Call:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


class FakeEngine:
    """Generates `reply`'s tokens then end-of-sequence, `tokens_per_delta` at a time.

    refuse: raised before the first delta (a queue-full or no-route refusal).
    fail_after: raise `fail_with` after this many deltas (a failure mid-stream).
    Records every call, and in `closed` the requests whose iterator was closed before it ended.
    """

    def __init__(self, reply: str = "Hello world!", *, model_name: str = "fake-model",
                 max_model_len: int = 128, tokens_per_delta: int = 1, delay_s: float = 0.0,
                 refuse: EngineError | None = None, fail_after: int | None = None,
                 fail_with: EngineError | None = None, ready: bool = True) -> None:
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.tokenizer = make_tokenizer()
        self.eos_token_ids = (self.tokenizer.eos_token_id,)
        self.reply = reply
        self.tokens_per_delta = tokens_per_delta
        self.delay_s = delay_s
        self.refuse = refuse
        self.fail_after = fail_after
        self.fail_with = fail_with or EngineError("worker died")
        self.ready = ready
        self.calls: list[Call] = []
        self.closed: list[str] = []
        self.finished: list[str] = []
        self.closed_event = threading.Event()  # set when any request is closed early
        self.events = RecordingEventLog()
        self.workers = {0, 1, 2, 3}
        self.faults: list[tuple[int, str, float | None]] = []  # inject_fault's arguments

    def inject_fault(self, worker: int, kind: str, duration_s: float | None) -> dict:
        """Like the engine's: KeyError for an unknown worker, ValueError for a bad kind or duration;
        records the call and emits a `fault_injected` event."""
        if worker not in self.workers:
            raise KeyError(worker)
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}")
        if duration_s is not None and not duration_s > 0:
            raise ValueError(f"duration_s must be > 0, got {duration_s!r}")
        self.faults.append((worker, kind, duration_s))
        self.events.emit("fault_injected", worker=worker, fault=kind, duration_s=duration_s)
        return {"fault_id": len(self.faults)}

    def is_ready(self) -> bool:
        return self.ready

    def snapshot(self) -> dict:
        return {"model": self.model_name, "requests": len(self.calls), "closed": len(self.closed)}

    def generate(self, request_id: str, prompt_token_ids: list[int],
                 params: SamplingParams) -> AsyncIterator[TokenDelta]:
        self.calls.append(Call(request_id, list(prompt_token_ids), params))
        return self._generate(request_id, params)

    async def _generate(self, request_id: str, params: SamplingParams) -> AsyncIterator[TokenDelta]:
        if self.refuse is not None:
            raise self.refuse
        script = self.tokenizer.encode(self.reply)
        produced: list[int] = []
        ended = False
        try:
            num_deltas = 0
            while True:
                if self.fail_after is not None and num_deltas >= self.fail_after:
                    raise self.fail_with
                batch, finish = [], None
                while len(batch) < self.tokens_per_delta and finish is None:
                    i = len(produced) + len(batch)
                    if i < len(script) or params.ignore_eos:
                        batch.append(script[i % len(script)])
                    else:
                        batch.append(self.eos_token_ids[0])
                        finish = "stop"
                    if finish is None and len(produced) + len(batch) >= params.max_tokens:
                        finish = "length"
                produced += batch
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                num_deltas += 1
                if finish is not None:
                    ended = True
                    self.finished.append(request_id)
                yield TokenDelta(token_ids=batch, finish_reason=finish)
                if finish is not None:
                    return
        finally:
            if not ended:
                self.closed.append(request_id)
                self.closed_event.set()
