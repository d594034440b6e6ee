"""The incremental detokenizer: released text equals a full decode, held back where it must be."""
from __future__ import annotations

import random

import pytest

from kevlard.web.detokenizer import IncrementalDetokenizer
from tests.web.fake_engine import make_tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _metaspace_tokenizer():
    """A SentencePiece-style tokenizer: '▁' marks a word's leading space, dropped at decode start."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "▁The", "▁capital", "▁is", "▁Paris", ".", "▁of", "▁France"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def _feed(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    pieces = [detok.add_token(t) for t in ids]
    if not detok.stopped:
        pieces.append(detok.finish())
    return pieces


def test_pieces_add_up_to_the_full_decode(tok):
    text = "Hello world! Grüße, 日本語 and emoji 🦀 STOP at the end."
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    assert "".join(_feed(detok, ids)) == text
    assert detok.num_tokens == len(ids)


def test_random_token_sequences_match_the_full_decode(tok):
    rng = random.Random(1234)
    for _ in range(50):
        ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 40))]
        detok = IncrementalDetokenizer(tok)
        assert "".join(_feed(detok, ids)) == tok.decode(ids, skip_special_tokens=True)


def test_incomplete_utf8_character_is_held_back(tok):
    ids = tok.encode("é")
    assert len(ids) == 2  # one byte each
    detok = IncrementalDetokenizer(tok)
    assert detok.add_token(ids[0]) == ""
    assert detok.add_token(ids[1]) == "é"


def test_special_tokens_are_skipped(tok):
    detok = IncrementalDetokenizer(tok)
    ids = tok.encode("Hi") + [tok.eos_token_id]
    assert "".join(_feed(detok, ids)) == "Hi"


def test_stop_string_split_across_tokens(tok):
    ids = tok.encode("Hello world! STOP here")
    detok = IncrementalDetokenizer(tok, stop=["d! S"])  # spans 'ld', '!', 'Ġ', 'ST'
    out = _feed(detok, ids)
    assert "".join(out) == "Hello worl"
    assert detok.stopped
    assert detok.num_tokens == ids.index(tok.convert_tokens_to_ids("ST")) + 1


def test_stop_string_inside_one_token(tok):
    ids = tok.encode("ab STOP cd")
    detok = IncrementalDetokenizer(tok, stop=["TO"])  # inside 'ST' + 'OP'
    assert "".join(_feed(detok, ids)) == "ab S"
    assert detok.stopped


def test_possible_stop_prefix_is_held_then_released(tok):
    detok = IncrementalDetokenizer(tok, stop=["abc"])
    assert detok.add_tokens(tok.encode("xa")) == "x"
    assert detok.add_tokens(tok.encode("b")) == ""
    assert detok.add_tokens(tok.encode("d")) == "abd"
    assert detok.finish() == ""


def test_held_prefix_is_released_at_the_end(tok):
    detok = IncrementalDetokenizer(tok, stop=["abc"])
    assert detok.add_tokens(tok.encode("xab")) == "x"
    assert detok.finish() == "ab"
    assert not detok.stopped


def test_earliest_of_several_stop_strings_wins(tok):
    detok = IncrementalDetokenizer(tok, stop=["world", "lo"])
    assert "".join(_feed(detok, tok.encode("Hello world"))) == "Hel"


def test_tokens_after_a_stop_are_ignored(tok):
    detok = IncrementalDetokenizer(tok, stop=["!"])
    assert detok.add_tokens(tok.encode("Hi! more text")) == "Hi"
    assert detok.num_tokens == 3
    assert detok.add_token(tok.encode("x")[0]) == ""
    assert detok.finish() == ""


def test_stop_at_the_very_start_gives_empty_text(tok):
    detok = IncrementalDetokenizer(tok, stop=["He"])
    assert "".join(_feed(detok, tok.encode("Hello"))) == ""
    assert detok.stopped and detok.num_tokens == 2


def test_prompt_context_keeps_the_leading_space_of_sentencepiece_words():
    sp = _metaspace_tokenizer()
    prompt = sp.encode("The capital of France is")
    generated = sp.convert_tokens_to_ids(["▁Paris", "."])  # a new word, then punctuation
    assert sp.decode(generated) == "Paris."  # decoded alone the space is lost...
    detok = IncrementalDetokenizer(sp, prompt_token_ids=prompt)
    assert "".join(_feed(detok, generated)) == " Paris."  # ...in context it is kept
