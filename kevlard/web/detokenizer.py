"""Incremental detokenization with stop strings: token ids in, releasable text out.

Text is decoded over a short sliding window of token ids (vLLM's prefix/read offsets) rather
than the whole sequence each step, so a long answer costs O(n) and not O(n^2). The window starts
a few tokens before the new ones, so tokenizers that drop a word's leading space at the start of
a decode (SentencePiece) still give the space. Two kinds of text are held back:

- a decode ending in U+FFFD: the token ended inside a multi-byte UTF-8 character;
- a suffix that could be the start of a stop string, until the next tokens settle it.

When a stop string appears the text is cut before it and `stopped` turns true; the caller then
closes the engine's iterator, which aborts the request.
"""
from __future__ import annotations

from typing import Sequence

# Tokens of the prompt that seed the window, so the first generated token decodes in context.
PROMPT_CONTEXT_TOKENS = 5

INCOMPLETE_CHAR = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, stop: Sequence[str] = (),
                 prompt_token_ids: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._max_stop_len = max((len(s) for s in self._stop), default=0)
        self._ids: list[int] = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0  # window start: decoded only for context
        self._read_offset = len(self._ids)  # ids before this are already in self._text
        self._text = ""  # the decoded generated text so far
        self._released = 0  # characters of self._text handed out
        self.num_tokens = 0  # generated tokens fed in, up to and including the one that stopped
        self.stopped = False  # a stop string was found

    @property
    def text(self) -> str:
        """The text released so far."""
        return self._text[:self._released]

    def add_tokens(self, token_ids: Sequence[int]) -> str:
        """Feed generated tokens; return the text they release. Tokens after a stop are ignored."""
        out: list[str] = []
        for token_id in token_ids:
            if self.stopped:
                break
            out.append(self.add_token(token_id))
        return "".join(out)

    def add_token(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.num_tokens += 1
        self._ids.append(token_id)
        self._decode_window(final=False)
        return self._release(final=False)

    def finish(self) -> str:
        """The generation ended: release everything held back (an incomplete character as U+FFFD)."""
        if self.stopped:
            return ""
        if self._read_offset < len(self._ids):
            self._decode_window(final=True)
        return self._release(final=True)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def _decode_window(self, final: bool) -> None:
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) <= len(prefix_text) and not final:
            return  # nothing visible yet (a special token, or a character still incomplete)
        if new_text.endswith(INCOMPLETE_CHAR) and not final:
            return
        self._text += new_text[len(prefix_text):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)

    def _release(self, final: bool) -> str:
        start = self._released
        if self._stop:
            # Held-back text guarantees a stop string never starts inside released text.
            hits = [i for i in (self._text.find(s, start) for s in self._stop) if i >= 0]
            if hits:
                self.stopped = True
                self._text = self._text[:min(hits)]
                self._released = len(self._text)
                return self._text[start:]
        end = len(self._text)
        if not final:
            end -= self._stop_prefix_len(self._text[start:])
        self._released = end
        return self._text[start:end]

    def _stop_prefix_len(self, pending: str) -> int:
        """Length of the longest suffix of `pending` that begins some stop string."""
        for k in range(min(self._max_stop_len - 1, len(pending)), 0, -1):
            tail = pending[-k:]
            if any(s.startswith(tail) for s in self._stop):
                return k
        return 0
