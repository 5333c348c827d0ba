"""Streaming text: incremental UTF-8-safe detokenization and stop-string hold-back."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from workers.engine.text import REPLACEMENT_CHAR, IncrementalDetokenizer, StopFilter


@pytest.fixture(scope="module")
def byte_bpe() -> Tokenizer:
    """A tiny byte-level BPE like GPT-2's/SmolLM2's, trained on ASCII only.

    Non-ASCII characters therefore stay as one token per UTF-8 byte, the case
    where decoding token by token yields half characters.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(["hello world, the cat sat on the mat"] * 20, trainer)
    return tokenizer


TEXTS = ["hello world", "héllo wörld", "猫が座った 🙂🐈‍⬛ ok", "ä🙂", "mat — “quoted” …"]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenization_is_utf8_safe(byte_bpe: Tokenizer, text: str) -> None:
    ids = byte_bpe.encode(text).ids

    def decode(window: Sequence[int]) -> str:
        return byte_bpe.decode(list(window))

    detok = IncrementalDetokenizer(decode)
    deltas = [detok.push(i) for i in ids]
    deltas.append(detok.finish())
    assert "".join(deltas) == text
    assert not any(REPLACEMENT_CHAR in d for d in deltas)


def test_the_case_is_real(byte_bpe: Tokenizer) -> None:
    # Decoding one byte of a 4-byte emoji on its own gives a replacement char.
    first = byte_bpe.encode("🙂").ids[0]
    assert byte_bpe.decode([first]) == REPLACEMENT_CHAR


def test_dangling_partial_character_is_released_at_the_end(byte_bpe: Tokenizer) -> None:
    detok = IncrementalDetokenizer(lambda w: byte_bpe.decode(list(w)))
    ids = byte_bpe.encode("a🙂").ids
    out = [detok.push(i) for i in ids[:-1]]  # generation stopped inside the emoji
    assert "".join(out) == "a"
    assert detok.finish() == REPLACEMENT_CHAR


@pytest.mark.parametrize(
    ("chunks", "stops", "emitted", "matched"),
    [
        (["Hel", "lo W", "orld"], ["lo W"], ["He", "l"], True),
        (["ab", "c"], ["cd"], ["ab", ""], False),
        (["x", "S", "TOP", "y"], ["STOP"], ["x", "", ""], True),
        (["one END two"], ["END", "one"], [""], True),
        (["aaa", "ab"], ["aab"], ["a", "a"], True),
        (["plain text"], [], ["plain text"], False),
        (["no stop here"], ["STOP"], ["no stop here"], False),
    ],
)
def test_stop_filter(
    chunks: list[str], stops: list[str], emitted: list[str], matched: bool
) -> None:
    f = StopFilter(stops)
    out = []
    for chunk in chunks:
        out.append(f.push(chunk))
        if f.matched:
            break
    assert out == emitted
    assert f.matched is matched


def test_held_text_is_released_when_generation_ends_without_a_stop() -> None:
    f = StopFilter(["cd"])
    assert f.push("abc") == "ab"
    assert f.finish() == "c"


def test_stop_filter_never_emits_after_a_match() -> None:
    f = StopFilter(["##"])
    assert f.push("a#") == "a"
    assert f.push("#b") == ""
    assert f.push("more") == ""
    assert f.finish() == ""
